""":class:`TTAConfig`, the Python API of one test-time adaptation run, on top of the registry.

The methods and their options are declared once, in ``protext/tta/methods/`` (:mod:`.registry`);
this class is how a Python caller names a method and its settings. The options of TPT, C-TPT, ZERO,
TDA and MTA are fields (as before the registry); every option of every method can also be passed in
``options`` under its flag's name (``options={"dmn_beta": 5.5}``). Validation, published defaults and
records all come from the registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import registry
from .methods.common import IMAGENET_FAMILY, MAX_BATCH, MAX_STEPS, MAX_VIEWS, MAX_VIEWS_IN_FLIGHT, NATURAL_SHIFTS
from .methods.ctpt import CTPT_LAMBDA
from .published import TDA_NEGATIVE, TDA_POSITIVE
from .registry import TTAConfigError, dataset_key

__all__ = [
    "CTPT_LAMBDA",
    "EPISODIC",
    "FLAGS",
    "IMAGENET_FAMILY",
    "MAX_BATCH",
    "MAX_STEPS",
    "MAX_VIEWS",
    "MAX_VIEWS_IN_FLIGHT",
    "METHODS",
    "NATURAL_SHIFTS",
    "TDA_NEGATIVE",
    "TDA_POSITIVE",
    "TTAConfig",
    "TTAConfigError",
    "dataset_key",
]

METHODS: tuple[str, ...] = registry.names()
EPISODIC: frozenset[str] = frozenset(name for name in METHODS if not registry.get(name).online)
"""Methods that treat every image on its own (the online ones carry state from image to image)."""

#: the command-line spelling of each :class:`TTAConfig` field
FLAGS: dict[str, str] = {
    "method": "--tta",
    "views": "--tta-views",
    "selection": "--tta-selection",
    "steps": "--tta-steps",
    "lr": "--tta-lr",
    "tune": "--tta-tune",
    "ctpt_lambda": "--ctpt-lambda",
    "tda_alpha": "--tda-alpha",
    "tda_beta": "--tda-beta",
    "zero_votes": "--zero-votes",
    "augmix": "--augmix",
    "batch": "--tta-batch",
    "naive": "--tta-naive",
    "fp16": "--precision fp16",
}
_OPTION_FIELDS = [name for name in FLAGS if name not in ("method", "fp16")]


@dataclass
class TTAConfig:
    """Settings of one test-time adaptation run; ``None`` (or the field's default) means the
    method's published default.

    Attributes:
        method: one of :data:`METHODS`.
        views: views per image, view 0 included (published per method and dataset).
        selection: fraction of views kept by confidence (TPT/C-TPT/TDA 0.1, ZERO 0.3; MTA has none).
        steps: AdamW steps per image (prompt tuners and TPS; default 1).
        lr: AdamW learning rate (prompt tuners and TPS).
        tune: ``all`` (context and deep prompts) or ``shallow`` (context only) (prompt tuners).
        ctpt_lambda: C-TPT's λ (default 50, or 20 on ImageNet-A/-V2/-R/-Sketch).
        tda_alpha, tda_beta: TDA's and BoostAdapter's positive-cache (α⁺, β⁺).
        zero_votes: ``hard`` (ε → 0) or ``fp16`` (the published fp16 runs' soft votes, ε = 2⁻¹⁰).
        augmix: AugMix on the random views (published per method and dataset).
        batch: images adapted at once by the episodic methods (predictions equal one at a time).
        naive: refused: the published-style TPT path is a test reference now.
        fp16: fp16 autocast, with a gradient scaler for the methods that take a step, as published on GPU.
        image_dtype: precision of image encoding only (e.g. ``torch.bfloat16``); None: the model's.
        options: any other option of the method, by its flag's name (``{"dpe_align": 0.2}``).
    """

    method: str = "tpt"
    views: Optional[int] = None
    selection: Optional[float] = None
    steps: Optional[int] = None
    lr: float = 5e-3
    tune: str = "all"
    ctpt_lambda: Optional[float] = None
    tda_alpha: Optional[float] = None
    tda_beta: Optional[float] = None
    zero_votes: str = "hard"
    augmix: Optional[bool] = None
    batch: int = 1
    naive: bool = False
    fp16: bool = False
    image_dtype: Optional[torch.dtype] = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def amp(self) -> bool:
        """Deprecated name of :attr:`fp16`."""
        return self.fp16

    @property
    def online(self) -> bool:
        """Whether the method carries state from image to image (the stream order matters)."""
        return registry.get(self.method).online

    def given(self) -> dict[str, Any]:
        """The options set, by flag dest (a field at its default is not set)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _OPTION_FIELDS}
        out = {registry.dest(FLAGS[name]): getattr(self, name) for name in _OPTION_FIELDS
               if getattr(self, name) is not None and getattr(self, name) != defaults[name]}
        out.update({key: value for key, value in self.options.items() if value is not None})
        return out

    def settings(self, dataset_name: str) -> Any:
        """The method's resolved settings dataclass for ``dataset_name`` (see :func:`registry.resolve`).

        Raises:
            TTAConfigError: the first problem found, in one line naming the flag.
        """
        return registry.resolve(self.method, self.given(), registry.context(dataset_name, self.fp16))

    def validate(self, dataset_name: str) -> None:
        """Refuse bad settings with one line naming the flag; cheap, so call it before loading a model."""
        self.settings(dataset_name)

    def resolved(self, dataset_name: str) -> "TTAConfig":
        """A validated copy with every setting the method has filled in for ``dataset_name``."""
        recorded = registry.record(self.method, self.settings(dataset_name))
        fields = {name: recorded.pop(name) for name in list(recorded) if name in _OPTION_FIELDS}
        return dataclasses.replace(self, **fields, options={**self.options, **recorded})

    def record(self) -> dict:
        """The settings as plain JSON values (for results files)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}
        out.update(self.options)
        out["image_dtype"] = None if self.image_dtype is None else str(self.image_dtype).replace("torch.", "")
        return out
