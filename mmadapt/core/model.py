"""The assembled model: runs the graph in order, frozen parts without autograd, and generates."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from mmadapt.errors import MMAdaptError
from mmadapt.core.graph import Plan, Ref
from mmadapt.core.generator import Generator
from mmadapt.core.nodes import Bridge, Encoder, Node, RowTokens
from mmadapt.core.spec import Recipe


class AssembledModel(nn.Module):
    """Nodes in topological order. A batch carries each node's data inputs under `node_inputs`."""

    def __init__(self, recipe: Recipe, plan: Plan, nodes: dict[str, Node]) -> None:
        super().__init__()
        self.recipe = recipe
        self.plan = plan
        self.nodes = nn.ModuleDict(nodes)
        self.order = list(plan.order)
        self.generator_name = plan.generator or ""
        self.needs_grad = self._needs_grad()

    # --- structure ---
    @property
    def generator(self) -> Generator:
        return self.nodes[self.generator_name]  # type: ignore[return-value]

    def encoders(self) -> dict[str, Encoder]:
        return {n: m for n, m in self.nodes.items() if isinstance(m, Encoder)}

    def bridges(self) -> dict[str, Bridge]:
        return {n: m for n, m in self.nodes.items() if isinstance(m, Bridge)}

    def readers(self) -> list[tuple[str, str, str, Any]]:
        """(encoder, port, data field, its preprocess_batch) for every encoder input read from data: what a collator needs."""
        return [(name, port, ref.key, node.preprocess_batch) for name, node in self.encoders().items()
                for port, refs in self.plan.inputs[name].items() for ref in refs if ref.is_data]

    def parents(self, name: str) -> list[str]:
        return [r.source for refs in self.plan.inputs[name].values() for r in refs if not r.is_data]

    def _needs_grad(self) -> dict[str, bool]:
        """A node needs autograd if it has trainable tensors or any ancestor has."""
        result: dict[str, bool] = {}
        for name in self.order:
            own = any(p.requires_grad for p in self.nodes[name].parameters())
            result[name] = own or any(result[p] for p in self.parents(name))
        return result

    def cacheable_encoders(self) -> list[str]:
        """Frozen encoders fed only by data, upstream of every trainable tensor: their outputs can be cached."""
        return [
            n for n, m in self.encoders().items()
            if not self.needs_grad[n] and all(r.is_data for refs in self.plan.inputs[n].values() for r in refs)
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors keyed `node.param`, the same keys a card stores."""
        return {f"{n}.{k}": p for n, m in self.nodes.items() for k, p in m.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> AssembledModel:
        """Trainable nodes change mode; frozen ones stay in eval (no dropout), their adapter layers excepted."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        super().train(False)
        for node in self.nodes.values():
            params = list(node.parameters())
            if params and all(p.requires_grad for p in params):
                node.train(mode)
                continue
            for module in node.modules():
                if isinstance(module, BaseTunerLayer):  # LoRA's own dropout follows the training mode
                    module.train(mode)
                    module.base_layer.eval()
        return self

    # --- execution ---
    def node_rows(self, batch: dict[str, Any]) -> dict[str, list[int] | None]:
        """Which batch rows each node runs on: None for all; a list where rows carry different modalities.

        The collator names the rows of encoders whose field only some samples carry; the nodes downstream of one
        encoder inherit its rows. The generator always sees every row (see `node_kwargs`).
        """
        given: dict[str, list[int]] = batch.get("rows", {})
        rows: dict[str, list[int] | None] = {}
        for name in self.order:
            parents = self.parents(name)
            if name == self.generator_name or not parents:
                rows[name] = given.get(name)
                continue
            found = {tuple(rows[p]) if rows[p] is not None else None for p in parents}
            if len(found) > 1:
                raise MMAdaptError(f"graph.{name}: its inputs cover different samples of a mixed batch ({', '.join(parents)}); "
                                   "a node may join only inputs of the same modality")
            only = found.pop()
            rows[name] = None if only is None else list(only)
        return rows

    def run_nodes(self, batch: dict[str, Any], until_generator: bool = False) -> dict[str, Any]:
        """Run every node (or all but the generator) and return their outputs by name; a node no row needs is skipped."""
        outputs: dict[str, Any] = dict(batch.get("precomputed", {}))
        rows = self.node_rows(batch)
        for name in self.order:
            if name in outputs or (until_generator and name == self.generator_name) or rows[name] == []:
                continue
            kwargs = self.node_kwargs(name, batch, outputs, rows)
            with contextlib.nullcontext() if self.needs_grad[name] else torch.no_grad():
                outputs[name] = self.nodes[name](**kwargs)
        return outputs

    def node_kwargs(self, name: str, batch: dict[str, Any], outputs: dict[str, Any],
                    rows: dict[str, list[int] | None] | None = None) -> dict[str, Any]:
        rows = rows if rows is not None else self.node_rows(batch)
        kwargs = {port: self.port_value(name, port, refs, batch, outputs, rows) for port, refs in self.plan.inputs[name].items()}
        if not self.plan.inputs[name] and isinstance(self.nodes[name], Bridge):
            kwargs["batch_size"] = len(rows[name]) if rows[name] is not None else batch["size"]  # an input-free bridge still needs B
        return kwargs

    def port_value(self, name: str, port: str, refs: list[Ref], batch: dict[str, Any], outputs: dict[str, Any],
                   rows: dict[str, list[int] | None]) -> Any:
        bridged = [r for r in refs if not r.is_data]
        # Marked tokens go in by source name, even when every row has them; a mixed batch's go in per row
        if name == self.generator_name and bridged and (self.generator.tokens_by_source() or any(rows[r.source] is not None for r in bridged)):
            return self.row_tokens(port, bridged, batch, outputs, rows)
        values = [self._fetch(name, port, ref, batch, outputs) for ref in refs]
        return values[0] if len(values) == 1 else torch.cat(values, dim=1)  # several refs: joined along tokens

    def row_tokens(self, port: str, refs: list[Ref], batch: dict[str, Any], outputs: dict[str, Any],
                   rows: dict[str, list[int] | None]) -> RowTokens:
        """A mixed batch's bridge outputs for the generator: each row gets the tokens of the modalities it carries."""
        pieces: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(batch["size"])]
        for ref in refs:
            if rows[ref.source] == []:
                continue  # no row of this batch carries that modality
            tokens = self._fetch(self.generator_name, port, ref, batch, outputs)  # (B_ref, P, D)
            for index, row in enumerate(rows[ref.source] if rows[ref.source] is not None else range(batch["size"])):
                pieces[row].append((ref.source, tokens[index]))
        return RowTokens(pieces)

    @staticmethod
    def _fetch(name: str, port: str, ref: Ref, batch: dict[str, Any], outputs: dict[str, Any]) -> Any:
        if ref.is_data:
            try:
                return batch["node_inputs"][name][port]
            except KeyError:
                raise MMAdaptError(f"graph.{name}.inputs.{port}: the batch has no data field '{ref.key}'") from None
        value = outputs[ref.source]
        if ref.key is not None:
            if not isinstance(value, dict) or ref.key not in value:
                keys = ", ".join(value) if isinstance(value, dict) else "none (a single tensor)"
                raise MMAdaptError(f"graph.{name}.inputs.{port}: '{ref.source}' has no output '{ref.key}'; outputs: {keys}")
            value = value[ref.key]
        return value

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.run_nodes(batch)[self.generator_name]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], prompts: list[str], **settings: Any) -> list[Any]:
        """Run encoders and bridges, then let the generator generate from their outputs (text, or images)."""
        outputs = self.run_nodes(batch, until_generator=True)
        name = self.generator_name
        rows = self.node_rows(batch)
        bridged = {port: self.port_value(name, port, refs, batch, outputs, rows)
                   for port, refs in self.plan.inputs[name].items() if not any(r.is_data for r in refs)}
        return self.generator.generate(prompts, **bridged, **self.unconditional(batch, outputs, rows), **settings)

    def unconditional(self, batch: dict[str, Any], outputs: dict[str, Any], rows: dict[str, list[int] | None]) -> dict[str, torch.Tensor]:
        """`negative_<port>`: what a bridge gives for no input (its `unconditional(**its inputs)`, e.g.
        IP-Adapter's projection of a zero embedding), for a generator whose guidance takes it; ports whose bridge has
        none are left out."""
        takes = inspect.signature(self.generator.generate).parameters
        found = {}
        for port, refs in self.plan.inputs[self.generator_name].items():
            nodes = [r.source for r in refs if not r.is_data]
            if len(nodes) == 1 == len(refs) and hasattr(self.nodes[nodes[0]], "unconditional") and f"negative_{port}" in takes:
                source = nodes[0]
                inputs = {p: self.port_value(source, p, r, batch, outputs, rows) for p, r in self.plan.inputs[source].items()}
                found[f"negative_{port}"] = self.nodes[source].unconditional(**inputs)
        return found
