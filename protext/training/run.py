"""The whole job behind ``python -m protext.train``: :class:`TrainJob` in, checkpoint, loss history
and plot out.

The steps, in order: check the outputs and take the writer lock; check a resumed run's inputs and
fit the prompts to the model (from its config, before any weights load: a preset's depth above the
text tower's blocks becomes the block count, in one line the run prints and the checkpoint's
metadata records as ``depth_note``); pick the device and the
precision; read the selected classes' descriptions; load the model; build the prompted encoder;
encode (or read from the cache) the description targets; train, writing after every epoch the
resume state FIRST and the checkpoint SECOND; write the history and the plot.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import __version__
from ..architectures import TowerShape
from ..checkpoint import save_prompts
from ..devices import resolve_device
from ..digests import file_sha256
from ..models import text_fingerprint
from ..presets import Settings
from ..prompts import DEFAULT_CTX_INIT, PromptedTextEncoder
from .config import TrainConfig, TrainJobError, resolve_precision
from .history import EpochRecord, plot_history, write_history
from .job import TrainJob, TrainOutcome, side_paths
from .loop import NonFiniteLossError, _seam, train
from .pairs import TextPairs
from .preflight import check_output_paths, check_outputs, check_resume_inputs, fit_prompts_to_tower, run_lock
from .resume import ResumeStateError
from .selection import ClassSelection, read_samples


def run_training(job: TrainJob, *, clip=None, progress: bool = True, report: Optional[Callable[[str], None]] = None) -> TrainOutcome:
    """Run a training job: check outputs, read descriptions, encode targets, train, save.

    Every output is checked before the model loads. After each epoch the resume state is written,
    then the checkpoint (metadata: model, weights fingerprint, classes, preset, hyper-parameters,
    description hash, final loss); at the end the loss history (JSON) and plot (PNG). ``clip`` is a
    loaded :class:`protext.models.LoadedClip` to use instead of loading ``job.model``. ``report``
    receives progress lines (default: stderr); problems worth a warning go through ``warnings``.

    Raises:
        UserError: bad input (flags, files, a resume state of another run, prompts deeper or longer
            than the text tower), before any long work.
    """
    settings = job.settings()
    paths = side_paths(job.out_path())
    check_output_paths(job, paths)  # before the lock creates the folder: a bad --out creates nothing
    with run_lock(paths["checkpoint"]):
        return _run_locked(job, settings, paths, clip, progress, report or _stderr)


def _run_locked(job: TrainJob, settings: Settings, paths: dict[str, Path], clip, progress: bool,
                say: Callable[[str], None]) -> TrainOutcome:
    """:func:`run_training` once this run holds the lock of its ``--out``."""
    resuming = check_outputs(job, paths)
    check_resume_inputs(job, paths, resuming)
    settings, note = fit_prompts_to_tower(job, settings, _tower_shape(clip) if clip is not None else None)
    if note:  # the preset's depth on a shallower tower: said once, before anything loads
        say(note)
    device = resolve_device(job.device)
    config = _config(job, settings, device)
    pairs, selection = read_samples(job, settings, say)
    clip = clip or _seam("_load_model")(job, device)  # through the package: tests refuse loading there
    # again on the loaded tower: an architecture without a config file here is fitted only now
    settings, late = fit_prompts_to_tower(job, settings, _tower_shape(clip))
    if late:
        say(late)
    note = note or late
    encoder = _build_encoder(clip, pairs, settings, config.seed)
    targets = _targets(job, clip, pairs, progress, say)
    meta = _metadata(job, settings, config, clip, encoder, pairs, selection, device)
    if note:
        meta["depth_note"] = note
    say(
        f"{'resuming' if resuming else 'training'}: {clip.identity}, n_ctx {settings.n_ctx}, depth {settings.depth}, "
        f"{config.epochs} epochs, lr {config.lr}, batch {config.batch_size}, {config.loss} x {config.weight:g}, "
        f"{device}/{config.precision} -> {paths['checkpoint']}"
    )
    outcome = _train_and_save(encoder, pairs, config, targets, meta, paths, resuming, progress)
    outcome.samples, outcome.classes = len(pairs), list(pairs.classnames)
    outcome.settings, outcome.depth_note = settings, note
    return outcome


# --------------------------------------------------------------------------------------------------
# device, precision, model


def _config(job: TrainJob, settings: Settings, device: torch.device) -> TrainConfig:
    """The loop's config: the settings, the resolved precision; a warning when no epoch leaves the warm-up."""
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


def _load_model(job: TrainJob, device: torch.device):
    """``--model`` with ``--pretrained`` weights (reached through the package: a seam the tests patch)."""
    from ..models import load_clip

    return load_clip(job.model, job.pretrained, device=device)


def _tower_shape(clip) -> TowerShape:
    """The loaded model's text tower, in the terms of its config (:mod:`protext.architectures`)."""
    from ..text_tower import text_tower

    tower = text_tower(clip.model)
    return TowerShape(clip.name, tower.depth, tower.context_length)


def _build_encoder(clip, pairs: TextPairs, settings: Settings, seed: int) -> PromptedTextEncoder:
    """The prompted encoder over the pairs' classes, its prompts initialised from ``seed``."""
    torch.manual_seed(seed)  # the prompt initialisation, identical on resume
    try:
        return PromptedTextEncoder(
            clip.model, clip.tokenizer, pairs.classnames, settings.n_ctx, settings.depth, settings.ctx_init,
            settings.template, replaces=settings.ctx_init or DEFAULT_CTX_INIT,
        )
    except ValueError as err:
        raise TrainJobError(f"--ctx-init/--n-ctx: {err}") from None


# --------------------------------------------------------------------------------------------------
# targets and metadata


def _targets(job: TrainJob, clip, pairs: TextPairs, progress: bool, say: Callable[[str], None]) -> torch.Tensor:
    """Every sample's frozen description embedding, from the cache where it has them."""
    from ..targets import description_targets

    labels = [pairs.classnames[i] for i in pairs.class_index.tolist()]
    targets, stats = description_targets(
        clip.model, clip.tokenizer, pairs.texts, cache_dir=job.cache_dir, use_cache=job.use_cache, progress=progress,
        labels=labels,
    )
    where = f" (cache {stats.cache_file})" if stats.cache_file else ""
    say(f"targets: {stats.unique} distinct descriptions, {stats.cached} cached, {stats.computed} encoded{where}")
    return targets


def _metadata(job: TrainJob, settings: Settings, config: TrainConfig, clip, encoder: PromptedTextEncoder,
              pairs: TextPairs, selection: ClassSelection, device: torch.device) -> dict[str, Any]:
    """What the checkpoint records of the run (besides the epoch count and loss, added per epoch)."""
    return {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "text_tower_fingerprint": text_fingerprint(clip.model),
        "classes": pairs.classnames,
        "classes_without_descriptions": selection.missing,
        "split": settings.split,
        "classes_file": str(job.class_list()) if job.class_list() else None,
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


# --------------------------------------------------------------------------------------------------
# train, save, and report


def _train_and_save(encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig, targets: torch.Tensor,
                    meta: dict[str, Any], paths: dict[str, Path], resume: bool, progress: bool) -> TrainOutcome:
    """Train, writing the checkpoint after each epoch's state; then the history and the plot."""
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
    """The outcome of a run whose loss stopped being finite: what was kept, and what to try."""
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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
