"""The training loop: one readable loop over optimizer steps, on accelerate, resumable to the sample."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmadapt.core.assemble import assemble
from mmadapt.training.cache import FeatureCache
from mmadapt.core.card import load_card_weights, save_card, write_card
from mmadapt.core.checkpoint_io import (TRAINER_STATE, atomic_dir, load_trainer_state, remove_stale_temp_dirs, rng_state,
                                   save_trainer_state, set_rng_state)
from mmadapt.data.collate import BadReport, BadSamples, Collator, batch_to_device, build_dataset, collator_for
from mmadapt.errors import CardError, DataError, RecipeError, TrainingError
from mmadapt.core.graph import Plan
from mmadapt.core.model import AssembledModel
from mmadapt.training.sharding import average_gradients, shard_frozen_nodes
from mmadapt.core.spec import Recipe, machine_problems
from mmadapt.training.compile import compile_nodes

log = logging.getLogger("mmadapt.training.trainer")
CHECKPOINTS = "checkpoints"
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, this rank's share of it, starting at a saved position."""

    def __init__(self, size: int, seed: int, epoch: int, rank: int, world: int, start: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        per_rank = size // world  # equal shares, so every rank takes the same number of steps
        # Strided, not sliced: micro-batch k of all ranks together holds the samples a single process would put
        # in its batch k (at batch_size x world), so a DDP run follows the single-process loss curve.
        self.indices = order[: per_rank * world][rank::world][start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def micro_batches(dataset: Dataset, collator: Collator, cfg: Any, rank: int, world: int, start: int) -> Iterator[tuple[int, dict | None]]:
    """Yield (micro-steps consumed, batch) forever, epoch after epoch; `start` resumes mid-epoch."""
    per_epoch = (len(dataset) // world) // cfg.batch_size
    if per_epoch == 0:
        raise DataError(f"the dataset has {len(dataset)} samples, fewer than one batch of {cfg.batch_size} per process")
    consumed = start
    while True:
        epoch, offset = divmod(consumed, per_epoch)
        sampler = EpochSampler(len(dataset), cfg.seed, epoch, rank, world, start=offset * cfg.batch_size)
        # Its own generator, so creating a loader mid-run (on resume) draws nothing from the global RNG.
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator, drop_last=True,
                            num_workers=cfg.num_workers, generator=generator)
        for batch in loader:
            consumed += 1
            yield consumed, batch


def tracker_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe's train section as the flat scalars trackers store as hyper-parameters (tensorboard takes no lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in raw.get("train", {}).items()}


def loss_items(model: AssembledModel, batch: dict[str, Any]) -> int:
    """How many items a micro-batch's mean loss runs over, as its generator counts them (scored tokens, or samples)."""
    return model.generator.loss_items(batch["node_inputs"].get(model.generator_name, {}), int(batch["size"]))


def checkpoint_frozen_layers(model: AssembledModel) -> list[torch.nn.Module]:
    """Per-layer activation checkpointing in the frozen transformers models that back-propagate to a bridge.

    transformers checkpoints a layer only when `layer.training` is set, and mmadapt keeps frozen nodes in eval.
    So each checkpointed layer gets its own flag set after every `model.train()` (see `arm_checkpointing`), while
    its children stay in eval, and the layer's own dropout rates (OPT's residual dropout) are zeroed: the frozen
    node still computes exactly what it computes in eval.
    """
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[torch.nn.Module] = []
    for name, node in model.nodes.items():
        if not model.needs_grad[name] or all(p.requires_grad for p in node.parameters()):
            continue  # upstream of every bridge (no autograd at all) or a fully trainable bridge
        outer = [m for m in node.modules() if isinstance(m, PreTrainedModel)][:1]  # the outermost covers its sub-models
        for hf_model in outer:
            if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
                hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer in hf_model.modules():
                if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                    for attribute, value in list(vars(layer).items()):
                        if "dropout" in attribute and isinstance(value, float):
                            setattr(layer, attribute, 0.0)
                    layers.append(layer)
    return layers


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step checkpoint; temporary folders of an interrupted save are ignored."""
    folder = out_dir / CHECKPOINTS
    found = sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").is_file()) if folder.is_dir() else []
    return found[-1] if found else None


def summarize(model: AssembledModel) -> list[str]:
    lines = []
    for name, node in model.nodes.items():
        total = sum(p.numel() for p in node.parameters())
        trainable = sum(p.numel() for p in node.parameters() if p.requires_grad)
        state = "trainable" if trainable == total else ("frozen" if trainable == 0 else "frozen + adapters")
        grad = "" if model.needs_grad[name] else ", no autograd"
        lines.append(f"{name}: {type(node).__name__}, {state} ({trainable:,} of {total:,} params{grad})")
    return lines


class Trainer:
    """Owns the accelerator, the model, data, optimizer and the run directory of one training run."""

    def __init__(self, recipe: Recipe, plan: Plan) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe, self.cfg = recipe, recipe.train
        unrunnable = machine_problems(self.cfg)
        if unrunnable:  # before anything loads: nothing is lost
            raise RecipeError(unrunnable, source=recipe.source)
        self.out_dir = Path(self.cfg.output_dir.format(name=recipe.name))
        self.accelerator = Accelerator(mixed_precision=PRECISION[self.cfg.precision], cpu=not torch.cuda.is_available(),
                                       log_with=list(self.cfg.log_with) or None, project_dir=str(self.out_dir / "trackers"))
        set_seed(self.cfg.seed)
        self.model = assemble(recipe, plan)
        # Before the move to the device, so a generator too big for one device never sits there whole.
        self.sharded = shard_frozen_nodes(self.model, self.cfg.shard_frozen, self.accelerator.device) > 1
        self.model.to(self.accelerator.device)
        self.checkpointed = checkpoint_frozen_layers(self.model) if self.cfg.gradient_checkpointing else []
        if self.cfg.gradient_checkpointing and not self.checkpointed:
            log.warning("gradient_checkpointing is on, but no frozen transformers model back-propagates to a bridge")
        self.compiled = compile_nodes(self.model) if self.cfg.compile else []
        self.dataset = build_dataset(recipe.data)
        self.val_dataset = build_dataset(recipe.val_data) if recipe.val_data else None
        for data in (self.dataset, self.val_dataset):
            if hasattr(data, "prepare"):  # data the frozen model makes itself (DreamBooth class images): rank 0 writes
                if self.is_main:
                    data.prepare(self.model, self.out_dir)
                self.accelerator.wait_for_everyone()
                if not self.is_main:
                    data.prepare(self.model, self.out_dir)  # finds rank 0's files and only lists them
        self.collator = collator_for(self.model, self.cfg.max_text_tokens, self.cfg.skip_bad_samples)
        self.bad_samples = BadSamples()  # of the training data, the feature cache's build included
        self.val_bad_samples = BadSamples()
        self.unshared_bad: list[BadReport] = []  # met by this process, not yet counted in bad_samples
        self.cache = self._build_cache()
        self.train_collator = collator_for(self.model, self.cfg.max_text_tokens, self.cfg.skip_bad_samples, cache=self.cache)
        params = list(self.model.trainable_parameters().values())
        self.trainable = params  # the step averages (when sharded) and clips these; built once, not per step
        if not params:
            raise TrainingError("nothing to train: no bridge or adapter has trainable tensors")
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, self.cfg.warmup_steps, self.cfg.steps)
        if self.sharded:  # DDP cannot wrap sharded weights; gradients are averaged by hand after backward
            self.wrapped, self.optimizer = self.model, self.accelerator.prepare(optimizer)
        else:
            self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self._trackers_started = False  # accelerate's trackers start with the first logged record

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def train_mode(self) -> None:
        """The model's training mode, with the checkpointed frozen layers flagged so transformers recomputes them."""
        self.model.train()
        for layer in self.checkpointed:
            layer.training = True

    def _build_cache(self) -> FeatureCache | None:
        if not self.cfg.cache_frozen_features:
            return None
        nodes = self.model.cacheable_encoders()
        if not nodes:
            log.warning("cache_frozen_features is on, but no frozen encoder is fed by data alone; nothing to cache")
            return None
        cache = FeatureCache(self.cfg.cache_dir, self.model, nodes)
        stats = cache.build(self.dataset, self.collator, self.cfg.batch_size, self.accelerator.process_index, self.accelerator.num_processes)
        self.cache_stats = stats  # kept for the benchmarks' build time and break-even figures
        self.unshared_bad += stats.bad  # the same sample ids as training's, which meets them as "no cache entry"
        self._check_bad_samples()  # the shares of the build are disjoint, so the count here covers the dataset once
        self.accelerator.wait_for_everyone()
        if self.is_main:
            log.info("feature cache %s: built %d, reused %d, skipped %d in %.1fs (%.0f bytes/sample)",
                     ", ".join(nodes), stats.built, stats.reused, stats.skipped, stats.seconds, stats.bytes_per_sample)
        return cache

    # --- checkpoints ---
    def save_checkpoint(self, step: int, consumed: int) -> None:
        """Card + optimizer, scheduler, RNG and data position, written atomically by rank 0 only."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            final = self.out_dir / CHECKPOINTS / f"step-{step:07d}"
            with atomic_dir(final) as tmp:
                write_card(self.model, tmp, exports=False)
                state = {"step": step, "consumed": consumed, "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "history": self.history}
                save_trainer_state(tmp, state)
            old = sorted((self.out_dir / CHECKPOINTS).glob("step-*"))[: -self.cfg.keep_checkpoints or None]
            for folder in old:
                shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def resume(self) -> tuple[int, int]:
        if self.is_main:  # what a save killed mid-way (kill -9) left behind; rank 0 is the only writer
            remove_stale_temp_dirs(self.out_dir / CHECKPOINTS, "step-[0-9]+")
            remove_stale_temp_dirs(self.out_dir, "card")
        self.accelerator.wait_for_everyone()
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", self.out_dir / CHECKPOINTS)
            return 0, 0
        load_card_weights(self.model, folder)
        state = load_trainer_state(folder)
        try:  # a state of the right kinds that does not fit this optimizer, or this run's RNGs
            step, consumed = int(state["step"]), int(state["consumed"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.history = list(state["history"])
            json.dumps(self.history)  # rewritten to metrics.jsonl below: plain records only
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CardError(f"{folder / TRAINER_STATE}: does not fit this run ({type(exc).__name__}: {reason})") from None
        if self.is_main:
            log.info("resumed from %s at step %d", folder, step)
        return step, consumed

    # --- the loop ---
    def train(self, resume: bool = False) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for line in summarize(self.model):
                log.info(line)
        if not resume:  # seed here, not only at start-up: imports and set-up may draw from the RNGs
            from accelerate.utils import set_seed

            set_seed(cfg.seed)
        step, consumed = self.resume() if resume else (0, 0)
        if self.is_main:  # on resume, lines past the checkpoint belong to lost steps: rewrite from its history
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        data = micro_batches(self.dataset, self.train_collator, cfg, acc.process_index, acc.num_processes, consumed)
        global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
        from tqdm.auto import tqdm

        # A bar on a terminal; in a log file (no TTY) the periodic INFO lines below stand in for it.
        bar = tqdm(total=cfg.steps, initial=step, disable=None if self.is_main else True, desc="train", dynamic_ncols=True)
        self.train_mode()
        while step < cfg.steps:
            started = time.perf_counter()
            micro_batches_now = []
            for _ in range(cfg.grad_accum):
                consumed, batch = self._next_usable(data)
                micro_batches_now.append(batch_to_device(batch, acc.device))
            self._check_bad_samples()  # before the step: a run past the ceiling trains on none of its batches
            # Each micro-batch's loss is a mean over its own items (target tokens); weighting it by its share of
            # the items of the whole optimizer step, on all ranks, makes DDP and accumulation equal one big batch.
            items = [loss_items(self.model, b) for b in micro_batches_now]
            mean_items = acc.reduce(torch.tensor(float(sum(items)), device=acc.device), reduction="sum") / (acc.num_processes * cfg.grad_accum)
            weighted_sum = torch.zeros((), device=acc.device)
            for micro, batch in enumerate(micro_batches_now):
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(self.wrapped)
                with sync:
                    with acc.autocast():  # the prepared (DDP) model autocasts itself; a sharded model is not prepared
                        loss = self.wrapped(batch)["loss"]  # (,) mean over this micro-batch's target tokens
                    acc.backward(loss * (items[micro] / mean_items) / cfg.grad_accum)
                weighted_sum += loss.detach() * items[micro]
            if self.sharded:
                average_gradients(self.trainable)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = (acc.reduce(weighted_sum, reduction="sum") / (mean_items * acc.num_processes * cfg.grad_accum)).item()
            if not math.isfinite(loss_value):
                last = latest_checkpoint(self.out_dir)
                raise TrainingError(f"step {step}: the loss is {loss_value}; training stopped. Last good checkpoint: {last or 'none (no checkpoint was saved yet)'}")
            record = {"step": step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                      "samples_per_s": global_batch / (time.perf_counter() - started), "consumed": consumed}
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            if bar.disable and self.is_main and (step % cfg.log_every == 0 or step == 1):
                log.info("step %d/%d: loss %.4f, %.1f samples/s", step, cfg.steps, loss_value, record["samples_per_s"])
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                self.evaluate(step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                self.save_checkpoint(step, consumed)
        bar.close()
        self.evaluate(step)
        self.save_checkpoint(step, consumed)
        card_dir = self.out_dir / "card"
        if self.is_main:
            try:
                save_card(self.model, card_dir)
            except Exception as exc:  # noqa: BLE001 - whatever the export hit, the trained tensors are safe: say where
                last = latest_checkpoint(self.out_dir)
                raise TrainingError(f"training finished, but writing the card to {card_dir} failed ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); the trained tensors and the optimizer "
                                    f"state are in {last}: fix the cause, then `mmadapt train ... --resume` writes the card "
                                    "without training again") from exc
            self._plot()
            for bad, data_name in ((self.bad_samples, "training"), (self.val_bad_samples, "validation")):
                if bad.occurrences:
                    log.warning("%s data: %s", data_name, bad.summary())
            log.info("card written to %s", card_dir)
        if self._trackers_started:
            acc.end_training()  # flushes and closes the trackers' files and runs
        acc.wait_for_everyone()
        return card_dir

    def _next_usable(self, data: Iterator[tuple[int, dict | None]]) -> tuple[int, dict]:
        """The next batch with at least one good sample; a whole epoch of bad ones stops the run."""
        per_epoch = (len(self.dataset) // self.accelerator.num_processes) // self.cfg.batch_size
        for _ in range(per_epoch + 1):
            consumed, batch = next(data)
            self.unshared_bad += batch["bad"]
            if self.accelerator.num_processes == 1:
                self._check_bad_samples()  # at once; several processes check together, once per step
            if batch["size"]:
                return consumed, batch
        first = (self.bad_samples.messages + [reason for _, _, reason in self.unshared_bad] or ["unknown"])[0]
        raise DataError(f"no readable sample in a whole epoch of {self.recipe.data.get('type')} data; first error: {first}")

    def _check_bad_samples(self) -> None:
        """Count the bad samples this process met since the last call; past train.max_bad_fraction, stop the run.

        The count is of distinct samples (by id), so a bad file met again each epoch counts once, and it can only
        grow: the run stops as soon as it passes the ceiling, not at the end of an epoch. With several processes every
        one calls this once per step and the reports of all are gathered, so the count is global and exact (an epoch's
        shares are disjoint, and ids are the dataset's), and all processes stop together.
        """
        acc, reports, self.unshared_bad = self.accelerator, self.unshared_bad, []
        if acc.num_processes > 1:
            if acc.reduce(torch.tensor(len(reports), device=acc.device), reduction="sum").item() == 0:
                return  # the common case costs one small all-reduce, not a gather of Python objects
            from accelerate.utils import gather_object

            reports = gather_object(reports)
        self.bad_samples.add(reports)
        total, fraction = len(self.dataset), self.cfg.max_bad_fraction
        if len(self.bad_samples) <= fraction * total:
            return
        last = latest_checkpoint(self.out_dir)
        raise TrainingError(
            f"{len(self.bad_samples)} of the {total} training samples ({len(self.bad_samples) / total:.1%}) are unreadable, above "
            f"train.max_bad_fraction = {fraction:g} (at most {math.floor(fraction * total)} of {total}); training stopped.\n"
            f"So far: {self.bad_samples.summary(shown=5, bullets=True)}\n"
            f"Fix or remove those files, or raise train.max_bad_fraction. "
            f"Last good checkpoint: {last or 'none (no checkpoint was saved yet)'}")

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.cfg.log_with:  # the same numbers to accelerate's trackers (each one's main process writes)
            if not self._trackers_started:
                self.accelerator.init_trackers(self.recipe.name, config=tracker_config(self.recipe.raw))
                self._trackers_started = True
            self.accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=record["step"])

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Validation loss over the val data, and a few generations; rank 0 only (all ranks run a sharded model)."""
        if self.val_dataset is None or not (self.is_main or self.sharded):
            return
        self.model.eval()
        losses, examples = [], []
        loader = DataLoader(self.val_dataset, batch_size=self.cfg.batch_size, collate_fn=self.collator)
        for batch in loader:
            self.val_bad_samples.add(batch["bad"])
            if not batch["size"]:
                continue
            batch = batch_to_device(batch, self.accelerator.device)
            with self.accelerator.autocast():
                losses.append(self.model(batch)["loss"].item() * batch["size"])
            if len(examples) < self.cfg.eval_generations:
                examples += self._examples(step, batch, self.cfg.eval_generations - len(examples))
        self.train_mode()
        record = {"step": step, "val_loss": sum(losses) / max(1, len(self.val_dataset)), "examples": examples}
        self._log(record)
        if self.is_main:
            log.info("step %d: val_loss %.4f; e.g. %s", step, record["val_loss"], examples[:2])

    def _examples(self, step: int, batch: dict[str, Any], count: int) -> list[dict[str, str]]:
        """Generations for the first `count` samples, as the generator logs them (text as is, pictures as files)."""
        return self.model.generator.examples(self.model, batch, count, self.out_dir / "samples", step, write=self.is_main,
                                             max_new_tokens=self.cfg.max_new_tokens)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(self.recipe.name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=100)
        plt.close(fig)
