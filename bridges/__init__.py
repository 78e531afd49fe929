"""Trainable bridges, one file per method. Each constructor signature is its recipe schema."""
