"""What a run leaves to read afterwards: each epoch's record, the loss history (JSON) and its plot (PNG).

Written beside the checkpoint at the end of a run, or when a run stops on a non-finite loss (then
with the epochs that finished).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import atomic_write


@dataclass
class EpochRecord:
    """Loss and learning rate of one completed epoch (``epoch`` is 0-based)."""

    epoch: int
    lr: float
    loss: float
    steps: int
    seconds: float
    step_losses: list[float] = field(default_factory=list)


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
    import matplotlib  # imported here: only the end of a run draws

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
