"""Hyper-parameters of one training run and the precision it computes in.

:class:`TrainConfig` is what the loop reads (ALGORITHMS.md §3: AdamW, warm-up then cosine, MSE × 1000
or L1); it is made from a resolved preset (:meth:`TrainConfig.from_settings`) by the job, or built
directly by library callers and benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..errors import UserError
from ..presets import Settings
from ..schedule import WarmupCosine

LOSSES = ("mse", "l1")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LOSS_WEIGHT = {"mse": 1000.0, "l1": 1.0}
"""MSE × 1000 is the published default; the published L1 loss is unweighted."""


class TrainJobError(UserError):
    """A training job that cannot run as asked (output paths, device, classes); names the flag."""


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
            context) once per batch (:func:`protext.shared_prefix.shared_prefix_features`); same
            results, faster.
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
