"""Evaluation: the digits figures, the referee, and the personalization report."""
