"""ProText's learning-rate schedule (ALGORITHMS.md §3): constant warm-up, then cosine, per epoch.

``lr(e) = warmup_lr`` for ``e < W``, else ``base · ½ · (1 + cos(π · (e − W) / E))``. The cosine runs
over all ``E`` epochs rather than ``E − W``, so the rate never reaches zero; this is what the
published code does and is kept on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """The per-epoch learning rate of ProText training.

    Attributes:
        base_lr: the cosine's starting rate.
        epochs: total epochs ``E`` (warm-up included).
        warmup_epochs: ``W``, epochs at the constant ``warmup_lr``.
        warmup_lr: the warm-up rate (1e-5 in every published preset).
    """

    base_lr: float
    epochs: int
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup epochs must be >= 0, got {self.warmup_epochs}.")
        if self.base_lr <= 0 or self.warmup_lr <= 0:
            raise ValueError(f"learning rates must be positive (lr {self.base_lr}, warm-up lr {self.warmup_lr}).")

    def lr(self, epoch: int) -> float:
        """The rate used throughout epoch ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.epochs))

    def rates(self) -> list[float]:
        """The rate of every epoch ``0 .. E-1``."""
        return [self.lr(e) for e in range(self.epochs)]

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every parameter group to epoch ``epoch``'s rate (call once, before the epoch); return it."""
        rate = self.lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate
