"""mmadapt.core.identity on its own: a base's identity follows what it computes (its weights and its config), not
where or how it was saved or loaded."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import TINY_VISION
from mmadapt.core.identity import VOLATILE_CONFIG_KEYS, config_hash, weights_hash


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


# --- weights ---
def test_the_same_weights_hash_the_same_and_the_digest_is_16_hex() -> None:
    first, second = weights_hash(tiny_net(0)), weights_hash(tiny_net(0))
    assert first == second
    assert len(first) == 16 and int(first, 16) >= 0
    assert weights_hash(tiny_net(1)) != first


def test_changing_one_weight_by_one_ulp_changes_the_hash() -> None:
    net = tiny_net()
    before = weights_hash(net)
    with torch.no_grad():
        weight = net[2].weight
        weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(float("inf")))
    assert weights_hash(net) != before
    with torch.no_grad():
        weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(float("-inf")))
    assert weights_hash(net) == before  # put back: the same identity again


def test_a_buffer_change_changes_the_hash() -> None:
    net = tiny_net()
    before = weights_hash(net)
    net.train()
    net(torch.randn(8, 4))  # BatchNorm's running statistics move; no parameter does
    assert weights_hash(net) != before


def test_the_dtype_is_part_of_the_identity() -> None:
    net = tiny_net()
    as_double = copy.deepcopy(net).double()
    assert weights_hash(as_double) != weights_hash(net)
    assert weights_hash(as_double.float()) == weights_hash(net)  # float32 -> float64 -> float32 is exact


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16), (torch.float32, torch.int32)])
def test_the_same_bytes_in_another_dtype_are_another_identity(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    modules = []
    for dtype in dtypes:
        module = nn.Module()
        module.register_buffer("table", torch.zeros(4, dtype=dtype))  # all-zero bytes either way
        modules.append(module)
    assert modules[0].table.view(torch.uint8).tolist() == modules[1].table.view(torch.uint8).tolist()
    assert weights_hash(modules[0]) != weights_hash(modules[1])


def test_tensor_names_are_part_of_the_identity() -> None:
    torch.manual_seed(0)
    a = nn.ModuleDict({"enc": nn.Linear(3, 3)})
    b = nn.ModuleDict({"dec": copy.deepcopy(a["enc"])})
    assert weights_hash(a) != weights_hash(b)


def test_requires_grad_mode_and_device_bookkeeping_do_not_change_the_hash() -> None:
    net = tiny_net()
    before = weights_hash(net)
    net.requires_grad_(False)
    net.eval()
    assert weights_hash(net) == before
    assert weights_hash(net.cpu()) == before


@pytest.mark.parametrize("how", ["safetensors", "torch.save"])
def test_a_resaved_and_reloaded_copy_has_the_same_hash(how: str, tmp_path: Path) -> None:
    net = tiny_net(3)
    net.train()
    net(torch.randn(8, 4))  # non-default buffers, so they must travel too
    fresh = tiny_net(9)
    assert weights_hash(fresh) != weights_hash(net)
    if how == "safetensors":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
        fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    else:
        torch.save(net.state_dict(), tmp_path / "w.pt")
        fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert weights_hash(fresh) == weights_hash(net)


def test_non_contiguous_views_hash_as_their_values() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 5, bias=False), nn.Linear(3, 5, bias=False)
    source = torch.randn(3, 5)
    with torch.no_grad():
        a.weight = nn.Parameter(source.t())  # a transposed view: not contiguous
        b.weight.copy_(source.t().contiguous())
    assert not a.weight.is_contiguous()
    assert weights_hash(a) == weights_hash(b)


def test_a_config_built_encoder_and_its_saved_copy_have_the_same_weights_identity(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessor

    from mmadapt.encoders.hf_vision import HFVisionTower

    built = HFVisionTower(config=dict(TINY_VISION), seed=0)
    built.model.save_pretrained(tmp_path / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vision")
    loaded = HFVisionTower(checkpoint=str(tmp_path / "vision"))
    assert loaded.cache_identity()["weights"] == built.cache_identity()["weights"]
    assert HFVisionTower(config=dict(TINY_VISION), seed=1).cache_identity()["weights"] != built.cache_identity()["weights"]
    other = HFVisionTower(checkpoint=str(tmp_path / "vision"))
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3
    assert other.cache_identity()["weights"] != built.cache_identity()["weights"]


# --- a node's frozen base, with adapters in it or not ---
def frozen_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return base.requires_grad_(False)


def test_the_base_identity_is_the_same_before_and_after_adapters_go_in_and_train() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from mmadapt.core.identity import base_weights_hash

    base = frozen_base()
    before = base_weights_hash(base)
    assert base_weights_hash(frozen_base()) == before and base_weights_hash(frozen_base(1)) != before
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), base)
    assert any("base_layer" in n for n, _ in base.named_parameters())  # peft wrapped the layers
    assert base_weights_hash(base) == before
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "lora_" in name:
                param.add_(1.0)  # the adapter trains: the base is what it was
    assert base_weights_hash(base) == before
    with torch.no_grad():
        weight = base[0].base_layer.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    assert base_weights_hash(base) != before  # the base itself changed


def test_the_base_identity_survives_a_resave(tmp_path: Path) -> None:
    from mmadapt.core.identity import base_weights_hash

    base = frozen_base(2)
    save_file(dict(base.state_dict()), str(tmp_path / "base.safetensors"))
    fresh = frozen_base(3)
    assert base_weights_hash(fresh) != base_weights_hash(base)
    fresh.load_state_dict(load_file(str(tmp_path / "base.safetensors")))
    assert base_weights_hash(fresh) == base_weights_hash(base)


# --- configs ---
def test_volatile_config_keys_are_ignored_at_every_depth() -> None:
    config = {"hidden_size": 32, "vision_config": {"num_layers": 2, "patch": [8, 8]}}
    noisy = copy.deepcopy(config)
    for key in VOLATILE_CONFIG_KEYS:
        noisy[key] = f"somewhere/{key}"
        noisy["vision_config"][key] = "else"
    assert config_hash(noisy) == config_hash(config)
    assert len(config_hash(config)) == 16


def test_every_computing_key_counts_at_every_depth() -> None:
    config = {"hidden_size": 32, "vision_config": {"num_layers": 2, "patch": [8, 8]}}
    base = config_hash(config)
    for change in ({"hidden_size": 33}, {"vision_config": {"num_layers": 3, "patch": [8, 8]}},
                   {"vision_config": {"num_layers": 2, "patch": [8, 16]}}, {"rope_theta": 10000.0}):
        assert config_hash({**config, **change}) != base, change


def test_config_key_order_and_tuple_or_list_do_not_matter() -> None:
    assert config_hash({"a": 1, "b": (2, 3)}) == config_hash({"b": [2, 3], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": "1"})  # a number is not its text
