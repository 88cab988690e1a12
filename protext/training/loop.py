"""The loop (ALGORITHMS.md §3): prompts regress frozen description embeddings.

The prediction of a sample is ``norm(prompted_feature(class))``, its target the precomputed
``norm(CLIP.encode_text(description))``; the loss is MSE × 1000 (or L1) over batch and feature
dimension; AdamW updates only the context and deep prompts; the learning rate follows
:class:`protext.schedule.WarmupCosine`, set once per epoch; batches are a fresh permutation of the
samples every epoch, drawn from a generator seeded once.

Each distinct class of a batch is encoded once and gathered, the tower runs only to the batch's
longest EOT, and the positions every prompt shares (start of text and context) are computed once
per batch. The reference path that proves this equal to the published computation lives beside the
tests, in ``tests/reference/training_reference.py``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..prompts import PromptedTextEncoder
from ..shared_prefix import supports_shared_prefix
from .config import PRECISIONS, TrainConfig
from .history import EpochRecord
from .pairs import TextPairs
from .resume import _restore, _Run, run_identity


class NonFiniteLossError(RuntimeError):
    """The loss (or the prompts) stopped being finite; training stopped before saving anything more.

    Attributes:
        epoch: 0-based epoch where it happened.
        step: 0-based step within that epoch.
        history: the epochs completed before it (their checkpoint is the last good one).
    """

    def __init__(self, epoch: int, step: int, value: float, history: list[EpochRecord]) -> None:
        self.epoch, self.step, self.value, self.history = epoch, step, value, history
        super().__init__(f"the loss became {value} at epoch {epoch + 1}, step {step + 1}")


@dataclass
class TrainResult:
    """What :func:`train` did: every epoch's record (resumed ones included)."""

    history: list[EpochRecord]
    resumed_from: int = 0

    @property
    def epochs_done(self) -> int:
        """Epochs finished, resumed ones included."""
        return len(self.history)

    @property
    def final_loss(self) -> float:
        """The last epoch's mean loss (NaN before any epoch)."""
        return self.history[-1].loss if self.history else float("nan")


def _seam(name: str) -> Any:
    """``protext.training.<name>`` as it is at the moment of the call.

    The loop's replaceable steps (the batch loss, the shared-prefix encoding, the state writer) are
    looked up through the package on every call, as they were when training was one module: fault
    injection (``tools/kill_campaign.py``, the kill tests) and the tests patch
    ``protext.training.<name>``, which a name bound in this module at import would not see.
    """
    return getattr(sys.modules[__package__], name)


# --------------------------------------------------------------------------------------------------
# one batch

BatchLoss = Callable[[PromptedTextEncoder, torch.Tensor, torch.Tensor, "TrainConfig"], torch.Tensor]
"""``loss(encoder, class_index, data_rows, config)``: the loss of one batch."""


def prompt_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, weight: float) -> torch.Tensor:
    """Mean-reduced MSE or L1 between normalised features, times ``weight``."""
    if kind == "mse":
        return F.mse_loss(pred, target) * weight
    return F.l1_loss(pred, target) * weight


