"""Training: the loop, the frozen-feature cache and sharding of frozen nodes."""
