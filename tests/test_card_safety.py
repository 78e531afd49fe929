"""Broken or hostile cards and checkpoints are refused with exit 2 naming the file; card code needs consent; stale temp folders go."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, build, tiny_recipe
from mmadapt.cli import main
from mmadapt.errors import CardError

TINY = REPO / "recipes" / "tiny" / "qformer-random.yaml"
PROBE = "card_code_probe"  # the module a hostile recipe names; importing it writes a marker and sets a global
FORBIDDEN = ("Traceback", "unexpected", "weights_only=False", "weights_only set to False", "weights_only` set to `False")


class Evil:
    """Pickled into a file, this would run a shell command on an unguarded torch.load."""

    def __reduce__(self) -> tuple:
        return (os.system, ("touch /tmp/mmadapt-card-safety-pwned",))


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmadapt.core.card import save_card

    folder = tmp_path_factory.mktemp("card") / "card"
    save_card(build(tiny_recipe("linear_projector")), folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of 2 steps with a checkpoint at each."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(TINY), f"train.output_dir={out}", "train.steps=2", "train.save_every=1"]) == 0
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmadapt.data.digits import DigitsCaptions

    path = tmp_path_factory.mktemp("image") / "digit.png"
    DigitsCaptions("test")[0]["image"].save(path)
    return path


def refused(argv: list[str], capsys: pytest.CaptureFixture, names: str) -> str:
    """Run the CLI in-process; it must exit 2 with `names` in its message and nothing a user should not see."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert names in err, err
    for text in FORBIDDEN:
        assert text not in err, err
    return err


def header(claims: dict) -> bytes:
    """A safetensors header that claims whatever it is given."""
    text = json.dumps(claims).encode()
    return struct.pack("<Q", len(text)) + text


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


