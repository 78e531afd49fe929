"""recipe -> model: the recipe schema and checks, the node contracts, graph widths, cards and the assembled model."""
