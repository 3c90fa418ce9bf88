"""The one training loop every model of the study goes through; the loss is what varies.

``fit`` runs AdamW with linear warm-up and cosine decay, validates after each epoch, keeps the best
weights (with ``TrainConfig.weight_average``, those of a moving average of the weights, which is
then what it validates), stops early when validation stops improving, and writes a checkpoint after
every epoch (atomically, with its checksum) so an interrupted run resumes where it stopped instead
of starting over; a checkpoint that fails its checksum or does not load is ignored with a warning,
and training starts over.

Under torchrun (:mod:`fastslow.distributed`) the model trains wrapped in DistributedDataParallel:
each rank takes its share of every global batch, BatchNorm uses the global batch's statistics,
validation's score is rank 0's (so every rank stops at the same epoch) and rank 0 alone writes the
checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from fastslow import distributed
from fastslow.cache import load_verified, save_verified
from fastslow.config import TrainConfig

log = logging.getLogger(__name__)

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, float]]


class EpochBatches(Sized, Iterable, Protocol):
    """The batches of one epoch; its length sets the learning-rate schedule."""


def _to_device(batch: Any, device: str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any, float], LossOutput],
    epoch_batches: Callable[[int], EpochBatches],
    validate: Callable[[nn.Module], float],
    config: TrainConfig,
    *,
    seed: int,
    device: str = "cpu",
    checkpoint: Path | None = None,
    desc: str = "train",
    validate_start: bool = False,
    freeze_batchnorm: bool = False,
) -> dict[str, list[dict[str, float]]]:
    """Train ``model`` in place and return its history (per-epoch and per-step records).

    ``loss_fn(model, batch, progress)`` gets the training progress in [0, 1] (losses whose weights
    change as training goes, such as DCD's, use it) and returns a loss, or a loss and a dict of
    scalars to log. ``epoch_batches(epoch)`` must be deterministic in ``epoch`` so a resumed run
    sees the same data (under torchrun, the global batches: each rank trains on its share).
    ``validate(model)`` returns a score where higher is better.

    Fine-tuning a trained model: ``validate_start`` scores the weights it starts from as epoch 0,
    so they are kept if no epoch beats them; ``freeze_batchnorm`` keeps BatchNorm's running
    statistics as they are (its scale and shift still learn), so batches unlike the ones it was
    trained on cannot move them.
    """
    torch.manual_seed(seed)
    model.to(device)
    if _measuring.get():
        raise StepCost(desc, measure_step(model, loss_fn, epoch_batches(0), config, device))
    distributed.with_global_batchnorm(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(epoch_batches(0))
    total = config.epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    state = {"epoch": 0, "best_score": -math.inf, "best_weights": None, "bad_epochs": 0, "stopped": False, "history": {"epochs": [], "steps": []}}
    # What validation scores and training keeps: the model, or the average of its weights.
    kept = copy.deepcopy(model) if config.weight_average else model

    saved = load_verified(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists() and saved is None:
        log.warning("%s: starting over from epoch 1 (checkpoint %s is unusable)", desc, checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if "averaged" in saved:
            kept.load_state_dict(saved["averaged"])
        state = saved["state"]
        log.info("%s: resuming after epoch %d from %s", desc, state["epoch"], checkpoint)
    # What the loss runs: the model, or DDP's wrapper of it (which averages the ranks' gradients).
    trainer = distributed.data_parallel(model, device)

    history = state["history"]
    if validate_start and not history["epochs"]:
        model.eval()
        with torch.no_grad():
            score = distributed.from_main(validate(model))
        history["epochs"].append({"epoch": 0, "train_loss": math.nan, "val_score": score, "seconds": 0.0})
        log.info("%s: validation %.2f before training", desc, score)
        state.update(best_score=score, best_weights=copy.deepcopy(model.state_dict()))
    for epoch in range(state["epoch"], config.epochs):
        if state["stopped"]:
            break
        model.train()
        if freeze_batchnorm:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        started = time.perf_counter()
        losses = []
        batches = tqdm(epoch_batches(epoch), desc=f"{desc} epoch {epoch + 1}/{config.epochs}", leave=False)
        for batch in batches:
            progress = scheduler.last_epoch / total
            output = loss_fn(trainer, _to_device(distributed.rows_of_this_rank(batch), device), progress)
            loss, extras = output if isinstance(output, tuple) else (output, {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            if kept is not model:
                _update_average(kept, model, config.weight_average)
            losses.append(loss.item())
            history["steps"].append({"step": scheduler.last_epoch, "loss": losses[-1], **extras})
            batches.set_postfix(loss=f"{losses[-1]:.3f}")

        kept.eval()
        with torch.no_grad():
            score = distributed.from_main(validate(kept))
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "val_score": score,
            "seconds": time.perf_counter() - started,
        }
        history["epochs"].append(record)
        log.info("%s epoch %d: loss %.4f, validation %.2f", desc, epoch + 1, record["train_loss"], score)
        if score > state["best_score"]:
            state.update(best_score=score, best_weights=copy.deepcopy(kept.state_dict()), bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped"] = state["bad_epochs"] >= config.patience
        if checkpoint is not None and distributed.is_main():
            save_verified(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "state": state,
                    **({"averaged": kept.state_dict()} if kept is not model else {}),
                },
                checkpoint,
            )
        if state["stopped"]:
            log.info("%s: early stop after epoch %d (best validation %.2f)", desc, epoch + 1, state["best_score"])
            break

    if state["best_weights"] is not None:
        model.load_state_dict(state["best_weights"])
    model.eval()
    return history


# --- what one training step costs: the numbers a GPU user sizes a run with ----------------------

_measuring: contextvars.ContextVar[bool] = contextvars.ContextVar("measuring", default=False)


class StepCost(Exception):
    """Raised by :func:`fit` inside :func:`measuring_first_step`, instead of training: ``desc``
    names the run, ``cost`` is :func:`measure_step`'s. Raised (not returned) so nothing built on a
    model that did not train (a cache entry) is ever written."""

    def __init__(self, desc: str, cost: dict[str, float]):
        super().__init__(f"{desc}: {cost}")
        self.desc, self.cost = desc, cost


@contextlib.contextmanager
def measuring_first_step() -> Iterator[None]:
    """The first :func:`fit` reached in this block measures one training step and raises
    :class:`StepCost` instead of training (a stage whose model is cached trains nothing and is
    passed)."""
    token = _measuring.set(True)
    try:
        yield
    finally:
        _measuring.reset(token)


def measure_step(model: nn.Module, loss_fn, batches: EpochBatches, config: TrainConfig, device: str) -> dict[str, float]:
    """What one training step on the first batch costs: floating-point operations of forward and
    backward (torch's FLOP counter: matrix products and convolutions, the bulk of the work),
    the bytes autograd keeps for backward (the activations; each tensor once, parameters not
    counted), the bytes of the parameters that train, and the seconds of a step on this machine
    (the median of three more, uncounted), so the FLOPs convert to its speed. Steps per epoch at this batch size come
    from ``batches``."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    batch = _to_device(next(iter(batches)), device)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}  # storage -> bytes: a tensor saved twice, or views of one, count once

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step() -> None:
        output = loss_fn(model, batch, 0.0)
        (output[0] if isinstance(output, tuple) else output).backward()
        model.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step()
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    trained = [p for p in model.parameters() if p.requires_grad]
    return {
        "batch_size": config.batch_size,
        "steps_per_epoch": len(batches),
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "activation_mb": sum(kept.values()) / 2**20,
        "trained_parameter_mb": sum(p.numel() * p.element_size() for p in trained) / 2**20,
        "weight_average": bool(config.weight_average),
        "seconds_per_step_here": sorted(seconds)[1],
    }


@torch.no_grad()
def _update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of the exponential moving average of ``model``'s weights in ``averaged``; buffers
    (BatchNorm's statistics) are copied as they are."""
    for average, weight in zip(averaged.parameters(), model.parameters()):
        average.lerp_(weight, 1.0 - decay)
    for average, buffer in zip(averaged.buffers(), model.buffers()):
        average.copy_(buffer)
