"""A training job as data: :class:`TrainJob` in (what ``python -m protext.train`` parses), the files
it writes and :class:`TrainOutcome` out.

Hyper-parameters are fields of the job, as :class:`protext.evaluation.EvalConfig`'s options are;
None means the preset's value. How they merge with the preset is decided in one place,
:func:`protext.presets.resolve` (a value given wins; a new ``loss`` without ``loss_weight`` takes
that loss's published factor; ranges are checked there, each error naming its flag).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..presets import OVERRIDABLE, PresetError, Settings, get_preset, resolve
from .history import EpochRecord


@dataclass
class TrainJob:
    """One ``python -m protext.train`` run, as data.

    ``TrainJob("llm_data/dtd.jsonl", preset="text_only/dtd", depth=2, epochs=3)`` is the command
    ``--descriptions llm_data/dtd.jsonl --preset text_only/dtd --depth 2 --epochs 3``.

    Attributes:
        descriptions: the JSONL description file (``protext.descriptions``).
        preset: a published preset (``text_only/dtd``...), or None for the values of ``cross_dataset``.
        classes: a class-list spec (:func:`protext.classlists.read_classes`), or None: every class
            of the description file, in file order.
        split: ``all``/``base``/``novel`` of ``classes`` (None: the preset's).
        overrides: deprecated, the old way to pass hyper-parameters (``{"depth": 2}``); its values
            move into the fields below when the job is made, and it is left empty.
        out: the checkpoint (``.safetensors``); None: ``checkpoints/<descriptions stem>.safetensors``.
        cache_dir: the target cache directory (None: :func:`protext.targets.default_cache_dir`).
        use_cache: False computes every target without touching the cache.
        resume / overwrite: continue the run saved beside ``out`` / replace it.
        model, pretrained, device, precision, seed: as the command-line flags.
        shared_prefix, keep_last_batch: speed path and the published drop-last rule.

    Hyper-parameters (keyword only; None: the preset's, see PRESETS.md):
        n_ctx: context vectors (``--n-ctx``).
        depth: prompt depth; blocks 1..depth-1 get deep prompts (``--depth``; at most the text
            tower's block count). Left None, the preset's depth, lowered to the block count on a
            shallower tower, in one line (:func:`protext.architectures.fit_prompts`).
        ctx_init: the phrase the context starts from when ``n_ctx`` <= 4; ``"none"`` for a random
            context (``--ctx-init``).
        lr: base learning rate of the cosine schedule (``--lr``).
        epochs: total epochs, warm-up included (``--epochs``).
        warmup_epochs: epochs at the constant warm-up rate 1e-5 (``--warmup-epochs``).
        batch_size: (class, description) pairs per step (``--batch-size``).
        loss: ``mse`` or ``l1`` (``--loss``).
        loss_weight: the loss factor; None with ``loss`` given: that loss's published one (``--loss-weight``).
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
    _: KW_ONLY  # new fields are keyword only: the positional order above stays what callers knew
    n_ctx: Optional[int] = None
    depth: Optional[int] = None
    ctx_init: Optional[str] = None
    lr: Optional[float] = None
    epochs: Optional[int] = None
    warmup_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    loss: Optional[str] = None
    loss_weight: Optional[float] = None

    def __post_init__(self) -> None:
        if self.overrides:
            warnings.warn(
                "TrainJob(overrides=...) is deprecated: pass hyper-parameters as fields, e.g. TrainJob(..., depth=2, "
                "epochs=3).",
                DeprecationWarning,
                stacklevel=3,  # __post_init__ <- the generated __init__ <- the caller
            )
            self._take_overrides(self.overrides)
            self.overrides = {}  # folded in: dataclasses.replace() must not apply them a second time

    def _take_overrides(self, overrides: dict[str, Any]) -> None:
        """Move the deprecated dict's values into the fields; the same key given both ways must agree."""
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:  # the message resolve() gave when the dict reached it
            raise PresetError(f"cannot override {', '.join(unknown)}; overridable: {', '.join(OVERRIDABLE)}.")
        for key, value in overrides.items():
            current = getattr(self, key)
            if value is None:
                continue  # None meant "the preset's" in the dict too
            if current is not None and current != value:
                raise TypeError(f"TrainJob: {key} given twice, {key}={current!r} and overrides[{key!r}]={value!r}; "
                                f"pass it once, as {key}=.")
            setattr(self, key, value)

    def hyperparameters(self) -> dict[str, Any]:
        """The values this job sets, keyed as :data:`protext.presets.OVERRIDABLE` (None: the preset's)."""
        return {key: getattr(self, key) for key in OVERRIDABLE}

    def settings(self) -> Settings:
        """The preset with this job's hyper-parameters (and ``split``) applied."""
        return resolve(self.preset, self.hyperparameters())

    def class_list(self) -> Optional[str | os.PathLike]:
        """The class list the run reads: ``classes``; without it, for a ``base``/``novel`` split under a
        preset, the preset's dataset by name (its label-ordered list ships with the package); else
        None (every class of the description file)."""
        if self.classes:
            return self.classes
        if self.preset and self.settings().split != "all":
            return get_preset(self.preset).dataset
        return None

    def out_path(self) -> Path:
        """The checkpoint path (``out``, or the default named after the description file)."""
        return Path(self.out) if self.out else Path("checkpoints") / f"{Path(self.descriptions).stem}.safetensors"


@dataclass
class TrainOutcome:
    """What :func:`protext.training.run_training` did.

    Attributes:
        checkpoint: the checkpoint path (written unless no epoch finished).
        files: every file of the run: ``checkpoint``, ``history``, ``plot``, ``state``.
        history: every epoch's record, resumed ones included.
        status: ``complete``, or ``stopped: ...`` when the loss stopped being finite.
        message: one line for the user about a stopped run (what was kept, what to try).
        resumed_from: epochs found done in the resume state (0 for a fresh run).
        samples, classes: what was trained on.
        seconds: wall time of the training loop.
        settings: the settings the run trained with (the preset's depth fitted to the text tower);
            None when it stopped before.
        depth_note: the line that said the preset's depth was lowered to the tower's, or None.
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
    settings: Optional[Settings] = None
    depth_note: Optional[str] = None

    @property
    def complete(self) -> bool:
        """Every epoch ran with a finite loss."""
        return self.status == "complete"

    @property
    def final_loss(self) -> float:
        """The last epoch's mean loss (NaN before any epoch)."""
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
