"""Speed options change the work, not the result: each one's loss and gradients equal the plain path's to 1e-6."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_LMS, batch_for, build, tiny_recipe


def loss_and_grads(raw: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build(raw)
    model.train()
    batch = batch_for(model, count=4)
    torch.manual_seed(seed + 1)  # the same dropout draws on both paths
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.trainable_parameters().items()}


@pytest.mark.parametrize("lm", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("bridge", ["qformer", "lora"])  # lora: a projector plus LoRA inside the LM
def test_logits_at_targets_keeps_the_loss_and_gradients(lm: str, bridge: str) -> None:
    fast = tiny_recipe(bridge, lm)
    if bridge == "lora" and lm == "gpt2":
        fast["graph"]["llm"]["adapters"][0]["target_modules"] = ["c_attn"]  # GPT-2's fused attention projection
    slow = copy.deepcopy(fast)
    slow["graph"]["llm"]["logits_at_targets"] = False
    (loss, grads), (loss_full, grads_full) = loss_and_grads(fast), loss_and_grads(slow)
    assert torch.isfinite(loss) and abs(loss.item() - loss_full.item()) < 1e-6
    assert grads.keys() == grads_full.keys() and grads
    assert all(g.abs().sum() > 0 for k, g in grads.items() if "lora_A" not in k)  # lora_A's is zero at lora_B = 0
    for name, grad in grads.items():
        assert (grad - grads_full[name]).abs().max().item() < 1e-6, name


def test_logits_at_targets_runs_the_head_at_labelled_positions_only() -> None:
    model = build(tiny_recipe("qformer", "llama"))
    head = model.generator.model.get_output_embeddings()
    rows: list[int] = []
    handle = head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    batch = batch_for(model, count=4)
    model.train()
    model(batch)
    with torch.no_grad():  # validation and generation: every position's logits
        full = model(batch)
    handle.remove()
    labelled = int((batch["node_inputs"]["llm"]["labels"] != -100).sum())  # each label is predicted from the position before it
    assert rows[0] == labelled
    assert rows[1] == full["logits"].shape[0] * full["logits"].shape[1] > labelled


# --- packing: the samples of a batch end to end, each attending to itself ---
def varied_batch(model: Any, count: int = 5) -> dict[str, Any]:
    """Digits captions whose prompts and targets differ in length by up to 5x, so rows pack two or three to a bin."""
    from mmadapt.data.collate import collator_for
    from mmadapt.data.digits import DigitsCaptions

    data = DigitsCaptions(split="train", style="fixed")
    samples = []
    for index in range(count):
        sample = dict(data[index])
        sample["prompt"] = "Look. " * (1 + 4 * (index % 3)) + sample["prompt"]  # 6, 30 and 54 bytes of extra prompt
        sample["target"] = sample["target"] + " indeed" * (index % 2)
        samples.append(sample)
    return collator_for(model, max_tokens=128)(samples)


def packed_loss_and_grads(raw: dict, packing: bool, head_at_targets: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    raw = copy.deepcopy(raw)
    raw["graph"]["llm"].update(packing=packing, logits_at_targets=head_at_targets)
    torch.manual_seed(0)
    model = build(raw)
    model.train()
    shapes: list = []
    model.generator.model.base_model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["inputs_embeds"].shape[:2])),
                                                               with_kwargs=True)
    batch = varied_batch(model)
    torch.manual_seed(1)
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.trainable_parameters().items()}, shapes


@pytest.mark.parametrize("lm", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("bridge", ["qformer", "lora"])
def test_packing_keeps_the_loss_and_gradients(lm: str, bridge: str) -> None:
    raw = tiny_recipe(bridge, lm)
    if bridge == "lora" and lm == "gpt2":
        raw["graph"]["llm"]["adapters"][0]["target_modules"] = ["c_attn"]
    loss, grads, _ = packed_loss_and_grads(raw, packing=False, head_at_targets=True)
    for head_at_targets in (True, False):  # both loss paths take the packed rows
        packed_loss, packed_grads, shapes = packed_loss_and_grads(raw, packing=True, head_at_targets=head_at_targets)
        rows, length = shapes[0]
        assert rows < 5 and length <= 128  # five samples in fewer rows, none longer than the longest sample
        assert torch.isfinite(loss) and abs(packed_loss.item() - loss.item()) < 1e-6
        assert packed_grads.keys() == grads.keys() and grads
        assert all(g.abs().sum() > 0 for k, g in grads.items() if "lora_A" not in k)
        for name, grad in grads.items():
            assert (packed_grads[name] - grad).abs().max().item() < 1e-6, name


def test_packed_rows_keep_each_sample_s_positions_and_clear_its_first_label() -> None:
    from mmadapt.generators.packing import bins, pack

    assert bins([5, 2, 3, 1, 4]) == [[0], [4, 3], [2, 1]]  # first fit, longest first, into bins of 5
    embeds = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5, 1)  # (B, L, D) = (3, 5, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.tensor([[7, 8, 9, -100, -100], [1, 2, 3, 4, 5], [6, 6, -100, -100, -100]])
    packed, positions, targets = pack(embeds, mask, labels)
    assert packed[:, :, 0].tolist() == [[5, 6, 7, 8, 9], [0, 1, 2, 10, 11]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert targets.tolist() == [[-100, 2, 3, 4, 5], [-100, 8, 9, -100, 6]]


def test_packing_is_refused_where_it_cannot_be_exact() -> None:
    from mmadapt.errors import MMAdaptError
    from mmadapt.generators.causal_lm import CausalLM

    with pytest.raises(MMAdaptError, match="packing: text_alignment compares"):
        CausalLM(config=dict(TINY_LMS["llama"]), tokenizer="bytes", packing=True, text_alignment=0.5)
    raw = tiny_recipe("qformer", "opt")  # OPT builds its mask from the attention mask alone: packed samples would mix
    raw["graph"]["llm"]["packing"] = True
    with pytest.raises(MMAdaptError, match="llm.*OPTModel builds its attention mask without the position ids"):
        build(raw)


# --- diffusion: cached VAE posteriors and text-encoder states ---
from test_diffusion import sd_folder  # noqa: E402,F401
from test_sd3 import sd3_folder  # noqa: E402,F401
from test_sdxl import sdxl_folder  # noqa: E402,F401

LAYOUTS = {"sd_folder": "mmadapt.generators.diffusion.generator.DiffusionGenerator",
           "sdxl_folder": "mmadapt.generators.diffusion.sdxl.SDXLGenerator",
           "sd3_folder": "mmadapt.generators.diffusion.sd3.SD3Generator"}


def dreambooth_steps(cls: type, folder: Path, cached: bool, text_lora: bool = False, steps: int = 3) -> tuple[list, list, dict]:
    """Three DreamBooth-LoRA steps on two pictures (one repeated prompt and a class prompt): each step's loss, LoRA
    gradients, and how often the VAE encoder and the first text encoder ran."""
    from bridges.lora import LoRA

    torch.manual_seed(0)
    generator = cls(checkpoint=str(folder), cache_latents=cached, cache_text_states=cached)
    generator.requires_grad_(False).eval()  # frozen parts without dropout, as an assembled graph keeps them
    LoRA(r=4, alpha=4).apply(generator.denoiser(), cls.adapter_modules[cls.adapter_target])
    if text_lora:
        LoRA(r=4, alpha=4).apply(generator.text_encoder, cls.adapter_modules["text_encoder"])
    calls = {"vae": 0, "text": 0}
    generator.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae", calls["vae"] + 1))
    generator.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    size = generator.resolution
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W)
    ids = generator.tokenize(["a photo of sks digit", "a photo of a digit"])
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(10 + step)  # the same noise, timesteps and posterior draws on both sides
        loss = generator(input_ids=ids, pixel_values=pixels)["loss"]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in generator.named_parameters() if p.requires_grad})
        generator.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_latents_and_text_states_keep_the_loss_and_gradients(layout: str, request: pytest.FixtureRequest) -> None:
    from mmadapt.core.registry import resolve

    cls, folder = resolve(LAYOUTS[layout], {}), request.getfixturevalue(layout)
    (losses, grads, calls), (plain_losses, plain_grads, plain_calls) = dreambooth_steps(cls, folder, True), dreambooth_steps(cls, folder, False)
    assert plain_calls == {"vae": 3, "text": 3} and calls == {"vae": 1, "text": 1}  # read back after the first step
    assert len(set(losses)) == 3  # each step draws its own noise and latent: the cache keeps posteriors, not samples
    for step in range(3):
        assert abs(losses[step] - plain_losses[step]) < 1e-6
        assert grads[step].keys() == plain_grads[step].keys()
        assert any(g.abs().sum() > 0 for g in grads[step].values())
        for name, grad in grads[step].items():
            assert (grad - plain_grads[step][name]).abs().max().item() < 1e-6, name


def test_a_training_text_encoder_is_run_every_step_even_with_the_cache(sd_folder: Path) -> None:  # noqa: F811
    from mmadapt.generators.diffusion.generator import DiffusionGenerator

    (losses, grads, calls), (plain_losses, _, _) = (dreambooth_steps(DiffusionGenerator, sd_folder, True, text_lora=True),
                                                    dreambooth_steps(DiffusionGenerator, sd_folder, False, text_lora=True))
    assert calls == {"vae": 1, "text": 3}
    assert max(abs(a - b) for a, b in zip(losses, plain_losses)) < 1e-6
    assert any("text_encoder" in name and g.abs().sum() > 0 for name, g in grads[-1].items())


# --- DataLoader workers: bad samples travel in the batches and are counted in the main process ---
@pytest.mark.parametrize("workers", [2])
def test_workers_train_the_same_steps_and_count_the_same_bad_samples(tmp_path: Path, workers: int) -> None:
    from PIL import Image

    from mmadapt.core.validate import check_recipe
    from mmadapt.training.trainer import Trainer

    rows = []
    for index in range(12):
        path = tmp_path / f"img{index}.png"
        if index in (4, 9):
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (16, 16), (index * 20, 0, 0)).save(path)
        rows.append({"image": path.name, "text": f"a picture number {index}"})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    runs = {}
    for count in (0, workers):
        raw = tiny_recipe("linear_projector", steps=6, batch_size=3, max_bad_fraction=0.3, num_workers=count,
                          output_dir=str(tmp_path / f"run{count}"))
        raw["data"] = {"type": "image_captions", "path": str(tmp_path / "data.jsonl")}
        raw.pop("val_data")
        trainer = Trainer(*check_recipe(raw, "test"))
        trainer.train()
        runs[count] = ([r["loss"] for r in trainer.history if "loss" in r], sorted(trainer.bad_samples.messages))
    assert len(runs[0][0]) == 6 and runs[workers][0] == runs[0][0]  # the same batches, the same steps
    assert len(runs[0][1]) == 2 and runs[workers][1] == runs[0][1]  # each bad file once (6 steps x 3 = 18: 1.5 epochs)
    assert any("img4.png: not a readable image" in m for m in runs[workers][1])


# --- torch.compile: the bridges and the frozen generator's body, compiled in place ---
def test_compile_keeps_the_losses_the_weights_and_the_card(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mmadapt.core.validate import check_recipe
    from mmadapt.training.trainer import Trainer

    runs = {}
    for compiled in (False, True):
        raw = tiny_recipe("qformer", "llama", steps=3, compile=compiled, output_dir=str(tmp_path / f"run{compiled}"))
        raw.pop("val_data")
        trainer = Trainer(*check_recipe(raw, "test"))
        card = trainer.train()
        runs[compiled] = ([r["loss"] for r in trainer.history if "loss" in r], trainer.compiled,
                          {k: p.detach().clone() for k, p in trainer.model.trainable_parameters().items()},
                          {f.name: load_file(f) for f in sorted(Path(card).glob("*.safetensors"))})
    (losses, compiled, weights, files), (plain_losses, plain_compiled, plain_weights, plain_files) = runs[True], runs[False]
    assert plain_compiled == [] and sorted(compiled) == ["llm.model.model", "qformer"]  # the bridge, and the LM's body
    assert len(losses) == 3 and max(abs(a - b) for a, b in zip(losses, plain_losses)) < 1e-6
    assert weights.keys() == plain_weights.keys()
    assert max((weights[k] - plain_weights[k]).abs().max().item() for k in weights) < 1e-5  # three AdamW steps on equal gradients
    assert files.keys() == plain_files.keys() and files
    for name, tensors in files.items():  # the card's tensors under the same names: no `_orig_mod.` from the compile
        assert tensors.keys() == plain_files[name].keys()


def test_compile_without_a_compiler_is_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shutil

    from mmadapt.core.validate import check_recipe
    from mmadapt.errors import RecipeError
    from mmadapt.training.trainer import Trainer

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr("mmadapt.training.trainer.assemble", lambda *_: pytest.fail("the graph was built"))
    raw = tiny_recipe("qformer", "llama", compile=True, output_dir=str(tmp_path / "run"))
    with pytest.raises(RecipeError, match="train.compile.*C\\+\\+ compiler"):
        Trainer(*check_recipe(raw, "test"))
