"""Everything a run checks before the model loads: its outputs, its writer lock, that a resumed run
reads the inputs it started with, and that the prompts fit the model's text tower (a preset's depth
fitted to it, a depth the user gave refused when too deep).

Bad input here is one line naming the flag, found in seconds rather than after minutes of loading
and encoding.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional

from ..architectures import PromptFitError, TowerShape, fit_prompts, text_tower_shape
from ..atomic import clean_stale_temps
from ..digests import file_sha256
from ..locks import OutputLockError, output_lock
from ..presets import Settings
from .config import TrainJobError
from .job import TrainJob
from .resume import ResumeStateError
from .selection import _listing, select_classes

#: another training run is writing the same ``--out`` (its lock file is held)
TrainLockError = OutputLockError


def run_lock(out: str | os.PathLike) -> ContextManager[None]:
    """Hold the exclusive writer lock of the training run writing ``out``, for the whole run.

    A second run on the same ``--out`` fails at once with :class:`TrainLockError` (naming the lock
    file, ``NAME.lock`` beside ``out``) instead of both writing the checkpoint and its resume state.
    Not a lock on the checkpoint itself: that is replaced by a rename after every epoch. The lock is
    ``flock`` (:func:`protext.locks.output_lock`), which the kernel releases when a run dies, even by
    SIGKILL, so a killed run never blocks the next one. Reentrant: ``python -m protext.train`` takes
    it before importing torch and :func:`protext.training.run_training` takes it again for library callers.
    """
    return output_lock(out, flag="--out", writer="training run")


def check_output_paths(job: TrainJob, paths: Mapping[str, Path]) -> None:
    """Every output path can be written and replaces no input; nothing is created. Needs no torch."""
    from ..preflight import check_output_dir, check_output_file
    from ..targets import default_cache_dir

    if job.resume and job.overwrite:
        raise TrainJobError("--resume and --overwrite contradict each other; pick one.")
    inputs = [("--descriptions", job.descriptions), ("--classes", job.classes)]
    check_output_file(paths["checkpoint"], "--out", inputs, suffix=".safetensors")
    for name in ("history", "plot", "state"):
        check_output_file(paths[name], f"--out (its {name} file)", inputs)
    if job.use_cache:
        check_output_dir(job.cache_dir or default_cache_dir(), "--cache-dir")


def check_outputs(job: TrainJob, paths: Mapping[str, Path]) -> bool:
    """Pre-flight of every output; return whether the run resumes. Run under :func:`run_lock`, so
    what it finds on disk cannot change before the run writes."""
    from ..targets import default_cache_dir

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
        from ..classlists import read_classes, split_classes
        from ..descriptions import read_descriptions

        split = job.settings().split
        with warnings.catch_warnings():  # the run reads the files again and warns then, once
            warnings.simplefilter("ignore")
            classes = job.class_list()
            wanted = split_classes(read_classes(classes), split) if classes else None
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


def fit_prompts_to_tower(job: TrainJob, settings: Settings,
                         shape: Optional[TowerShape] = None) -> tuple[Settings, Optional[str]]:
    """The settings with a depth the text tower holds, and the line to print when it was adapted.

    The rule is :func:`protext.architectures.fit_prompts`: the preset's depth above the tower's
    blocks becomes the block count (one line says so); a ``depth`` the job sets above them, or an
    ``n_ctx`` the context cannot hold, is refused. ``shape`` is a loaded model's tower; None reads
    ``job.model``'s config file, so that this is decided before any weights load (an architecture
    without a config file here is fitted once loaded). No shape known: the settings as they are.

    Raises:
        TrainJobError: one line naming ``--depth`` or ``--n-ctx`` and the value that fits.
    """
    shape = shape or text_tower_shape(job.model)
    if shape is None:
        return settings, None
    try:
        depth, note = fit_prompts(shape, settings.n_ctx, settings.depth, depth_given=job.depth is not None)
    except PromptFitError as err:  # a job that cannot run as asked, like every other refusal of run_training
        raise TrainJobError(str(err)) from None
    return (settings if depth == settings.depth else replace(settings, depth=depth)), note
