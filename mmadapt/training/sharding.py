"""Sharding frozen nodes across processes with torch's FSDP2 (`fully_shard`), for generators too big for one device."""
from __future__ import annotations

import logging

import torch
from torch import nn

from mmadapt.errors import TrainingError
from mmadapt.core.model import AssembledModel

log = logging.getLogger("mmadapt.training.sharding")


def transformer_blocks(node: nn.Module) -> list[nn.Module]:
    """The node's repeated blocks: modules whose class a transformers model names in `_no_split_modules`.

    That is the list accelerate's transformer-based FSDP auto-wrap policy reads; a block is the unit gathered at once.
    """
    names: set[str] = set()
    for module in node.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in node.modules() if type(m).__name__ in names]


def shard_frozen_nodes(model: AssembledModel, names: list[str], device: torch.device) -> int:
    """Shard each named frozen node over all processes, block by block; returns the world size (1: nothing done).

    Each process keeps 1/world of every weight and gathers a block's full weights only while it runs (forward, and
    backward to the bridge). The bridges stay whole on every process; `average_gradients` keeps them in step.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not names:
        return 1
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        log.warning("shard_frozen is set, but this is one process; nothing is sharded (launch with accelerate to shard)")
        return 1
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name in names:
        node = model.nodes[name]
        trainable = [k for k, p in node.named_parameters() if p.requires_grad]
        if trainable:
            raise TrainingError(f"train.shard_frozen: node '{name}' has trainable tensors ({trainable[0]}, ...); only frozen "
                                f"nodes are sharded, so that every process holds the whole bridge and adapters")
        blocks = transformer_blocks(node)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(node, mesh=mesh)  # the rest (embeddings, final norm, head) as one more group
        held = sum(p.to_local().numel() for p in node.parameters())  # FSDP2 parameters are DTensors: this process's shard
        log.info("sharded %s over %d processes (%d blocks + the rest): this process holds %d of its %d weights",
                 name, dist.get_world_size(), len(blocks), held, sum(p.numel() for p in node.parameters()))
    return dist.get_world_size()


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Mean of each trainable tensor's gradient over processes, in one flat all-reduce.

    Written here because DDP cannot wrap a model whose frozen part holds sharded (DTensor) weights; the bridge's
    tensors are small, so one flat buffer is what DDP's own bucket would be.
    """
    import torch.distributed as dist

    for p in parameters:  # every process must send the same buffer, also when a bridge sat idle here (mixture data)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()
