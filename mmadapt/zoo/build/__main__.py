"""Rebuild the miniature zoo from scratch with fixed seeds and print each member's quality figures.

    python -m mmadapt.zoo.build [--only digits-clip digits-lm digits-sd digits-dit digits-points fsdd-audiomae] [--out mmadapt/zoo]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmadapt.zoo import ZOO_DIR
from mmadapt.zoo.build import digits_clip, digits_dit, digits_lm, digits_points, digits_sd, fsdd_audiomae

MEMBERS = {"digits-clip": digits_clip.train, "digits-lm": digits_lm.train, "digits-sd": digits_sd.train, "digits-dit": digits_dit.train,
           "digits-points": digits_points.train, "fsdd-audiomae": fsdd_audiomae.train}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(MEMBERS), default=list(MEMBERS))
    parser.add_argument("--out", type=Path, default=ZOO_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.only:
        figures = MEMBERS[name](args.out / name, seed=args.seed)
        (args.out / name / "quality.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"{name}: {json.dumps(figures)}", flush=True)


if __name__ == "__main__":
    main()
