"""mmadapt.core.checkpoint_io on its own, and the card weights it guards: trainable tensors only, keyed by node, loaded
all or nothing; guarded readers that name the file; atomic folders; resumable RNG and trainer state."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build, tiny_recipe
from mmadapt.core.checkpoint_io import (MAX_CARD_FILE_NODES, TRAINER_STATE, atomic_dir, load_prefixed_tensors, load_trainer_state,
                                        read_card_file, read_safetensors, read_torch_state, remove_stale_temp_dirs, rng_state,
                                        save_trainer_state, set_rng_state)
from mmadapt.errors import CardError, DataError, MMAdaptError


# --- a card's trainable-only state, keyed by node ---
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, dict[str, torch.Tensor]]:
    from mmadapt.core.card import save_card

    model = build(tiny_recipe("mlp_projector"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(torch.randn_like(param))
    folder = save_card(model, tmp_path_factory.mktemp("card") / "card")
    return model, folder, {k: p.detach().clone() for k, p in model.trainable_parameters().items()}


def scramble(model: object) -> dict[str, torch.Tensor]:
    """Overwrite every trainable tensor with a recognisable value; return what it now holds."""
    with torch.no_grad():
        for param in model.trainable_parameters().values():  # type: ignore[attr-defined]
            param.fill_(0.125)
    return {k: p.detach().clone() for k, p in model.trainable_parameters().items()}  # type: ignore[attr-defined]


def card_with(folder: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001 - a function of the tensors
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    tensors = edit(load_file(str(copy / "bridge.safetensors")))
    save_file(tensors, str(copy / "bridge.safetensors"))
    return copy


def test_a_card_holds_exactly_the_trainable_tensors_keyed_node_dot_param(trained: tuple) -> None:
    model, folder, saved = trained
    stored = read_safetensors(folder / "bridge.safetensors")
    assert sorted(stored) == ["mlp_projector.mlp.0.bias", "mlp_projector.mlp.0.weight", "mlp_projector.mlp.2.bias", "mlp_projector.mlp.2.weight"]
    assert set(stored) == set(model.trainable_parameters())
    for key, value in stored.items():
        assert torch.equal(value, saved[key])
        assert torch.equal(value, model.nodes["mlp_projector"].get_parameter(key.split(".", 1)[1]))
    frozen = {f"{n}.{k}" for n in ("vision", "llm") for k, _ in model.nodes[n].named_parameters()}
    assert frozen and not frozen & set(stored)


def test_loading_a_card_puts_back_every_trainable_tensor_and_touches_nothing_frozen(trained: tuple) -> None:
    from mmadapt.core.card import load_card_weights

    model, folder, saved = trained
    frozen_before = model.nodes["llm"].model.get_input_embeddings().weight.detach().clone()
    scramble(model)
    load_card_weights(model, folder)
    for key, param in model.trainable_parameters().items():
        assert torch.equal(param, saved[key]), key
    assert torch.equal(model.nodes["llm"].model.get_input_embeddings().weight, frozen_before)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: {k: v for k, v in t.items() if k != "mlp_projector.mlp.2.bias"}, ["mlp_projector.mlp.2.bias: missing from the card"]),
    (lambda t: {**t, "mlp_projector.extra": torch.zeros(2)}, ["mlp_projector.extra: in the card but not trainable in this graph"]),
    (lambda t: {**t, "llm.model.lm_head.weight": torch.zeros(2)}, ["llm.model.lm_head.weight: in the card but not trainable in this graph"]),
    (lambda t: {**t, "mlp_projector.mlp.0.bias": torch.zeros(7)}, ["mlp_projector.mlp.0.bias: shape (7,) in the card, (40,) here"]),
    (lambda t: {**{k: v for k, v in t.items() if k != "mlp_projector.mlp.0.weight"}, "mlp_projector.mlp.2.bias": torch.zeros(1, 48),
                "proj.weight": torch.zeros(1)},
     ["mlp_projector.mlp.0.weight: missing from the card", "proj.weight: in the card but not trainable in this graph",
      "mlp_projector.mlp.2.bias: shape (1, 48) in the card, (48,) here"]),
], ids=["missing", "unexpected", "frozen-key", "shape", "all-three"])
def test_a_card_that_does_not_fit_is_refused_naming_each_key_and_loads_nothing(trained: tuple, tmp_path: Path, edit, expected: list[str]) -> None:  # noqa: ANN001
    from mmadapt.core.card import load_card_weights

    model, folder, _ = trained
    bad = card_with(folder, tmp_path, edit)
    before = scramble(model)
    with pytest.raises(CardError) as info:
        load_card_weights(model, bad)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{bad} does not fit this graph:"
    assert [line.removeprefix("  - ") for line in lines[1:]] == expected
    for key, param in model.trainable_parameters().items():  # no half-load: the tensors that did fit were not copied either
        assert torch.equal(param, before[key]), key


# --- guarded readers ---
def test_read_safetensors_reads_a_file_and_names_one_that_is_not(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(good))
    assert torch.equal(read_safetensors(good)["a"], torch.arange(6.0).reshape(2, 3))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(CardError, match=rf"^{cut}: not a readable safetensors file \("):
        read_safetensors(cut)
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(DataError, match=rf"^{pickled}: not a readable safetensors file"):
        read_safetensors(pickled, DataError)  # the caller's error class


class Payload:  # a class a hostile trainer state could carry
    pass


def test_read_torch_state_loads_plain_data_and_refuses_code_missing_and_corrupt_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"step": 3, "t": torch.ones(2), "nested": [1, (2, "x")]}, plain)
    state = read_torch_state(plain)
    assert state["step"] == 3 and torch.equal(state["t"], torch.ones(2)) and state["nested"] == [1, (2, "x")]
    code = tmp_path / "code.pt"
    torch.save({"step": 3, "payload": Payload()}, code)
    with pytest.raises(CardError) as info:
        read_torch_state(code)
    assert str(info.value).startswith(f"{code}: refused: it holds '{__name__}.Payload', which would run code when loaded")
    assert "weights_only=False" not in str(info.value)
    with pytest.raises(MMAdaptError, match=rf"^{tmp_path / 'none.pt'}: missing$"):
        read_torch_state(tmp_path / "none.pt", MMAdaptError)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(plain.read_bytes()[:40])
    with pytest.raises(CardError, match=rf"^{cut}: not a readable torch checkpoint \("):
        read_torch_state(cut, what="torch checkpoint")


def test_read_torch_state_calls_garbage_unreadable_not_code(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all" * 8)
    with pytest.raises(CardError, match=rf"^{junk}: not a readable trainer state \("):
        read_torch_state(junk)


def test_read_card_file_json_yaml_and_what_is_wrong_with_each_bad_one(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"x": [1, 2]}))
    (tmp_path / "a.yaml").write_text("x: [1, 2]\n")
    assert read_card_file(tmp_path / "a.json") == read_card_file(tmp_path / "a.yaml") == {"x": [1, 2]}
    cases = {
        "list.yaml": ("- 1\n- 2\n", "expected a YAML mapping at the top, found list"),
        "bad.json": ("{x: 1}", "not valid JSON ("),
        "latin.yaml": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 9)"),
        "self.yaml": ("a: &x [1, *x]\n", "a value that contains itself (a recursive YAML alias); not a card file"),
        "bomb.yaml": ("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n"
                                                            for i in range(5)),
                      f"more than {MAX_CARD_FILE_NODES:,} values once its aliases are expanded; not a card file"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(CardError) as info:
            read_card_file(path)
        assert str(info.value).startswith(f"{path}: {message}"), (name, str(info.value))
    with pytest.raises(CardError, match="cannot be read"):
        read_card_file(tmp_path / "absent.yaml")


# --- atomic folders and what a killed writer leaves ---
def test_atomic_dir_replaces_the_folder_on_success_and_keeps_it_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "card"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final and not final.exists()
        (tmp / "v").write_text("1")
    assert (final / "v").read_text() == "1"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(final) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("crash")
    assert (final / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]  # the half-written folder is gone at once
    with atomic_dir(final) as tmp:
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["w"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]  # no .tmp-/.old- left


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_folders_of_gone_writers_are_removed_or_finished_and_others_kept(tmp_path: Path) -> None:
    gone, alive = dead_pid(), os.getppid()
    for name in (f".tmp-step-0000004-{gone}", f".old-step-0000002-{gone}", f".tmp-step-0000003-{alive}", f".tmp-other-{gone}",
                 f".tmp-step-0000005-{gone}", f".old-step-0000005-{gone}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
    (tmp_path / "step-0000001").mkdir()
    removed = remove_stale_temp_dirs(tmp_path, "step-[0-9]+")
    assert sorted(p.name for p in removed) == sorted([f".tmp-step-0000004-{gone}", f".old-step-0000002-{gone}", f".old-step-0000005-{gone}"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".tmp-step-0000003-{alive}", f".tmp-other-{gone}", "step-0000001", "step-0000005"])
    # killed between its renames: the new, complete copy was put in place of the missing target
    assert (tmp_path / "step-0000005" / "marker").read_text() == f".tmp-step-0000005-{gone}"
    assert remove_stale_temp_dirs(tmp_path / "absent", "step-[0-9]+") == []


# --- prefixed tensors of a checkpoint folder ---
def test_load_prefixed_tensors_from_one_file_and_from_shards(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    save_file({"vision.a": torch.ones(2), "vision.b": torch.zeros(3), "text.c": torch.ones(1)}, str(one / "model.safetensors"))
    found = load_prefixed_tensors(str(one), ("vision.",))
    assert sorted(found) == ["vision.a", "vision.b"] and torch.equal(found["vision.b"], torch.zeros(3))
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"vision.a": torch.ones(2), "text.c": torch.ones(1)}, str(shards / "part-1.safetensors"))
    save_file({"vision.b": torch.full((3,), 2.0), "head.d": torch.ones(1)}, str(shards / "part-2.safetensors"))
    index = {"weight_map": {"vision.a": "part-1.safetensors", "text.c": "part-1.safetensors", "vision.b": "part-2.safetensors",
                            "head.d": "part-2.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    found = load_prefixed_tensors(str(shards), ("vision.", "head."))
    assert sorted(found) == ["head.d", "vision.a", "vision.b"] and torch.equal(found["vision.b"], torch.full((3,), 2.0))
    with pytest.raises(MMAdaptError, match=rf"^'{one}' has no tensors starting with audio., sound.$"):
        load_prefixed_tensors(str(one), ("audio.", "sound."))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMAdaptError, match="no model.safetensors or model.safetensors.index.json in the folder"):
        load_prefixed_tensors(str(tmp_path / "empty"), ("vision.",))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(MMAdaptError, match="model.safetensors.index.json: no 'weight_map' mapping"):
        load_prefixed_tensors(str(shards), ("vision.",))


# --- resumable trainer state ---
def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_survives_a_weights_only_round_trip_and_repeats_every_draw(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"step": 7, "consumed": 28, "optimizer": {}, "scheduler": {}, "rng": rng_state(), "history": [1.5]}
    expected = draws()
    assert draws() != expected  # the generators moved on
    save_trainer_state(tmp_path, state)
    loaded = load_trainer_state(tmp_path)  # read with weights_only: rng_state must be plain data and tensors
    assert (loaded["step"], loaded["consumed"], loaded["history"]) == (7, 28, [1.5])
    set_rng_state(loaded["rng"])
    assert draws() == expected


def test_a_trainer_state_missing_keys_is_refused_naming_them(tmp_path: Path) -> None:
    torch.save({"step": 1, "consumed": 1, "rng": {}, "scheduler": {}}, tmp_path / TRAINER_STATE)
    with pytest.raises(CardError, match=rf"^{tmp_path / TRAINER_STATE}: not a trainer state written by mmadapt \(missing optimizer, history\)$"):
        load_trainer_state(tmp_path)
    torch.save([1, 2], tmp_path / TRAINER_STATE)
    with pytest.raises(CardError, match=r"\(missing step, consumed, optimizer, scheduler, rng, history\)$"):
        load_trainer_state(tmp_path)
