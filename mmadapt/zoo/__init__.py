"""The miniature zoo: `zoo:NAME` checkpoints shipped inside the package, resolved to their folders."""
from __future__ import annotations

from pathlib import Path

from mmadapt.errors import MMAdaptError

ZOO_DIR = Path(__file__).resolve().parent


def zoo_members() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def resolve_checkpoint(checkpoint: str) -> str:
    """Map `zoo:NAME` to its folder; other values (hub ids, paths) pass through unchanged."""
    if not checkpoint.startswith("zoo:"):
        return checkpoint
    name = checkpoint[len("zoo:"):]
    folder = ZOO_DIR / name
    if not folder.is_dir():
        raise MMAdaptError(f"'{checkpoint}' is not in the miniature zoo; members: {', '.join(zoo_members()) or 'none'}")
    return str(folder)