CARD_BREAKS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # case: (file, how it is broken, what the message says)
    "weights-pickle": ("bridge.safetensors", lambda p: p.write_bytes(pickle.dumps({"w": Evil()})), "not a readable safetensors"),
    "weights-truncated": ("bridge.safetensors", cut, "not a readable safetensors"),
    "weights-empty": ("bridge.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors"),
    "weights-huge-claim": ("bridge.safetensors", lambda p: p.write_bytes(
        header({"proj": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}}) + b"\0" * 64), "not a readable safetensors"),
    "weights-header-2^62": ("bridge.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "not a readable safetensors"),
    "weights-header-not-json": ("bridge.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 6) + b"{{{{{{"), "not a readable safetensors"),
    "meta-not-json": ("card.json", lambda p: p.write_text("{'format': nope"), "not valid JSON"),
    "meta-a-list": ("card.json", lambda p: p.write_text("[1, 2, 3]"), "expected a JSON mapping"),
    "meta-not-utf8": ("card.json", lambda p: p.write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "meta-no-bases": ("card.json", lambda p: p.write_text('{"format": "mmadapt-card/1", "widths": {}}'), "'bases' must be a mapping, found nothing"),
    "meta-widths-not-mappings": ("card.json", lambda p: p.write_text(
        '{"format": "mmadapt-card/1", "bases": {}, "widths": {"proj": 3}}'), "'widths.proj' must be a mapping, found int"),
    "meta-foreign-format": ("card.json", lambda p: p.write_text('{"format": "other/9"}'), "card format 'other/9'"),
    "meta-nested-just-parseable": ("card.json", lambda p: p.write_text('{"a": ' * 985 + "1" + "}" * 985), "card.json: "),
    "meta-deep-nesting": ("card.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "recipe-not-yaml": ("recipe.yaml", lambda p: p.write_text("graph: [unclosed\n  - {"), "not valid YAML"),
    "recipe-a-list": ("recipe.yaml", lambda p: p.write_text("- graph\n- data\n"), "expected a YAML mapping"),
    "recipe-not-utf8": ("recipe.yaml", lambda p: p.write_bytes(b"name: \xc3\x28\n"), "not UTF-8"),
    "recipe-recursive-alias": ("recipe.yaml", lambda p: p.write_text("graph: &g\n  loop: *g\n"), "contains itself"),
    "recipe-alias-bomb": ("recipe.yaml", lambda p: p.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                                                         for p, c in zip("abcdefgh", "bcdefghi"))), "aliases are expanded"),
    "recipe-dotted-node-type": ("recipe.yaml", lambda p: retype(p, "graph", "linear_projector"), "--trust-card-code"),
    "recipe-dotted-adapter-type": ("recipe.yaml", lambda p: retype(p, "adapter", "llm"), "--trust-card-code"),
    "recipe-dotted-mixture-part": ("recipe.yaml", lambda p: retype(p, "mixture", ""), "--trust-card-code"),
}


def retype(path: Path, where: str, node: str) -> None:
    """Rewrite the card's recipe so that one `type:` names the probe module instead of a table entry."""
    raw = yaml.safe_load(path.read_text())
    if where == "graph":
        raw["graph"][node]["type"] = f"{PROBE}.Projector"
    elif where == "adapter":
        raw["graph"][node]["adapters"] = [{"type": f"{PROBE}.Adapter", "r": 2}]
    else:
        raw["data"] = {"type": "mixture", "parts": [raw["data"], {"type": f"{PROBE}.Data"}]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The importable probe module on sys.path; returns the marker file its import would write."""
    marker = tmp_path / "imported.marker"
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{PROBE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\nIMPORTED = True\n"
        "from bridges.projector import LinearProjector\n\n\nclass Projector(LinearProjector):\n    pass\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    yield marker
    sys.modules.pop(PROBE, None)


@pytest.mark.parametrize("case", list(CARD_BREAKS))
def test_a_broken_card_file_is_refused_naming_it(case: str, card: Path, image: Path, probe: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    name, breaker, says = CARD_BREAKS[case]
    copy = tmp_path / "card"
    shutil.copytree(card, copy)
    breaker(copy / name)
    command = ["eval", str(copy)] if case.startswith("meta") else ["generate", str(copy), "--image", str(image)]
    err = refused(command, capsys, f"{copy / name}")
    assert says in err
    assert PROBE not in sys.modules and not probe.exists()  # nothing the card names was imported


def test_card_code_is_refused_before_import_and_loads_with_consent(card: Path, image: Path, probe: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from mmadapt.serve.inference import load_card

    copy = tmp_path / "card"
    shutil.copytree(card, copy)
    retype(copy / "recipe.yaml", "graph", "linear_projector")
    with pytest.raises(CardError) as caught:
        load_card(copy)
    message = str(caught.value)
    assert f"{copy / 'recipe.yaml'}" in message and "graph.linear_projector.type" in message
    assert f"module '{PROBE}'" in message and "--trust-card-code" in message
    assert PROBE not in sys.modules and not probe.exists()
    from mmadapt.serve.demo import card_summary

    with pytest.raises(CardError, match="--trust-card-code"):
        card_summary(copy)
    assert PROBE not in sys.modules and not probe.exists()
    model = load_card(copy, trust_code=True)
    assert type(model.nodes["linear_projector"]).__module__ == PROBE and probe.read_text() == "imported"
    assert sys.modules[PROBE].IMPORTED
    assert card_summary(copy, trust_code=True)["output"] == "text"
    capsys.readouterr()
    assert main(["generate", str(copy), "--image", str(image), "--max-new-tokens", "2", "--trust-card-code"]) == 0


def test_the_demo_refuses_card_code_without_the_flag(card: Path, probe: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import demos.vlm

    monkeypatch.setattr(demos.vlm, "launch", lambda *args, **kwargs: None)  # a card let through must not block the test
    copy = tmp_path / "card"
    shutil.copytree(card, copy)
    retype(copy / "recipe.yaml", "graph", "linear_projector")
    refused(["demo", "vlm", "--card", str(copy)], capsys, "--trust-card-code")
    assert PROBE not in sys.modules and not probe.exists()


def test_a_users_own_recipe_may_name_its_code(tmp_path: Path) -> None:
    """`mmadapt validate/train my.yaml` with a dotted type is the user's own choice: no consent asked."""
    recipe = tiny_recipe("linear_projector")
    recipe["graph"]["linear_projector"]["type"] = "plugin_bridge.DoubleLinear"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "mine.yaml")]) == 0


def write_state(value: object) -> Callable[[Path], None]:
    return lambda path: torch.save(value, path)


STATE_BREAKS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "state-carries-code": ("trainer_state.pt", write_state({"step": 2, "x": Evil()}), "would run code"),
    "state-raw-pickle-with-code": ("trainer_state.pt", lambda p: p.write_bytes(pickle.dumps({"x": Evil()})), "would run code"),
    "state-truncated": ("trainer_state.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable trainer state"),
    "state-garbage": ("trainer_state.pt", lambda p: p.write_bytes(b"hello world"), "not a readable trainer state"),
    "state-empty": ("trainer_state.pt", lambda p: p.write_bytes(b""), "not a readable trainer state"),
    "state-a-list": ("trainer_state.pt", write_state([1, 2, 3]), "not a trainer state written by mmadapt"),
    "state-missing-keys": ("trainer_state.pt", write_state({"step": 2}), "missing consumed"),
    "state-wrong-optimizer": ("trainer_state.pt", lambda p: torch.save(
        {**torch.load(p, weights_only=True), "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}}, p), "does not fit this run"),
    "checkpoint-weights-pickle": ("bridge.safetensors", lambda p: p.write_bytes(pickle.dumps([1, 2])), "not a readable safetensors"),
    "checkpoint-meta-not-json": ("card.json", lambda p: p.write_text("nope"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(STATE_BREAKS))
def test_a_broken_checkpoint_is_refused_on_resume(case: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name, breaker, says = STATE_BREAKS[case]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = copy / "checkpoints" / "step-0000002" / name
    pwned = Path("/tmp/mmadapt-card-safety-pwned")
    pwned.unlink(missing_ok=True)
    breaker(target)
    err = refused(["train", str(TINY), f"train.output_dir={copy}", "train.steps=3", "--resume"], capsys, str(target))
    assert says in err
    assert not pwned.exists()


def test_from_card_with_broken_weights_is_refused(card: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "card"
    shutil.copytree(card, copy)
    cut(copy / "bridge.safetensors")
    recipe = tiny_recipe("linear_projector", output_dir=str(tmp_path / "run"))
    recipe["graph"]["linear_projector"]["from_card"] = str(copy)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    err = refused(["train", str(tmp_path / "recipe.yaml")], capsys, str(copy / "bridge.safetensors"))
    assert "graph.linear_projector.from_card" in err


def test_a_diffusers_lora_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    from mmadapt.generators.diffusion.export import load_diffusers_lora

    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CardError, match="not a readable safetensors"):
        load_diffusers_lora(None, path)  # type: ignore[arg-type] - refused before the model is touched


def test_stale_temp_folders_are_removed_on_resume_and_the_checkpoint_resumes(run: Path, tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoints = copy / "checkpoints"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [checkpoints / ".tmp-step-5-99999999", checkpoints / ".old-step-0000001-99999999", copy / ".tmp-card-99999999",
                 checkpoints / f".tmp-step-0000003-{os.getpid()}"]  # this process's, but nothing here is writing it
        kept = [checkpoints / f".tmp-step-0000004-{live.pid}",  # a live concurrent writer's
                checkpoints / ".tmp-notes-99999999", checkpoints / ".tmp-step-x-99999999", copy / ".tmp-other-99999999"]
        for folder in stale + kept:
            folder.mkdir()
            (folder / "trainer_state.pt").write_bytes(b"half written")
        import logging

        with caplog.at_level(logging.INFO, logger="mmadapt"):
            assert main(["train", str(TINY), f"train.output_dir={copy}", "train.steps=3", "--resume"]) == 0
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        for folder in stale:
            assert sum(f"removed stale {folder}" in r.getMessage() for r in caplog.records) == 1
        assert "resumed from" in caplog.text and "at step 2" in caplog.text
    finally:
        live.kill()
        live.wait()


def test_a_save_killed_between_its_renames_is_finished_by_the_next_load(card: Path, tmp_path: Path) -> None:
    """atomic_dir renames the old card away, then the new one in: a kill in between leaves both, and no card."""
    from mmadapt.serve.inference import load_card

    shutil.copytree(card, tmp_path / ".old-card-99999999")
    shutil.copytree(card, tmp_path / ".tmp-card-99999999")
    load_card(tmp_path / "card")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]


def test_cleanup_never_removes_a_folder_this_process_is_writing(tmp_path: Path) -> None:
    from mmadapt.core.checkpoint_io import atomic_dir, remove_stale_temp_dirs

    with atomic_dir(tmp_path / "step-0000009") as tmp:
        (tmp / "half").write_text("x")
        assert remove_stale_temp_dirs(tmp_path, "step-[0-9]+") == [] and tmp.is_dir()
    assert (tmp_path / "step-0000009" / "half").is_file()
