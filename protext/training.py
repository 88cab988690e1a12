"""ProText training (ALGORITHMS.md §3): prompts regress frozen description embeddings.

Every (class, description) pair is one sample. The prediction is ``norm(prompted_feature(class))``,
the target ``norm(CLIP.encode_text(description))``; the loss is MSE × 1000 (or L1) over batch and
feature dimension; AdamW updates only the context and deep prompts; the learning rate follows
:class:`protext.schedule.WarmupCosine`, set once per epoch; batches are a fresh permutation of the
samples every epoch, drawn from a generator seeded once.

Each distinct class of a batch is encoded once and gathered, the tower runs only to the batch's
longest EOT, and the positions every prompt shares (start of text and context) are computed once
per batch; targets come precomputed (:mod:`protext.targets`, cached on disk). The reference path
that proves this equal to the published computation (one 77-token prompt per sample, targets
re-encoded every batch) lives beside the tests, in ``tests/reference/training_reference.py``.

:func:`run_training` is the whole job behind ``python -m protext.train``: a :class:`TrainJob` in,
checkpoint, loss history and plot out. After every epoch it saves the resumable state (prompts,
optimiser, epoch, RNG states) FIRST and the checkpoint SECOND, so a kill at any instant leaves a
pair that ``--resume`` continues from; a resumed run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write, clean_stale_temps
from .checkpoint import save_prompts
from .errors import UserError
from .locks import OutputLockError, output_lock
from .models import text_fingerprint
from .presets import Settings, resolve
from .prompts import DEFAULT_CTX_INIT, PromptedTextEncoder
from .schedule import WarmupCosine
from .shared_prefix import shared_prefix_features, supports_shared_prefix

LOSSES = ("mse", "l1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")
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


class ResumeStateError(UserError, ValueError):
    """A saved training state cannot be resumed by this run; the message names the file and why."""


class TrainJobError(UserError):
    """A training job that cannot run as asked (output paths, device, classes); names the flag."""


#: another training run is writing the same ``--out`` (its lock file is held)
TrainLockError = OutputLockError


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
            optimiser stay fp32; ``fp16`` adds a gradient scaler and needs CUDA). ``auto`` is
            resolved by :func:`resolve_precision` before a config is made.
        shared_prefix: compute the positions every class prompt shares (start of text and
            context) once per batch (:func:`shared_prefix_features`); same results, faster.
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

    @classmethod
    def from_settings(cls, settings: Settings, *, seed: int = 1, precision: str = "fp32", shared_prefix: bool = True,
                      drop_last: bool = True) -> "TrainConfig":
        """The config of a resolved preset (:func:`protext.presets.resolve`)."""
        return cls(
            lr=settings.lr, epochs=settings.epochs, warmup_epochs=settings.warmup_epochs, warmup_lr=settings.warmup_lr,
            batch_size=settings.batch_size, loss=settings.loss, loss_weight=settings.loss_weight, betas=settings.betas,
            weight_decay=settings.weight_decay, seed=seed, precision=precision, shared_prefix=shared_prefix,
            drop_last=drop_last,
        )


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is fp32 on CPU and bf16 on a CUDA device that supports it (else fp32); others as given."""
    if name not in PRECISION_NAMES:
        raise TrainJobError(f"--precision must be one of {', '.join(PRECISION_NAMES)}, got '{name}'.")
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


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
        return cls(classnames, torch.tensor(index), texts)  # a non-empty list of ints: int64 already

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
        features = shared_prefix_features(encoder, classes)
    else:
        features = encoder(classes, truncate=True)
    pred = F.normalize(features.float(), dim=-1)[inverse]
    return prompt_loss(pred, targets.float(), config.loss, config.weight)


# --------------------------------------------------------------------------------------------------
# resumable state


def run_identity(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig) -> dict[str, Any]:
    """Everything a resumed run must share with the saved one for the result to be the same run.

    ``shared_prefix`` is left out: both paths compute the same thing.
    """
    hyper = config.as_dict()
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
    prompts = state.get("prompts") or {}
    if not all(torch.isfinite(t).all() for t in prompts.values()):
        raise ResumeStateError(f"{path}: the saved prompts hold non-finite values (NaN or inf); the file is corrupted.")
    return state