def fast_batch_loss(
    encoder: PromptedTextEncoder, class_index: torch.Tensor, targets: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The batch loss with each distinct class prompt encoded once, cut at its longest EOT.

    Samples of one class share the same prediction, so encoding the distinct classes and gathering
    gives the same loss and, through the gather's backward, the same summed gradients.
    """
    classes, inverse = torch.unique(class_index, return_inverse=True)
    if config.shared_prefix and supports_shared_prefix(encoder):
        features = _seam("shared_prefix_features")(encoder, classes)
    else:
        features = encoder(classes, truncate=True)
    pred = F.normalize(features.float(), dim=-1)[inverse]
    return prompt_loss(pred, targets.float(), config.loss, config.weight)


# --------------------------------------------------------------------------------------------------
# one epoch


def _batches(n: int, config: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """This epoch's batches: a fresh permutation, the last incomplete batch dropped as published."""
    order = torch.randperm(n, generator=generator)
    size = config.batch_size
    stop = (n // size) * size if config.drop_last and n >= size else n
    return [order[i : min(i + size, stop)] for i in range(0, stop, size)]


def _check_inputs(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig, data: Optional[torch.Tensor]) -> None:
    """Refuse a library call whose pieces do not belong together (a programming error: ValueError)."""
    if list(encoder.classnames) != list(pairs.classnames):
        raise ValueError("the encoder's class list differs from the samples' class list.")
    if data is None:
        raise ValueError("training needs the description targets (targets=..., see protext.targets).")
    if data.shape[0] != len(pairs):
        raise ValueError(f"{data.shape[0]} target rows for {len(pairs)} samples.")
    if config.precision == "fp16" and encoder.ctx.device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU.")


def _epoch(run: _Run, epoch: int, pairs: TextPairs, data: torch.Tensor, config: TrainConfig, loss_fn: BatchLoss,
           progress: bool) -> EpochRecord:
    """One epoch: set the scheduled rate on the optimiser, then one step per batch."""
    encoder, device = run.encoder, run.encoder.ctx.device
    autocast_dtype = PRECISIONS[config.precision]
    class_index = pairs.class_index.to(device)
    lr = config.schedule().apply(run.optimizer, epoch)
    batches = _batches(len(pairs), config, run.shuffle)
    began = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress, leave=True)
    for step, rows in enumerate(bar):
        rows = rows.to(device)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(encoder, class_index[rows], data[rows.to(data.device)], config)
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise NonFiniteLossError(epoch, step, value, run.history)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        losses.append(value)
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.3g}", refresh=False)
    bar.close()
    if not all(torch.isfinite(p).all() for p in encoder.parameters()):
        raise NonFiniteLossError(epoch, len(batches) - 1, float("nan"), run.history)
    return EpochRecord(epoch, lr, sum(losses) / len(losses), len(losses), time.perf_counter() - began, losses)


# --------------------------------------------------------------------------------------------------
# the run


EpochHook = Callable[[EpochRecord, PromptedTextEncoder, list[EpochRecord]], None]


def train(
    encoder: PromptedTextEncoder,
    pairs: TextPairs,
    config: TrainConfig,
    *,
    targets: Optional[torch.Tensor] = None,
    batch_loss: Optional[BatchLoss] = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch_end: Optional[EpochHook] = None,
    on_state_saved: Optional[EpochHook] = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``encoder``'s prompts on ``pairs``; return the loss history.

    Args:
        encoder: the prompted encoder; its class list must be ``pairs.classnames``.
        pairs: the samples.
        config: hyper-parameters.
        targets: ``(n, embed_dim)`` normalised targets of ``pairs.texts``, or whatever per-sample
            rows ``batch_loss`` takes.
        batch_loss: the loss of one batch; None: :func:`fast_batch_loss`.
        state_path: where to save a resumable state after every epoch (atomically); None: nowhere.
        resume: continue from the state at ``state_path`` if it exists.
        on_epoch_end: called after each completed epoch, before its state is saved.
        on_state_saved: called after each epoch's state is saved (:func:`protext.training.run_training`
            writes the checkpoint there, so the state is never older than the checkpoint).
        progress: a progress bar per epoch with the running loss and the learning rate.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; nothing was saved for the failing epoch.
        ResumeStateError: the saved state belongs to a different run.
    """
    device = encoder.ctx.device
    _check_inputs(encoder, pairs, config, targets)
    data = targets.to(device)
    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
    )
    run = _Run(
        encoder, optimizer, torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        torch.Generator().manual_seed(config.seed), run_identity(encoder, pairs, config) if state_path is not None else None,
    )
    if resume and state_path is not None and Path(state_path).is_file():
        _restore(run, Path(state_path), device)
    loss_fn = batch_loss or _seam("fast_batch_loss")  # looked up now, so a patched function is used
    encoder.train()
    for epoch in range(run.start, config.epochs):
        record = _epoch(run, epoch, pairs, data, config, loss_fn, progress)
        run.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, encoder, run.history)
        if state_path is not None:
            _seam("save_resume_state")(state_path, epoch + 1, run)
        if on_state_saved is not None:
            on_state_saved(record, encoder, run.history)
    encoder.eval()
    return TrainResult(run.history, run.start)
