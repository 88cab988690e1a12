"""What a table run is asked to do: :class:`ReproduceConfig`, its checks, and how it departs from the paper.

The first step of the pipeline: every flag of ``python -m protext.reproduce`` lands here and is
checked (:func:`validate`) before any file is read or torch is imported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

#: upper bounds only a typo exceeds: ``--workers 1000000`` would fork a million DataLoader processes
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1_000_000
#: stream orders or scenario tasks of one cell: the evaluation's own bound (protext.evaluation.config)
MAX_RUNS = 10_000
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


class ReproduceError(UserError):
    """Bad input for a table run; the one-line message names the flag, file or folder at fault."""


def slug(text: str) -> str:
    """``text`` in lower-case letters, digits and single dashes: safe in a file name on every system."""
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in keep.split("-") if part)


@dataclass
class ReproduceConfig:
    """Everything ``python -m protext.reproduce`` takes.

    ``limit``, ``epochs``, ``tta_views`` and ``depth`` shrink a run for smoke tests (or fit a small
    model); each is a departure from the published protocol and is listed as such in ``TABLE.md``.
    So are ``stream_runs`` (orders per cell instead of OGA's 100) and ``tasks`` (tasks or streams
    per cell instead of StatA's 1000 / 100), which only the protocol tables take.
    """

    table: str
    root: str
    out: Optional[str] = None
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    descriptions: Optional[str] = None
    coop: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    limit: Optional[int] = None
    epochs: Optional[int] = None
    tta_views: Optional[int] = None
    depth: Optional[int] = None
    stream_runs: Optional[int] = None
    tasks: Optional[int] = None
    seed: int = 0
    batch_size: int = 64
    workers: int = 2
    progress: bool = True

    def output_dir(self) -> Path:
        """The table's folder: ``OUT/TABLE`` (``--out``, default ``reproduction``)."""
        return Path(self.out or "reproduction") / self.table

    def prompts_dir(self) -> Path:
        """Where trained prompts live, shared by every table of ``--out`` run on the same weights
        and smoke-test caps (protext-text-only and protext-dg share text_only/imagenet, for example)."""
        key = {"model": self.model, "pretrained": self.pretrained, "epochs": self.epochs, "depth": self.depth,
               "seed": self.seed if self.pretrained == "random" else None}  # the seed is the random weights
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return Path(self.out or "reproduction") / "prompts" / f"{slug(self.model)}-{slug(Path(self.pretrained).stem)}-{digest}"

    def identity(self) -> dict[str, Any]:
        """The settings that change a cell's number: a results folder holds one identity only."""
        return {
            "table": self.table,
            "model": self.model,
            "pretrained": self.pretrained,
            "limit": self.limit,
            "epochs": self.epochs,
            "tta_views": self.tta_views,
            "depth": self.depth,
            "seed": self.seed,
            "coop": Path(self.coop).name if self.coop else None,
            # only when given: folders written before these flags existed keep their identity
            **{k: v for k, v in (("stream_runs", self.stream_runs), ("tasks", self.tasks)) if v is not None},
        }

    def departures(self, trains: bool = True) -> list[str]:
        """How this run's own flags depart from the published protocol (empty for a faithful run);
        ``trains``: whether the table trains prompts (else --epochs and --depth change nothing)."""
        out = []
        if (self.model, self.pretrained) != ("ViT-B-16", "openai"):
            out.append(f"model {self.model} / weights {self.pretrained} (published: ViT-B-16 / openai)")
        if self.limit is not None:
            out.append(f"--limit {self.limit}: only the first {self.limit} test images of each cell")
        if self.epochs is not None and trains:
            out.append(f"--epochs {self.epochs}: every preset trained for {self.epochs} epochs, not its own")
        if self.tta_views is not None:
            out.append(f"--tta-views {self.tta_views}: test-time adaptation on {self.tta_views} views, not 64")
        if self.depth is not None and trains:
            out.append(f"--depth {self.depth}: prompts {self.depth} blocks deep, not 9 (for text towers with fewer blocks)")
        if self.stream_runs is not None:
            out.append(f"--stream-runs {self.stream_runs}: {self.stream_runs} stream orders per cell, not OGA's 100")
        if self.tasks is not None:
            out.append(f"--tasks {self.tasks}: {self.tasks} tasks or streams per scenario cell, not StatA's 1000 / 100")
        return out


def check_run_counts(config: ReproduceConfig) -> None:
    """``--stream-runs`` and ``--tasks``: in range, and only for a table whose cells replay orders or a scenario."""
    from ..protocols import get_protocol  # torch-free

    rows = [row.runs for row in get_protocol(config.table).rows if row.runs is not None]
    for flag, value, takes in (("--stream-runs", config.stream_runs, [r for r in rows if r.stream_runs]),
                               ("--tasks", config.tasks, [r for r in rows if r.scenario])):
        if value is None:
            continue
        if not 1 <= value <= MAX_RUNS:
            raise ReproduceError(f"{flag} must be between 1 and {MAX_RUNS}, got {value}.")
        if not takes:
            what = "stream orders (oga-runs)" if flag == "--stream-runs" else "a StatA scenario (stata)"
            raise ReproduceError(f"{flag} applies to tables whose cells replay {what}; {config.table} has none: drop it.")


def validate(config: ReproduceConfig) -> None:
    """Refuse bad flags and an unusable output folder, before any file is read or torch imported.

    Raises:
        ReproduceError: a count out of range, a missing ``--root``, or an ``--out`` that is a file
            or cannot be written (named as the user gave it).
    """
    caps = (("--limit", config.limit), ("--epochs", config.epochs), ("--tta-views", config.tta_views), ("--depth", config.depth))
    for flag, value in caps:
        if value is not None and value < 1:
            raise ReproduceError(f"{flag} must be at least 1, got {value}.")
    check_run_counts(config)
    if config.depth is not None:  # a given --depth above the tower: the one rule, before any weights load
        from ..architectures import fit_prompts, text_tower_shape

        shape = text_tower_shape(config.model)
        if shape is not None:
            fit_prompts(shape, 1, config.depth, depth_given=True)
    if not 0 <= config.workers <= MAX_WORKERS:
        raise ReproduceError(f"--workers must be between 0 and {MAX_WORKERS} (DataLoader processes), got {config.workers}.")
    if not 1 <= config.batch_size <= MAX_BATCH_SIZE:
        raise ReproduceError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {config.batch_size}.")
    if not SEED_RANGE[0] <= config.seed <= SEED_RANGE[1]:
        raise ReproduceError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {config.seed}.")
    if not Path(config.root).is_dir():
        raise ReproduceError(f"--root {config.root}: no such folder (the folder holding the datasets).")
    from ..preflight import check_output_dir

    # --out itself, not only OUT/TABLE: a file there, or a read-only place, is named as the user gave it
    check_output_dir(config.out or "reproduction", "--out")
