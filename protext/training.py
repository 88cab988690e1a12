"""The ProText training loop (ALGORITHMS.md §3): prompts regress frozen description embeddings.

Every (class, description) pair is one sample. The prediction is ``norm(prompted_feature(class))``,
the target ``norm(CLIP.encode_text(description))``; the loss is MSE × 1000 (or L1) over batch and
feature dimension; AdamW updates only the context and deep prompts; the learning rate follows
:class:`protext.schedule.WarmupCosine`, set once per epoch; batches are a fresh permutation of the
samples every epoch, drawn from a generator seeded once.

Two paths compute the same loss and gradients:

* fast (default): targets come precomputed (:mod:`protext.targets`, cached on disk); each distinct
  class of a batch is encoded once and gathered; the tower runs only to the batch's longest EOT; and
  the positions every prompt shares (start of text and context) are computed once per batch;
* naive (``TrainConfig.naive``): one prompt per sample at the full 77 tokens, and the batch's
  targets re-encoded by ``model.encode_text`` at full length, as the published code does. Kept for
  the equality tests and the benchmark.

Every completed epoch can be saved as a resumable state (prompts, optimiser, epoch, RNG states);
resuming replays the remaining epochs exactly, so a killed-and-resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import atomic_write
from .models import text_fingerprint
from .prompts import PromptedTextEncoder
from .schedule import WarmupCosine
from .shared_prefix import shared_prefix_features, supports_shared_prefix

LOSSES = ("mse", "l1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_FORMAT = "protext-train-state/1"
DEFAULT_LOSS_WEIGHT = {"mse": 1000.0, "l1": 1.0}
"""MSE × 1000 is the published default; the published L1 loss is unweighted."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the prompts) stopped being finite; training stopped before saving anything more.

    Attributes:
        epoch: 0-based epoch where it happened.
        step: 0-based step within that epoch.
        history: the epochs completed before it (their checkpoint is the last good one).
    """

    def __init__(self, epoch: int, step: int, value: float, history: list["EpochRecord"]) -> None:
        self.epoch, self.step, self.value, self.history = epoch, step, value, history
        super().__init__(f"the loss became {value} at epoch {epoch + 1}, step {step + 1}")


class ResumeStateError(ValueError):
    """A saved training state cannot be resumed by this run; the message names the file and why."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: ALGORITHMS.md §3 and the cross_dataset preset).

    Attributes:
        lr: base learning rate of the cosine schedule.
        epochs: total epochs, warm-up included.
        warmup_epochs: epochs at the constant ``warmup_lr``.
        warmup_lr: the warm-up learning rate.
        batch_size: samples per step.
        loss: ``mse`` or ``l1``, mean-reduced over batch and feature dimension.
        loss_weight: factor on the loss; None means 1000 for MSE and 1 for L1 (the published values).
        betas, weight_decay, eps: AdamW's.
        seed: seeds the per-epoch shuffling (the caller seeds prompt initialisation with it too).
        precision: ``fp32``, or ``bf16``/``fp16`` autocast for the text tower (prompts and
            optimiser stay fp32; ``fp16`` adds a gradient scaler and needs CUDA).
        naive: use the reference path (per-sample prompts and targets at full length).
        shared_prefix: in the fast path, compute the positions every class prompt shares (start of
            text and context) once per batch (:func:`shared_prefix_features`).
        drop_last: drop the last incomplete batch of an epoch when there is at least one full batch,
            as the published data loader does.
    """

    lr: float = 0.03
    epochs: int = 10
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    batch_size: int = 256
    loss: str = "mse"
    loss_weight: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    eps: float = 1e-8
    seed: int = 1
    precision: str = "fp32"
    naive: bool = False
    shared_prefix: bool = True
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}.")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.schedule()  # validates epochs and rates

    @property
    def weight(self) -> float:
        """The loss factor actually used."""
        return DEFAULT_LOSS_WEIGHT[self.loss] if self.loss_weight is None else float(self.loss_weight)

    def schedule(self) -> WarmupCosine:
        """The per-epoch learning-rate schedule of this run."""
        return WarmupCosine(self.lr, self.epochs, self.warmup_epochs, self.warmup_lr)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready hyper-parameters, the resolved loss weight and optimiser included."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["loss_weight"] = self.weight
        out["optimizer"] = "adamw"
        return out


@dataclass
class TextPairs:
    """Training samples: every (class, description) pair.

    Attributes:
        classnames: the classes, in the order of the prompt encoder's class list.
        class_index: ``(n,)`` class of each sample (index into ``classnames``).
        texts: ``n`` descriptions.
    """

    classnames: list[str]
    class_index: torch.Tensor
    texts: list[str]

    @classmethod
    def from_descriptions(cls, descriptions: Mapping[str, Sequence[str]]) -> "TextPairs":
        """One sample per description, classes in mapping order; classes without any are left out."""
        classnames = [c for c, texts in descriptions.items() if len(texts)]
        index, texts = [], []
        for i, name in enumerate(classnames):
            index += [i] * len(descriptions[name])
            texts += list(descriptions[name])
        if not texts:
            raise ValueError("no descriptions to train on.")
        return cls(classnames, torch.tensor(index, dtype=torch.long), texts)

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        """A hash of the samples (classes, their order, every text), for resume checks."""
        payload = json.dumps([self.classnames, self.class_index.tolist(), self.texts], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class EpochRecord:
    """Loss and learning rate of one completed epoch."""

    epoch: int
    lr: float
    loss: float
    steps: int
    seconds: float
    step_losses: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :func:`train` did: every epoch's record (resumed ones included)."""

    history: list[EpochRecord]
    resumed_from: int = 0

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss if self.history else float("nan")


