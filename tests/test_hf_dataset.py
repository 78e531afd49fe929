"""Caption data from Hugging Face `datasets` tables on disk: the same samples as a JSONL of files train the same
steps; bad members are counted by table, row and column; resume mid-epoch is exact; bad tables are refused by name."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_recipe
from mmadapt.core.validate import check_recipe
from mmadapt.data.collate import build_dataset
from mmadapt.errors import DataError
from mmadapt.training.trainer import Trainer

COUNT, BAD = 12, 5  # row 5 holds bytes that are not an image


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (index * 20, 255 - index * 20, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 12 captioned pictures four ways: a JSONL of files, a parquet with the bytes inside, an imagefolder
    with metadata.jsonl, and a save_to_disk DatasetDict."""
    import datasets

    root = tmp_path_factory.mktemp("tables")
    (root / "files").mkdir()
    (root / "folder" / "train").mkdir(parents=True)
    rows, records = [], []
    for index in range(COUNT):
        data = b"not an image" if index == BAD else png(index)
        name = f"img{index:02d}.png"
        (root / "files" / name).write_bytes(data)
        (root / "folder" / "train" / name).write_bytes(data)
        rows.append({"image": name, "text": f"a picture number {index}"})
        records.append({"image": {"bytes": data, "path": name}, "text": f"a picture number {index}"})
    (root / "files" / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "folder" / "train" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": r["image"], "text": r["text"]}) for r in rows if r["image"] != f"img{BAD:02d}.png"))
    features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")})
    table = datasets.Dataset.from_list(records, features=features)
    table.to_parquet(str(root / "data.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(root / "saved"))
    return root


def run(tmp_path: Path, name: str, data: dict, **train: object) -> Trainer:
    raw = tiny_recipe("linear_projector", steps=6, batch_size=3, max_bad_fraction=0.3, output_dir=str(tmp_path / name), **train)
    raw["data"] = data
    raw.pop("val_data")
    trainer = Trainer(*check_recipe(raw, "test"))
    trainer.train()
    return trainer


def step_losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if "loss" in r]


def test_a_parquet_of_image_bytes_trains_the_steps_a_jsonl_of_files_does(tables: Path, tmp_path: Path) -> None:
    files = run(tmp_path, "files", {"type": "image_captions", "path": str(tables / "files" / "data.jsonl")})
    parquet = run(tmp_path, "parquet", {"type": "hf_dataset", "path": str(tables / "data.parquet")})
    saved = run(tmp_path, "saved", {"type": "hf_dataset", "path": str(tables / "saved")})
    assert len(step_losses(files)) == 6 and step_losses(parquet) == step_losses(files) == step_losses(saved)
    assert len(parquet.bad_samples) == 1 and len(files.bad_samples) == 1
    message = parquet.bad_samples.messages[0]
    assert f"data.parquet row {BAD} (image), img{BAD:02d}.png" in message and "not a readable image" in message


def test_an_imagefolder_reads_its_metadata_captions(tables: Path) -> None:
    data = build_dataset({"type": "hf_dataset", "path": str(tables / "folder"), "builder": "imagefolder"})
    assert len(data) == COUNT - 1  # the folder's metadata leaves the bad file out
    sample = data[0]
    assert sample["text"] == "a picture number 0" and sample["target"] == "a picture number 0"
    assert Image.open(sample["image"]).size == (16, 16) and len(sample["key"]) == 40


def test_resume_mid_epoch_is_exact(tables: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"type": "hf_dataset", "path": str(tables / "data.parquet")}
    whole = step_losses(run(tmp_path, "whole", data, save_every=2))
    original_log = Trainer._log

    def log_then_die(self: Trainer, record: dict) -> None:
        original_log(self, record)
        if record.get("step") == 3 and "loss" in record:
            raise KeyboardInterrupt  # after step 3 of 6: mid-epoch (4 batches of 3 make an epoch of 12)

    monkeypatch.setattr(Trainer, "_log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "split", data, save_every=2)
    monkeypatch.setattr(Trainer, "_log", original_log)
    raw = tiny_recipe("linear_projector", steps=6, batch_size=3, max_bad_fraction=0.3, output_dir=str(tmp_path / "split"), save_every=2)
    raw["data"] = data
    raw.pop("val_data")
    resumed = Trainer(*check_recipe(raw, "test"))
    resumed.train(resume=True)
    assert step_losses(resumed) == pytest.approx(whole, abs=1e-6)


def test_a_missing_column_or_an_unknown_suffix_is_refused_by_name(tables: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.parquet: no column 'caption'; its columns: image, text"):
        build_dataset({"type": "hf_dataset", "path": str(tables / "data.parquet"), "text_column": "caption"})
    (tmp_path / "data.tsv").write_text("x")
    with pytest.raises(DataError, match=r"data.tsv: cannot tell the datasets builder from the suffix; set builder"):
        build_dataset({"type": "hf_dataset", "path": str(tmp_path / "data.tsv")})
    with pytest.raises(DataError, match=r"not a parquet dataset"):
        build_dataset({"type": "hf_dataset", "path": str(tmp_path / "data.tsv"), "builder": "parquet"})


# --- webdataset tar shards: written by `mmadapt data shards`, read by hf_dataset ---
def test_shards_written_from_a_jsonl_train_the_steps_the_jsonl_does(tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import tarfile

    from mmadapt.cli import main

    assert main(["data", "shards", str(tables / "files" / "data.jsonl"), str(tmp_path / "shards"), "--per-shard", "5"]) == 0
    assert "wrote 12 samples in 3 shards" in capsys.readouterr().out
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames()[:2] == ["000000000.png", "000000000.txt"]  # LAION/CC layout: KEY.EXT per member
    files = run(tmp_path, "files", {"type": "image_captions", "path": str(tables / "files" / "data.jsonl")})
    sharded = run(tmp_path, "sharded", {"type": "hf_dataset", "path": str(tmp_path / "shards"), "column": "png", "text_column": "txt"},
                  num_workers=2)
    assert step_losses(sharded) == step_losses(files)  # same rows, same order, two workers
    assert len(sharded.bad_samples) == 1 and "not a readable image" in sharded.bad_samples.messages[0]
    assert f"shards row {BAD} (png)" in sharded.bad_samples.messages[0]  # the corrupt member, named


def test_a_cut_short_shard_or_a_used_folder_is_refused_by_name(tables: Path, tmp_path: Path) -> None:
    from mmadapt.data.shards import write_shards

    write_shards(tables / "files" / "data.jsonl", tmp_path / "shards", per_shard=6)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(tables / "files" / "data.jsonl", tmp_path / "shards")
    shard = sorted((tmp_path / "shards").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside its first member
    with pytest.raises(DataError, match=r"shards: not a webdataset dataset"):
        build_dataset({"type": "hf_dataset", "path": str(tmp_path / "shards"), "column": "png", "text_column": "txt"})


# --- conversations from a table ---
def test_a_conversation_table_gives_the_samples_its_jsonl_gives(tables: Path, tmp_path: Path) -> None:
    import datasets

    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    rows = [{"id": "a", "image": ["img00.png"], "conversations": turns("<image>What is it?", "a zero")},
            {"id": "b", "image": ["img01.png", "img02.png"], "conversations": turns("<image><image>Their sum?", "three")},
            {"id": "c", "image": [], "conversations": turns("Say hi.", "hi")},
            {"id": "d", "image": ["img03.png"], "conversations": turns("No placeholder here.", "three")}]  # a bad row
    jsonl = tables / "files" / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    plain = build_dataset({"type": "conversations", "path": str(jsonl)})
    table = build_dataset({"type": "hf_conversations", "path": str(tmp_path / "chat.parquet"), "image_root": str(tables / "files")})
    assert len(table) == len(plain) == 4
    for index in range(3):
        assert table[index] == plain[index]  # turns, prompt, target, image paths and content keys alike
    assert plain[3]["problem"].endswith("row 3 (line 4) (id d): 0 '<image>' placeholder(s) but 1 image(s)")
    assert table[3]["problem"] == f"{tmp_path / 'chat.parquet'}: row 3 (id d): 0 '<image>' placeholder(s) but 1 image(s)"
    (tmp_path / "pictures").mkdir()
    with pytest.raises(DataError, match=r"chat.parquet: its 'image' column holds the pictures themselves"):
        images = datasets.Features({"image": datasets.Image(), "conversations": datasets.Value("string")})
        datasets.Dataset.from_list([{"image": {"bytes": png(1), "path": None}, "conversations": "x"}], features=images
                                   ).to_parquet(str(tmp_path / "pictures" / "chat.parquet"))
        build_dataset({"type": "hf_conversations", "path": str(tmp_path / "pictures" / "chat.parquet")})