def _identity_diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _identity_diff(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    # the top level has no key: a state without any identity is named as such
    return [] if saved == current else [f"{prefix[:-1] or 'identity'} (saved {saved!r}, now {current!r})"]


@dataclass
class _Run:
    """The mutable pieces of one training run (what a resume state saves)."""

    encoder: PromptedTextEncoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    shuffle: torch.Generator
    identity: Optional[dict[str, Any]]
    history: list[EpochRecord] = field(default_factory=list)
    start: int = 0


def save_resume_state(path: str | os.PathLike, epochs_done: int, run: _Run) -> None:
    """Write everything needed to continue after ``epochs_done`` epochs, atomically."""
    state = {
        "format": STATE_FORMAT,
        "epoch": epochs_done,
        "prompts": run.encoder.prompt_state(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "shuffle_rng": run.shuffle.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [asdict(r) for r in run.history],
        "identity": run.identity,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _restore(run: _Run, state_path: Path, device: torch.device) -> None:
    state = load_resume_state(state_path)
    diff = _identity_diff(state.get("identity"), run.identity)
    if diff:
        raise ResumeStateError(f"{state_path}: saved by a different run; it differs in " + "; ".join(diff) + ".")
    run.encoder.load_prompt_state(state["prompts"])
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.shuffle.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.history = [EpochRecord(**record) for record in state["history"]]
    run.start = int(state["epoch"])


# --------------------------------------------------------------------------------------------------
# the loop


def _batches(n: int, config: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    size = config.batch_size
    stop = (n // size) * size if config.drop_last and n >= size else n
    return [order[i : min(i + size, stop)] for i in range(0, stop, size)]


def _check_inputs(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig, data: Optional[torch.Tensor]) -> None:
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
        on_state_saved: called after each epoch's state is saved (:func:`run_training` writes the
            checkpoint there, so the state is never older than the checkpoint).
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
    loss_fn = batch_loss or fast_batch_loss  # looked up now, so a patched module function is used
    encoder.train()
    for epoch in range(run.start, config.epochs):
        record = _epoch(run, epoch, pairs, data, config, loss_fn, progress)
        run.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, encoder, run.history)
        if state_path is not None:
            save_resume_state(state_path, epoch + 1, run)
        if on_state_saved is not None:
            on_state_saved(record, encoder, run.history)
    encoder.eval()
    return TrainResult(run.history, run.start)


# --------------------------------------------------------------------------------------------------
# history and plot


def write_history(path: Path, history: Sequence[EpochRecord], status: str, extra: Mapping[str, Any]) -> None:
    """The loss history as JSON (atomically): per-epoch loss and rate, and every step's loss."""
    payload = {
        "status": status,
        **extra,
        "epochs": [
            {"epoch": r.epoch + 1, "lr": r.lr, "loss": r.loss, "steps": r.steps, "seconds": round(r.seconds, 3)}
            for r in history
        ],
        "step_losses": [r.step_losses for r in history],
    }
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def plot_history(path: Path, history: Sequence[EpochRecord], title: str) -> None:
    """A loss-curve PNG (atomically): every step's loss, epoch means, the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    xs, ys = [], []
    for r in history:
        xs += [r.epoch + (i + 1) / r.steps for i in range(r.steps)]
        ys += r.step_losses
    ax.plot(xs, ys, lw=0.8, alpha=0.6, label="step loss")
    ax.plot([r.epoch + 1 for r in history], [r.loss for r in history], "o-", ms=3, label="epoch mean")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="loss")
    ax.set_title(title, fontsize=9)
    lr_ax = ax.twinx()
    if history:
        edges = [r.epoch for r in history] + [history[-1].epoch + 1]
        lr_ax.step(edges, [r.lr for r in history] + [history[-1].lr], where="post", color="gray", lw=0.8)
    lr_ax.set_ylabel("learning rate", color="gray")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the job: TrainJob in, checkpoint + history + plot out


@dataclass
class TrainJob:
    """One ``python -m protext.train`` run, as data.

    Attributes:
        descriptions: the JSONL description file (``protext.descriptions``).
        preset: a published preset (``text_only/dtd``...), or None for the defaults of ``cross_dataset``.
        classes: a class-list spec (:func:`protext.classlists.read_classes`), or None: every class
            of the description file, in file order.
        split: ``all``/``base``/``novel`` of ``classes`` (None: the preset's).
        overrides: preset values to replace, keyed as :data:`protext.presets.OVERRIDABLE`.
        out: the checkpoint (``.safetensors``); None: ``checkpoints/<descriptions stem>.safetensors``.
        cache_dir: the target cache directory (None: :func:`protext.targets.default_cache_dir`).
        use_cache: False computes every target without touching the cache.
        resume / overwrite: continue the run saved beside ``out`` / replace it.
        model, pretrained, device, precision, seed: as the command-line flags.
        shared_prefix, keep_last_batch: speed path and the published drop-last rule.
    """

    descriptions: str | os.PathLike
    preset: Optional[str] = None
    classes: Optional[str] = None
    split: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    out: Optional[str | os.PathLike] = None
    cache_dir: Optional[str | os.PathLike] = None
    use_cache: bool = True
    resume: bool = False
    overwrite: bool = False
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 1
    shared_prefix: bool = True
    keep_last_batch: bool = False

    def settings(self) -> Settings:
        """The preset with this job's overrides (and ``split``) applied."""
        return resolve(self.preset, {**self.overrides, "split": self.split})

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path("checkpoints") / f"{Path(self.descriptions).stem}.safetensors"


@dataclass
class TrainOutcome:
    """What :func:`run_training` did.

    Attributes:
        checkpoint: the checkpoint path (written unless no epoch finished).
        files: every file of the run: ``checkpoint``, ``history``, ``plot``, ``state``.
        history: every epoch's record, resumed ones included.
        status: ``complete``, or ``stopped: ...`` when the loss stopped being finite.
        message: one line for the user about a stopped run (what was kept, what to try).
        resumed_from: epochs found done in the resume state (0 for a fresh run).
        samples, classes: what was trained on.
        seconds: wall time of the training loop.
    """

    checkpoint: Path
    files: dict[str, Path]
    history: list[EpochRecord]
    status: str
    message: str = ""
    resumed_from: int = 0
    samples: int = 0
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss if self.history else float("nan")


def side_paths(out: Path) -> dict[str, Path]:
    """The files of a run: the checkpoint and, beside it, history, plot and resume state."""
    stem = out.with_suffix("")
    return {
        "checkpoint": out,
        "history": Path(f"{stem}.loss.json"),
        "plot": Path(f"{stem}.loss.png"),
        "state": Path(f"{stem}.resume.pt"),
    }


def run_lock(out: str | os.PathLike) -> ContextManager[None]:
    """Hold the exclusive writer lock of the training run writing ``out``, for the whole run.

    A second run on the same ``--out`` fails at once with :class:`TrainLockError` (naming the lock
    file, ``NAME.lock`` beside ``out``) instead of both writing the checkpoint and its resume state.
    Not a lock on the checkpoint itself: that is replaced by a rename after every epoch. The lock is
    ``flock`` (:func:`protext.locks.output_lock`), which the kernel releases when a run dies, even by
    SIGKILL, so a killed run never blocks the next one. Reentrant: ``python -m protext.train`` takes
    it before importing torch and :func:`run_training` takes it again for library callers.
    """
    return output_lock(out, flag="--out", writer="training run")


@dataclass
class ClassSelection:
    """Descriptions keyed by the class names the prompts will use, and what was left out."""

    descriptions: dict[str, list[str]]
    missing: list[str]  # selected classes with no description
    dropped: list[str]  # description classes not selected
    merged: list[str]  # duplicate selected names merged


def select_classes(descriptions: Mapping[str, list[str]], wanted: Optional[Sequence[str]]) -> ClassSelection:
    """Match the wanted class names (None: all, in file order) to the description file's classes.

    Names match case-insensitively with ``_`` as a space; the prompts use the wanted spelling.
    """
    from .descriptions import match_classnames, normalize_classname

    if wanted is None:
        return ClassSelection(dict(descriptions), [], [], [])
    unique: dict[str, str] = {}
    merged = []
    for name in wanted:
        key = normalize_classname(name)
        if key in unique:
            merged.append(name)
        else:
            unique[key] = name
    match = match_classnames(list(descriptions), list(unique.values()))
    selected = {name: descriptions[match.mapping[name]] for name in unique.values() if name in match.mapping}
    return ClassSelection(selected, match.missing, match.unused, merged)


MAX_LISTED = 40


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_output_paths(job: TrainJob, paths: Mapping[str, Path]) -> None:
    """Every output path can be written and replaces no input; nothing is created. Needs no torch."""
    from .preflight import check_output_dir, check_output_file
    from .targets import default_cache_dir

    if job.resume and job.overwrite:
        raise TrainJobError("--resume and --overwrite contradict each other; pick one.")
    inputs = [("--descriptions", job.descriptions), ("--classes", job.classes)]
    check_output_file(paths["checkpoint"], "--out", inputs, suffix=".safetensors")
    for name in ("history", "plot", "state"):
        check_output_file(paths[name], f"--out (its {name} file)", inputs)
    if job.use_cache:
        check_output_dir(job.cache_dir or default_cache_dir(), "--cache-dir")


def _check_outputs(job: TrainJob, paths: Mapping[str, Path]) -> bool:
    """Pre-flight of every output; return whether the run resumes. Run under :func:`run_lock`, so
    what it finds on disk cannot change before the run writes."""
    from .targets import default_cache_dir

    check_output_paths(job, paths)
    out, state = paths["checkpoint"], paths["state"]
    if job.use_cache:
        clean_stale_temps(job.cache_dir or default_cache_dir())
    clean_stale_temps(out.parent)
    resuming = job.resume and state.is_file()
    if job.overwrite or resuming:
        return resuming
    if out.exists() and state.is_file():
        raise TrainJobError(f"--out {out} already exists with its resume state; pass --resume to continue that run or --overwrite to replace it.")
    if out.exists() and job.resume:
        raise TrainJobError(f"--out {out} already exists but has no resume state {state.name} beside it, so there is nothing to resume; pass --overwrite to replace it.")
    if out.exists():
        raise TrainJobError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out.")
    if state.is_file():
        raise TrainJobError(f"--out {out}: {state} holds an interrupted run; pass --resume to continue it or --overwrite to start afresh.")
    return False


def _checkpoint_metadata(path: Path) -> Optional[dict[str, Any]]:
    """The JSON-decoded metadata of a safetensors checkpoint, read from its header alone (no
    tensors, no torch); None when the file is unreadable or not safetensors (the resume state's own
    identity check still guards the run then)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 100 * 1024 * 1024:  # a header, not a whole file read by mistake
                return None
            header = json.loads(fh.read(size).decode("utf-8"))
        return {k: json.loads(v) for k, v in (header.get("__metadata__") or {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_resume_inputs(job: TrainJob, paths: Mapping[str, Path], resuming: bool) -> None:
    """A resumed run reads the same description file and class selection as the run it continues.

    Checked against the checkpoint's metadata before the model loads or any target is encoded, so a
    changed ``--descriptions`` file or other ``--classes``/``--split`` is one line naming the flag,
    not a mismatch found after minutes of work. (The resume state's identity, checked when training
    starts, covers the window before the first checkpoint exists.)
    """
    if not resuming or not paths["checkpoint"].is_file():
        return
    meta = _checkpoint_metadata(paths["checkpoint"])
    if not meta:
        return
    out = paths["checkpoint"]
    way_out = "resume with the inputs it started with, or pass --overwrite to start afresh"
    saved_hash = meta.get("descriptions_sha256")
    if saved_hash and Path(job.descriptions).is_file() and file_sha256(job.descriptions) != saved_hash:
        raise ResumeStateError(
            f"--resume: --descriptions {job.descriptions} is not the file the run in {out} started with "
            f"(that was {meta.get('descriptions')!r}, with other content); {way_out}."
        )
    saved_classes = meta.get("classes")
    if isinstance(saved_classes, list) and Path(job.descriptions).is_file():
        from .classlists import read_classes, split_classes
        from .descriptions import read_descriptions

        split = job.settings().split
        with warnings.catch_warnings():  # the run reads the files again and warns then, once
            warnings.simplefilter("ignore")
            wanted = split_classes(read_classes(job.classes), split) if job.classes else None
            selection = select_classes(read_descriptions(job.descriptions), wanted)
        now = [name for name, texts in selection.descriptions.items() if texts]
        if now != saved_classes:
            gone = [c for c in saved_classes if c not in now]
            new = [c for c in now if c not in saved_classes]
            change = f"{len(gone)} classes gone ({_listing(gone)}), {len(new)} new ({_listing(new)})" if gone or new else "another class order"
            raise ResumeStateError(
                f"--resume: --classes/--split select other classes than the run in {out} started with: {change}; "
                f"{way_out}."
            )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainJobError(f"--device '{name}': not a torch device (cpu, cuda, cuda:N, auto).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainJobError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def _config(job: TrainJob, settings: Settings, device: torch.device) -> TrainConfig:
    precision = resolve_precision(job.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise TrainJobError("--precision fp16 needs CUDA (gradient-scaled fp16 autocast); use bf16 or fp32 on CPU.")
    if settings.trains_nothing:
        warnings.warn(
            f"--epochs {settings.epochs} is not more than the {settings.warmup_epochs} warm-up epochs (--epochs includes "
            f"the warm-up): every epoch runs at the warm-up rate {settings.warmup_lr:g}, the schedule never reaches "
            f"--lr {settings.lr:g}, and the prompts barely move. Pass --epochs {settings.warmup_epochs + 1} or more, "
            "or a smaller --warmup-epochs.",
            stacklevel=3,
        )
    return TrainConfig.from_settings(
        settings, seed=job.seed, precision=precision, shared_prefix=job.shared_prefix, drop_last=not job.keep_last_batch
    )


def _read_samples(job: TrainJob, settings: Settings, say: Callable[[str], None]) -> tuple[TextPairs, ClassSelection]:
    """The selected classes' descriptions as training samples; notes on what was left out."""
    from .classlists import read_classes, split_classes
    from .descriptions import read_descriptions

    path = Path(job.descriptions)
    if not path.is_file():
        raise TrainJobError(f"--descriptions {path}: no such file.")
    descriptions = read_descriptions(path)
    if not descriptions:
        raise TrainJobError(
            f"--descriptions {path}: the file holds no descriptions. Generate some with 'python -m protext.gen_descriptions' "
            "or import a CuPL JSON with 'python -m protext.gen_descriptions import FILE.json --out FILE.jsonl'."
        )
    if settings.split != "all" and not job.classes:
        raise TrainJobError(
            f"--split {settings.split} needs --classes with the dataset's class names in label order (e.g. "
            "../shared/classnames/dtd.json or a CoOp split_zhou_*.json); the description file's own class order is not "
            "the label order."
        )
    if job.classes and not Path(job.classes).exists() and str(job.classes).lower() != "imagenet":
        raise TrainJobError(f"--classes {job.classes}: no such file.")
    wanted = split_classes(read_classes(job.classes), settings.split) if job.classes else None
    selection = select_classes(descriptions, wanted)
    _report_selection(selection, descriptions, path, settings.split, say)
    if not selection.descriptions:
        raise TrainJobError(f"none of the selected classes has descriptions in {path}; nothing to train on.")
    pairs = TextPairs.from_descriptions(selection.descriptions)
    say(f"{len(pairs)} descriptions of {len(pairs.classnames)} classes from {path}")
    return pairs, selection


def _report_selection(selection: ClassSelection, descriptions: Mapping[str, list[str]], path: Path, split: str,
                      say: Callable[[str], None]) -> None:
    if selection.merged:
        say(f"note: {len(selection.merged)} duplicate class names in --classes merged: {_listing(selection.merged)}")
    if selection.dropped:
        n_texts = sum(len(descriptions[c]) for c in selection.dropped)
        say(
            f"note: {len(selection.dropped)} classes of {path} are not among the selected classes "
            f"(--classes{'/--split' if split != 'all' else ''}); their {n_texts} descriptions are dropped: "
            f"{_listing(selection.dropped)}"
        )
    if selection.missing:
        warnings.warn(
            f"{len(selection.missing)} selected classes have no descriptions in {path} and are not trained on: "
            f"{_listing(selection.missing)}",
            stacklevel=3,
        )


def _load_model(job: TrainJob, device: torch.device):
    from .models import load_clip

    return load_clip(job.model, job.pretrained, device=device)


def _build_encoder(clip, pairs: TextPairs, settings: Settings, job: TrainJob, seed: int) -> PromptedTextEncoder:
    from .text_tower import text_tower

    tower = text_tower(clip.model)
    if settings.depth > tower.depth:
        raise TrainJobError(
            f"--depth {settings.depth}: {clip.name}'s text tower has only {tower.depth} blocks; pass --depth {tower.depth} or less."
        )
    torch.manual_seed(seed)  # the prompt initialisation, identical on resume
    try:
        return PromptedTextEncoder(
            clip.model, clip.tokenizer, pairs.classnames, settings.n_ctx, settings.depth, settings.ctx_init,
            settings.template, replaces=settings.ctx_init or DEFAULT_CTX_INIT,
        )
    except ValueError as err:
        raise TrainJobError(f"--ctx-init/--n-ctx: {err}") from None


def _targets(job: TrainJob, clip, pairs: TextPairs, progress: bool, say: Callable[[str], None]) -> torch.Tensor:
    from .targets import description_targets

    labels = [pairs.classnames[i] for i in pairs.class_index.tolist()]
    targets, stats = description_targets(
        clip.model, clip.tokenizer, pairs.texts, cache_dir=job.cache_dir, use_cache=job.use_cache, progress=progress,
        labels=labels,
    )
    where = f" (cache {stats.cache_file})" if stats.cache_file else ""
    say(f"targets: {stats.unique} distinct descriptions, {stats.cached} cached, {stats.computed} encoded{where}")
    return targets


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata(job: TrainJob, settings: Settings, config: TrainConfig, clip, encoder: PromptedTextEncoder,
              pairs: TextPairs, selection: ClassSelection, device: torch.device) -> dict[str, Any]:
    return {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "text_tower_fingerprint": text_fingerprint(clip.model),
        "classes": pairs.classnames,
        "classes_without_descriptions": selection.missing,
        "split": settings.split,
        "classes_file": str(job.classes) if job.classes else None,
        "preset": settings.preset,
        "preset_values": settings.preset_values,
        "hyperparameters": {
            **config.as_dict(), "n_ctx": settings.n_ctx, "depth": settings.depth, "ctx_init": encoder.ctx_init,
            "template": encoder.template, "device": str(device),
        },
        "descriptions": str(job.descriptions),
        "descriptions_sha256": file_sha256(job.descriptions),
        "samples": len(pairs),
        "protext_version": __version__,
    }


def run_training(job: TrainJob, *, clip=None, progress: bool = True, report: Optional[Callable[[str], None]] = None) -> TrainOutcome:
    """Run a training job: check outputs, read descriptions, encode targets, train, save.

    Every output is checked before the model loads. After each epoch the resume state is written,
    then the checkpoint (metadata: model, weights fingerprint, classes, preset, hyper-parameters,
    description hash, final loss); at the end the loss history (JSON) and plot (PNG). ``clip`` is a
    loaded :class:`protext.models.LoadedClip` to use instead of loading ``job.model``. ``report``
    receives progress lines (default: stderr); problems worth a warning go through ``warnings``.

    Raises:
        UserError: bad input (flags, files, a resume state of another run), before any long work.
    """
    settings = job.settings()
    paths = side_paths(job.out_path())
    check_output_paths(job, paths)  # before the lock creates the folder: a bad --out creates nothing
    with run_lock(paths["checkpoint"]):
        return _run_locked(job, settings, paths, clip, progress, report or _stderr)


def _run_locked(job: TrainJob, settings: Settings, paths: dict[str, Path], clip, progress: bool,
                say: Callable[[str], None]) -> TrainOutcome:
    """:func:`run_training` once this run holds the lock of its ``--out``."""
    resuming = _check_outputs(job, paths)
    check_resume_inputs(job, paths, resuming)
    device = _resolve_device(job.device)
    config = _config(job, settings, device)
    pairs, selection = _read_samples(job, settings, say)
    clip = clip or _load_model(job, device)
    encoder = _build_encoder(clip, pairs, settings, job, config.seed)
    targets = _targets(job, clip, pairs, progress, say)
    meta = _metadata(job, settings, config, clip, encoder, pairs, selection, device)
    say(
        f"{'resuming' if resuming else 'training'}: {clip.identity}, n_ctx {settings.n_ctx}, depth {settings.depth}, "
        f"{config.epochs} epochs, lr {config.lr}, batch {config.batch_size}, {config.loss} x {config.weight:g}, "
        f"{device}/{config.precision} -> {paths['checkpoint']}"
    )
    outcome = _train_and_save(encoder, pairs, config, targets, meta, paths, resuming, progress)
    outcome.samples, outcome.classes = len(pairs), list(pairs.classnames)
    return outcome


def _train_and_save(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig, targets: torch.Tensor,
                    meta: dict[str, Any], paths: dict[str, Path], resume: bool, progress: bool) -> TrainOutcome:
    out = paths["checkpoint"]
    written: list[int] = []

    def save_checkpoint(record: EpochRecord, enc: PromptedTextEncoder, history: list[EpochRecord]) -> None:
        done = record.epoch + 1
        save_prompts(out, enc, {**meta, "epochs_done": done, "complete": done == config.epochs, "final_loss": record.loss})
        written.append(done)

    title = f"{out.name}: {meta['model']}/{meta['pretrained']}, n_ctx {encoder.n_ctx}, depth {encoder.depth}, lr {config.lr}"
    extra = {"checkpoint": str(out), "descriptions": meta["descriptions"]}
    began = time.perf_counter()
    try:
        result = train(encoder, pairs, config, targets=targets, state_path=paths["state"], resume=resume,
                       on_state_saved=save_checkpoint, progress=progress)
    except ResumeStateError as err:
        raise ResumeStateError(f"--resume: {err} Start afresh with --overwrite.") from None
    except NonFiniteLossError as err:
        return _stopped(err, config, paths, extra, title, saved_any=bool(written) or resume)
    if not written and result.epochs_done:  # resumed after the last state, before (or after) its checkpoint
        save_checkpoint(result.history[-1], encoder, result.history)
    write_history(paths["history"], result.history, "complete", {**extra, "final_loss": result.final_loss})
    plot_history(paths["plot"], result.history, title)
    return TrainOutcome(out, paths, result.history, "complete", resumed_from=result.resumed_from,
                        seconds=time.perf_counter() - began)


def _stopped(err: NonFiniteLossError, config: TrainConfig, paths: dict[str, Path], extra: dict[str, Any], title: str,
             saved_any: bool) -> TrainOutcome:
    out = paths["checkpoint"]
    status = f"stopped: loss {err.value} at epoch {err.epoch + 1}, step {err.step + 1}"
    if err.history:
        write_history(paths["history"], err.history, status, extra)
        plot_history(paths["plot"], err.history, title)
    if err.history and saved_any:
        last = err.history[-1]
        kept = f"The last good checkpoint (after epoch {last.epoch + 1}, loss {last.loss:.6g}) is kept at {out}."
    elif out.exists():
        kept = f"No epoch finished, so nothing was saved; {out} is left as it was."
    else:
        kept = "No epoch finished, so no checkpoint was written."
    hint = "a lower --lr" + (" or --precision fp32" if config.precision != "fp32" else "")
    message = f"{err}; training stopped. {kept} Try {hint}."
    return TrainOutcome(out, paths, list(err.history), status, message)
