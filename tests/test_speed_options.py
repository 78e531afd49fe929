"""Speed options change the work, not the result: each one's loss and gradients equal the plain path's to 1e-6."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import batch_for, build, tiny_recipe


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
