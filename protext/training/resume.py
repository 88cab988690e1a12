"""The resumable state of a run: written after every epoch, read by ``--resume``.

After each epoch the run saves its prompts, optimiser, epoch count, RNG states and history FIRST
and the checkpoint SECOND (:mod:`protext.training.run`), so a kill at any instant leaves a pair to
continue from; a resumed run ends bit for bit where an uninterrupted one does. The state also holds
the run's identity (hyper-parameters, samples, text tower, prompt shape): a state saved by another
run is refused with what differs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write
from ..errors import UserError
from ..models import text_fingerprint
from ..prompts import PromptedTextEncoder
from .config import TrainConfig
from .history import EpochRecord
from .pairs import TextPairs

STATE_FORMAT = "protext-train-state/1"


class ResumeStateError(UserError, ValueError):
    """A saved training state cannot be resumed by this run; the message names the file and why."""


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
    """Read a state written by :func:`protext.training.train` (tensors and plain data only: ``weights_only``)."""
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
    """Every leaf where two identities differ, as ``key.path (saved X, now Y)``."""
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
    """Put the saved state into ``run``, after checking it was saved by this very run."""
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
