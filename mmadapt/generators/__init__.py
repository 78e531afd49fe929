"""Frozen generators: each kind owns its data, objectives, generation, evaluation hook and exports."""
