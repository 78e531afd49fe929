"""Every bridge: output shapes, gradients only on bridge tensors, frozen weights untouched, card round-trip."""
from __future__ import annotations

import pytest
import torch

from conftest import batch_for, build, tiny_recipe

# bridge -> (bridge node whose output is checked, expected output shape for a batch of 4)
CASES = {
    "linear_projector": ("linear_projector", (4, 16, 48)),  # 16 patch tokens of a 32px image, 8px patches
    "mlp_projector": ("mlp_projector", (4, 16, 48)),
    "qformer": ("qformer", (4, 4, 48)),  # 4 queries
    "prefix": ("prefix", (4, 3, 48)),  # 3 prefix tokens
    "soft_prompt": ("soft", (4, 3, 48)),
    "lora": ("proj", (4, 16, 48)),
}


@pytest.fixture(scope="module", params=list(CASES))
def assembled(request: pytest.FixtureRequest) -> tuple[str, object]:
    torch.manual_seed(0)
    return request.param, build(tiny_recipe(request.param))


def test_output_shape_and_widths_read_from_neighbours(assembled: tuple[str, object]) -> None:
    bridge, model = assembled
    node, shape = CASES[bridge]
    outputs = model.run_nodes(batch_for(model), until_decoder=True)
    assert tuple(outputs[node].shape) == shape
    dims = model.plan.bridge_dims[node]
    assert dims["out_dim"] == 48  # the LLM's embedding width
    if "in_dim" in dims:
        assert dims["in_dim"] == 32  # the vision tower's hidden size


def test_gradients_reach_only_trainable_tensors_and_frozen_weights_stay_bit_identical(assembled: tuple[str, object]) -> None:
    bridge, model = assembled
    trainable = model.trainable_parameters()
    assert trainable, "a bridge must have trainable tensors"
    if bridge == "lora":
        assert all("lora_" in k or k.startswith("proj.") for k in trainable)
        assert any(k.startswith("llm.") and "lora_A" in k for k in trainable)
    frozen_before = {f"{n}.{k}": p.detach().clone() for n, m in model.nodes.items() for k, p in m.named_parameters() if not p.requires_grad}
    trainable_before = {k: p.detach().clone() for k, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    loss = model(batch_for(model))["loss"]
    loss.backward()
    for name, node in model.nodes.items():
        for key, param in node.named_parameters():
            if param.requires_grad:
                assert param.grad is not None, f"{name}.{key} got no gradient"
            else:
                assert param.grad is None, f"frozen {name}.{key} got a gradient"
    grads = [p.grad.abs().sum().item() for k, p in trainable.items() if "lora_A" not in k]  # lora_A's grad is 0 while B=0
    assert sum(grads) > 0
    optimizer.step()
    optimizer.zero_grad()
    after = {f"{n}.{k}": p for n, m in model.nodes.items() for k, p in m.named_parameters() if not p.requires_grad}
    for key, before in frozen_before.items():
        assert torch.equal(before, after[key]), f"frozen {key} changed"
    assert any(not torch.equal(trainable_before[k], p) for k, p in trainable.items())
    assert not model.nodes["vision"].training and not model.nodes["llm"].training  # frozen nodes stay in eval


def test_card_round_trip(assembled: tuple[str, object], tmp_path) -> None:
    from mmadapt.card import save_card
    from mmadapt.inference import load_card

    bridge, model = assembled
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(torch.randn_like(param) * 0.05)  # make the card differ from a fresh init
    save_card(model, tmp_path / "card")
    saved_keys = set(model.trainable_parameters())
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "card" / "bridge.safetensors"))) == saved_keys  # trainable tensors only
    reloaded = load_card(tmp_path / "card")
    for key, param in reloaded.trainable_parameters().items():
        assert torch.equal(param, model.trainable_parameters()[key])
    model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        assert torch.allclose(model(batch)["loss"], reloaded(batch)["loss"], atol=1e-6)
