"""`mmadapt data shards SRC DEST`: caption data as tar shards in webdataset's layout (the LAION/CC convention: per
sample `KEY.jpg`/`KEY.png` or `KEY.wav`, `KEY.txt`, and `KEY.prompt.txt` where it has a question), written with
webdataset's ShardWriter; `type: hf_dataset` reads them back (datasets' webdataset builder)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmadapt.data.captions import AudioCaptionDataset, ImageCaptionDataset
from mmadapt.errors import DataError

PICTURES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # a folder's pictures, each captioned by its same-stem .txt
SHARD_NAME = "shard-%06d.tar"


@dataclass
class ShardReport:
    """What a shards run wrote, and the rows it could not read (file, reason)."""

    shards: list[Path]
    samples: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def source_rows(source: Path) -> tuple[str, list[dict[str, str]]]:
    """(modality field, rows of {field: path, text, prompt}) from a caption JSONL/CSV (an `audio` column makes it
    audio) or a folder of pictures with same-stem .txt captions."""
    if source.is_dir():
        pictures = sorted(p for p in source.iterdir() if p.suffix.lower() in PICTURES)
        rows = [{"image": str(p), "text": p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "",
                 "prompt": ""} for p in pictures]
        uncaptioned = [Path(r["image"]).name for r in rows if not r["text"]]
        if not rows or uncaptioned:
            raise DataError(f"{source}: each picture needs a same-stem .txt caption; "
                            + (f"none for {', '.join(uncaptioned[:5])}" if uncaptioned else "no pictures found"))
        return "image", rows
    if not source.is_file():
        raise DataError(f"{source}: no such caption file or folder")
    try:
        dataset: ImageCaptionDataset = ImageCaptionDataset(str(source))
    except DataError as not_images:
        try:
            dataset = AudioCaptionDataset(str(source))  # rows with an `audio` column
        except DataError:
            raise not_images from None
    return dataset.field, dataset.rows


def write_shards(source: Path, dest: Path, per_shard: int = 1000) -> ShardReport:
    """Write `source`'s rows into DEST/shard-NNNNNN.tar, `per_shard` samples each, keys numbered in source order. A
    file that cannot be read is left out and reported; a member whose bytes do not decode is the trainer's to count."""
    import webdataset as wds

    modality, rows = source_rows(source)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.glob("shard-*.tar")):
        raise DataError(f"{dest}: already holds shards; give an empty folder")
    report = ShardReport([], 0)
    with wds.ShardWriter(str(dest / SHARD_NAME), maxcount=per_shard, verbose=0) as sink:
        for index, row in enumerate(rows):
            path = Path(row[modality])
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.unreadable.append((str(path), exc.strerror or type(exc).__name__))
                continue
            extension = path.suffix.lower().lstrip(".") or ("wav" if modality == "audio" else "png")
            member = {"__key__": f"{index:09d}", extension: data, "txt": row["text"]}
            if row.get("prompt"):
                member["prompt.txt"] = row["prompt"]
            sink.write(member)
            report.samples += 1
    report.shards = sorted(dest.glob("shard-*.tar"))
    return report
