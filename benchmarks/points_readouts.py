"""How well readers get the digit out of the frozen zoo point encoder's tokens, beside the 3D recipe (not a speed benchmark).

    python benchmarks/points_readouts.py [--card runs/mini-points-qformer/card]

The 3D counterpart of `audio_readouts.py`. Each reader gets the frozen `digits-points` tokens the points recipe reads
(class token + 16 group tokens, (B, 17, 96)) of the `digits_points` train split, with the digit label as a direct target,
and is scored on the test split (300 digits, one pose each). The readers: logistic regression on Point-BERT's pooled
[class, max] feature (the zoo's linear probe) and on the flattened tokens; the recipe's Q-Former with a linear head,
without and with dropout 0.1; and the same trained on 4 poses per training digit (`views: 4`). With --card,
logistic regression also reads the prefix a trained card's bridge gives the LM, beside the card's caption accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_readouts import QFormerReader, card_rows, logistic, seeded_scores  # noqa: E402
from common import machine, table  # noqa: E402


def tokens_of(encoder: torch.nn.Module, split: str, views: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """The encoder's tokens for every sample of a `digits_points` split, as the recipe's feature cache holds them."""
    from mmadapt.data.points import DigitsPoints

    data = DigitsPoints(split=split, views=views)
    inputs = torch.stack([encoder.preprocess(data.cloud(i)) for i in range(len(data))])  # (N, P, 3)
    with torch.no_grad():
        tokens = torch.cat([encoder(inputs[j: j + 256]) for j in range(0, len(inputs), 256)])  # (N, 1 + G, D)
    return tokens, np.array([data.label(i) for i in range(len(data))])


def main() -> None:
    from mmadapt.encoders.point_cloud import PointBERT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", help="a trained 3D card (e.g. runs/mini-points-qformer/card) whose bridge output to probe")
    parser.add_argument("--bridge", default="qformer", help="the card's bridge node (default: qformer)")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = PointBERT(checkpoint="zoo:digits-points", feature="patch", keep_cls=True).eval()
    train, labels = tokens_of(encoder, "train")
    posed, posed_labels = tokens_of(encoder, "train", views=4)
    test, truth = tokens_of(encoder, "test")
    pooled = lambda t: torch.cat([t[:, 0], t[:, 1:].max(dim=1).values], dim=-1)  # noqa: E731 - Point-BERT's [class, max]
    width = train.shape[2]
    rows = [
        ["logistic regression, pooled [class, max]", logistic(pooled(train), labels, pooled(test), truth)],
        ["logistic regression, flattened tokens", logistic(train, labels, test, truth)],
    ]
    for name, dropout, (tokens, targets), steps in [
        ("the recipe's Q-Former (2000 steps)", 0.0, (train, labels), 2000),
        ("the same with dropout 0.1", 0.1, (train, labels), 2000),
        ("the recipe's Q-Former on 4 poses per digit (4000 steps)", 0.0, (posed, posed_labels), 4000),
    ]:
        scores = seeded_scores(lambda: QFormerReader(width, None, dropout), (0, 1), tokens, targets, test, truth, steps)  # noqa: B023 - called at once
        rows.append([f"{name}; seeds 0 / 1", scores])
    if args.card:
        rows += card_rows(args.card, args.bridge, train, labels, test, truth)
    print(f"digits-points, tokens {tuple(train.shape[1:])}; {machine()}")
    print(table(["reader", "test accuracy"], rows))


if __name__ == "__main__":
    main()
