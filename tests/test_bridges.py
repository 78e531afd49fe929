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
    outputs = model.run_nodes(batch_for(model), until_generator=True)
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
    from mmadapt.core.card import save_card
    from mmadapt.serve.inference import load_card

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


def test_token_embedder_pools_without_order_or_reads_the_grid_with_it() -> None:
    """Attention pooling is blind to token order; input_tokens reads the flattened grid, so order changes the word."""
    from bridges.token import TokenEmbedder
    from mmadapt.errors import MMAdaptError

    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)  # (B, N, in_dim)
    shuffled = x[:, torch.randperm(6)]
    pooled, grid = TokenEmbedder(16, 8, num_tokens=2, pool_queries=4), TokenEmbedder(16, 8, num_tokens=2, input_tokens=6)
    for bridge in (pooled, grid):
        torch.nn.init.normal_(bridge.mlp[-1].weight)  # the small init would hide differences
        assert bridge(x).shape == (3, 2, 8)
    torch.testing.assert_close(pooled(shuffled), pooled(x))
    assert (grid(shuffled) - grid(x)).abs().max() > 1e-3
    with pytest.raises(MMAdaptError, match="input_tokens is 6, but the encoder gave 5 tokens"):
        grid(x[:, :5])
    with pytest.raises(MMAdaptError, match="not both"):
        TokenEmbedder(16, 8, pool_queries=4, input_tokens=6)
    legacy = TokenEmbedder(16, 8)  # the default keeps the tensors of cards trained before these options
    assert {k: tuple(v.shape) for k, v in legacy.state_dict().items()} == {
        "pool_query": (1, 16), "norm.weight": (16,), "norm.bias": (16,), "mlp.0.weight": (16, 16), "mlp.0.bias": (16,),
        "mlp.2.weight": (8, 16), "mlp.2.bias": (8,)}
