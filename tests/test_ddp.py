"""Several processes (DDP over gloo via `accelerate launch --multi_gpu` on a CPU) follow one process; frozen-LLM checkpointing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO
from mmadapt.data.digits import CAPTION_FORMATS, WORDS, DigitsCaptions

RECIPE = str(REPO / "recipes" / "mini" / "qformer.yaml")
STEPS = 8
GLOBAL_BATCH = 16
# Measured: the largest step-loss gap was 5.4e-7 and the largest bridge-weight gap 1.5e-6 (8 steps, lr 2e-3): float
# summation order only. Averaging per-rank mean losses instead of weighting them by target tokens gave gaps up to 0.07.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


def write_captions(folder: Path, count: int = 96) -> Path:
    """Real PNG files and a JSONL of captions of varied length, so per-batch losses differ visibly."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = DigitsCaptions("train", style="fixed")
    rows = []
    for index in range(count):
        sample = digits[index]
        sample["image"].save(folder / f"{index}.png")
        caption = CAPTION_FORMATS[index % len(CAPTION_FORMATS)].format(word=WORDS[sample["label"]], number=sample["label"])
        rows.append({"image": f"{index}.png", "text": caption})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(data: Path, out: Path, cache: Path, batch_size: int) -> list[str]:
    return [f"data={{type: image_captions, path: {data}, template: instruction, prompt: 'What does it show?'}}",
            "val_data=null", f"train.steps={STEPS}", f"train.batch_size={batch_size}", "train.warmup_steps=0",
            "train.log_every=1", f"train.output_dir={out}", f"train.cache_dir={cache}"]


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ddp")
    data = write_captions(root / "data")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # two ranks on two cores: one thread each
    # `--multi_gpu` picks accelerate's multi-process launcher (torchrun); with no GPU the ranks join over gloo
    # (MULTI_CPU). `--cpu --num_processes 2` would start one process only: its launcher ignores the count.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmadapt", "train", RECIPE,
               *overrides(data, root / "ddp", root / "cache", GLOBAL_BATCH // 2)]
    launched = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    command = [*command[:command.index("train") + 2], *overrides(data, root / "sharded", root / "cache", GLOBAL_BATCH // 2),
               "train.shard_frozen=[llm]",  # and a validation pass at the end, which every process of a sharded LM runs
               "val_data={type: digits_captions, split: val, limit: 8, template: instruction, prompt: 'What does it show?'}"]
    sharded = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import load_recipe

    recipe, plan = load_recipe(RECIPE, overrides(data, root / "single", root / "cache", GLOBAL_BATCH))
    Trainer(recipe, plan).train()
    return {"root": root, "log": launched.stdout + launched.stderr, "sharded_log": sharded.stdout + sharded.stderr}


def test_ddp_loss_curve_matches_one_process_at_the_same_global_batch(runs: dict[str, object]) -> None:
    root = Path(str(runs["root"]))
    single, ddp = step_losses(root / "single"), step_losses(root / "ddp")
    assert len(single) == len(ddp) == STEPS  # one line per step: only rank 0 logs
    gaps = [abs(a - b) for a, b in zip(single, ddp)]
    assert max(gaps) < LOSS_TOLERANCE, f"single {single}\nddp    {ddp}"
    assert max(single) - min(single) > 1000 * LOSS_TOLERANCE  # the curve moves: a match is not a flat-line accident
    ours, theirs = load_file(str(root / "single" / "card" / "bridge.safetensors")), load_file(str(root / "ddp" / "card" / "bridge.safetensors"))
    assert set(ours) == set(theirs)
    moved = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert moved < WEIGHT_TOLERANCE


def test_sharding_the_frozen_llm_halves_its_weights_per_process_and_keeps_the_loss_curve(runs: dict[str, object]) -> None:
    """train.shard_frozen: [llm] (FSDP2): each of 2 processes holds half the LM, and training follows one process."""
    import re

    root, log = Path(str(runs["root"])), str(runs["sharded_log"])
    held = [(int(a), int(b)) for a, b in re.findall(r"sharded llm over 2 processes .*?holds (\d+) of its (\d+) weights", log)]
    assert len(held) == 2, log[-3000:]  # one line per process
    total = held[0][1]
    assert total > 0 and held[0][0] + held[1][0] == total  # the shards partition the weights: nothing held twice
    assert all(abs(mine - total / 2) < 0.01 * total for mine, _ in held), held  # dim-0 shards: odd rows make it uneven
    single, sharded = step_losses(root / "single"), step_losses(root / "sharded")
    assert len(sharded) == STEPS
    assert max(abs(a - b) for a, b in zip(single, sharded)) < LOSS_TOLERANCE, f"single {single}\nsharded {sharded}"
    ours, theirs = load_file(str(root / "single" / "card" / "bridge.safetensors")), load_file(str(root / "sharded" / "card" / "bridge.safetensors"))
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < WEIGHT_TOLERANCE
    assert log.count("card written to") == 1 and "mmadapt eval" in log
    assert log.count(": val_loss ") == 1  # both processes ran the pass (or the gathers would hang); rank 0 reported it
    validation = [json.loads(line) for line in (root / "sharded" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert len(validation) == 1 and len(validation[0]["examples"]) == 4 and all(e["generated"] for e in validation[0]["examples"])


def test_only_rank_zero_writes_the_card_and_checkpoints(runs: dict[str, object]) -> None:
    root = Path(str(runs["root"]))
    log = str(runs["log"])
    # Both ranks ran to the end (the launcher exits 0 only then, asserted in the fixture)...
    assert log.count("card: ") == 1  # ...only the main process reports the card...
    assert log.count("card written to") == 1  # ...and only rank 0 wrote it
    assert log.count(f"step {STEPS}/{STEPS}: loss") == 1
    assert (root / "ddp" / "card" / "bridge.safetensors").is_file()
    leftovers = [p.name for p in (root / "ddp").rglob(".*") if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers  # a second writer racing rank 0 would leave temporary folders or fail the rename
    assert len(list((root / "ddp" / "checkpoints").glob("step-*"))) == 1


def test_gradient_checkpointing_recomputes_frozen_llm_layers_and_keeps_the_gradients(tmp_path: Path) -> None:
    """The option must really checkpoint (each LLM layer runs twice per step) and change no gradient."""
    import torch

    from conftest import tiny_recipe
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    grads, calls = {}, {}
    for flag in (False, True):
        raw = tiny_recipe("qformer", gradient_checkpointing=flag, output_dir=str(tmp_path / str(flag)))
        raw["graph"]["llm"]["config"]["attention_dropout"] = 0.5  # zeroed by eval either way: outputs must stay equal
        trainer = Trainer(*check_recipe(raw, "test"))
        trainer.train_mode()
        layers = trainer.model.nodes["llm"].model.model.layers
        counter = [0]
        hooks = [layer.mlp.register_forward_pre_hook(  # inside the layer: fires again when it is recomputed
            lambda *_: counter.__setitem__(0, counter[0] + 1)) for layer in layers]
        from mmadapt.data.collate import collator_for
        from mmadapt.data.digits import DigitsCaptions

        data = DigitsCaptions("train", style="fixed")
        batch = collator_for(trainer.model, 32)([data[i] for i in range(4)])
        trainer.model(batch)["loss"].backward()
        for hook in hooks:
            hook.remove()
        calls[flag] = counter[0]
        grads[flag] = {k: p.grad.clone() for k, p in trainer.model.trainable_parameters().items()}
    assert calls == {False: 2, True: 4}  # two layers; recomputed once each in backward
    for key, grad in grads[False].items():
        assert torch.allclose(grads[True][key], grad, atol=1e-6), key
    assert any(g.abs().max() > 0 for g in grads[True].values())
