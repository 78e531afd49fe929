"""Rebuilds the miniature zoo (`python -m mmadapt.zoo.build`); nothing in the package imports it."""
