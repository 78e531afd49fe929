"""The miniature zoo: `zoo:NAME` checkpoints shipped inside the package, resolved to their folders."""
from __future__ import annotations

from pathlib import Path

from mmadapt.errors import MMAdaptError

ZOO_DIR = Path(__file__).resolve().parent


def zoo_members() -> list[str]:
    """Each member folder carries the quality.json its builder measured; build/ (the builders) does not."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "quality.json").is_file())


def resolve_checkpoint(checkpoint: str) -> str:
    """Map `zoo:NAME` to its folder; other values (hub ids, paths) pass through unchanged."""
    if not checkpoint.startswith("zoo:"):
        return checkpoint
    name = checkpoint[len("zoo:"):]
    folder = ZOO_DIR / name
    if name not in zoo_members():
        raise MMAdaptError(f"'{checkpoint}' is not in the miniature zoo; members: {', '.join(zoo_members()) or 'none'}")
    return str(folder)
