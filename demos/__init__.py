"""Gradio demos (filled by a later issue)."""
