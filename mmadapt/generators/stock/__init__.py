"""Stock-class exports of a card: each module here writes one transformers class's folder, or says why it cannot."""
