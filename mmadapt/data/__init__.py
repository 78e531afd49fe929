"""Data: the modality table, datasets, mixtures and the collator that turns samples into batches."""