# --------------------------------------------------------------------------------------------------
# one batch


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
        features = shared_prefix_features(encoder, classes)
    else:
        features = encoder(classes, truncate=True)
    pred = F.normalize(features.float(), dim=-1)[inverse]
    return prompt_loss(pred, targets.float(), config.loss, config.weight)


def naive_batch_loss(
    encoder: PromptedTextEncoder, class_index: torch.Tensor, tokens: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The reference batch loss: one 77-token prompt per sample, targets re-encoded at full length."""
    model = encoder.clip
    device = encoder.ctx.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        target = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
    features = encoder(class_index, truncate=False)
    pred = F.normalize(features.float(), dim=-1)
    return prompt_loss(pred, target, config.loss, config.weight)


# --------------------------------------------------------------------------------------------------
# resumable state


def run_identity(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig) -> dict[str, Any]:
    """Everything a resumed run must share with the saved one for the result to be the same run.

    ``naive`` and ``shared_prefix`` are left out: every path computes the same thing.
    """
    hyper = config.as_dict()
    hyper.pop("naive")
    hyper.pop("shared_prefix")
    return {
        "config": hyper,
        "samples": pairs.digest(),
        "text_tower": text_fingerprint(encoder.clip),
        "prompts": {
            "n_ctx": encoder.n_ctx,
            "depth": encoder.depth,
            "width": encoder.width,
            "ctx_init": encoder.ctx_init,
            "prompts": hashlib.sha256("\n".join(encoder.prompts).encode("utf-8")).hexdigest(),
        },
    }


def load_resume_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`train` (tensors and plain data only: ``weights_only``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors differ by torch version
        raise ResumeStateError(f"{path}: not a readable protext training state ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeStateError(f"{path}: not a protext training state (format {STATE_FORMAT} expected).")
    return state


def _identity_diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _identity_diff(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix[:-1]} (saved {saved!r}, now {current!r})"]


# --------------------------------------------------------------------------------------------------
# the loop


def _batches(n: int, config: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    size = config.batch_size
    stop = (n // size) * size if config.drop_last and n >= size else n
    return [order[i : min(i + size, stop)] for i in range(0, stop, size)]


def train(
    encoder: PromptedTextEncoder,
    pairs: TextPairs,
    config: TrainConfig,
    *,
    targets: Optional[torch.Tensor] = None,
    tokens: Optional[torch.Tensor] = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch_end: Optional[Callable[[EpochRecord, PromptedTextEncoder, list[EpochRecord]], None]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``encoder``'s prompts on ``pairs``; return the loss history.

    Args:
        encoder: the prompted encoder; its class list must be ``pairs.classnames``.
        pairs: the samples.
        config: hyper-parameters.
        targets: ``(n, embed_dim)`` normalised targets of ``pairs.texts`` (fast path).
        tokens: ``(n, context_length)`` tokenised descriptions (naive path).
        state_path: where to save a resumable state after every epoch (atomically); None: nowhere.
        resume: continue from the state at ``state_path`` if it exists.
        on_epoch_end: called after each completed epoch with its record, the encoder and the history
            so far, before the state is saved (the CLI writes the checkpoint there).
        progress: a progress bar per epoch with the running loss and the learning rate.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; nothing was saved for the failing epoch.
        ResumeStateError: the saved state belongs to a different run.
    """
    if list(encoder.classnames) != list(pairs.classnames):
        raise ValueError("the encoder's class list differs from the samples' class list.")
    device = encoder.ctx.device
    if config.naive:
        if tokens is None:
            raise ValueError("the naive path needs the tokenised descriptions (tokens=...).")
        data = tokens
    else:
        if targets is None:
            raise ValueError("the fast path needs the description targets (targets=..., see protext.targets).")
        data = targets.to(device)
    if data.shape[0] != len(pairs):
        raise ValueError(f"{data.shape[0]} target rows for {len(pairs)} samples.")
    autocast_dtype = PRECISIONS[config.precision]
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU.")
    class_index = pairs.class_index.to(device)

    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    schedule = config.schedule()
    shuffle = torch.Generator().manual_seed(config.seed)
    identity = run_identity(encoder, pairs, config) if state_path is not None else None
    history: list[EpochRecord] = []
    start = 0

    if resume and state_path is not None and Path(state_path).is_file():
        state = load_resume_state(state_path)
        diff = _identity_diff(state.get("identity"), identity)
        if diff:
            raise ResumeStateError(f"{state_path}: saved by a different run; it differs in " + "; ".join(diff) + ".")
        encoder.load_prompt_state(state["prompts"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        shuffle.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = [EpochRecord(**record) for record in state["history"]]
        start = int(state["epoch"])
    resumed_from = start

    encoder.train()
    for epoch in range(start, config.epochs):
        lr = schedule.apply(optimizer, epoch)
        batches = _batches(len(pairs), config, shuffle)
        began = time.perf_counter()
        losses: list[float] = []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress, leave=True)
        for step, rows in enumerate(bar):
            rows = rows.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if config.naive:
                    loss = naive_batch_loss(encoder, class_index[rows], data[rows.cpu()], config)
                else:
                    loss = fast_batch_loss(encoder, class_index[rows], data[rows], config)
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                raise NonFiniteLossError(epoch, step, value, history)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(value)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.3g}", refresh=False)
        bar.close()
        if not all(torch.isfinite(p).all() for p in encoder.parameters()):
            raise NonFiniteLossError(epoch, len(batches) - 1, float("nan"), history)
        record = EpochRecord(epoch, lr, sum(losses) / len(losses), len(losses), time.perf_counter() - began, losses)
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, encoder, history)
        if state_path is not None:
            save_resume_state(state_path, epoch + 1, encoder, optimizer, scaler, shuffle, history, identity)
    encoder.eval()
    return TrainResult(history, resumed_from)


def save_resume_state(
    path: str | os.PathLike,
    epochs_done: int,
    encoder: PromptedTextEncoder,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    shuffle: torch.Generator,
    history: list[EpochRecord],
    identity: Optional[dict[str, Any]],
) -> None:
    """Write everything needed to continue after ``epochs_done`` epochs, atomically."""
    state = {
        "format": STATE_FORMAT,
        "epoch": epochs_done,
        "prompts": encoder.prompt_state(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "shuffle_rng": shuffle.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [asdict(r) for r in history],
        "identity": identity,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
