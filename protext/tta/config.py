"""Settings of every test-time adaptation method, with the published per-dataset defaults (TTA.md).

One :class:`TTAConfig` serves the five methods. Fields left at ``None`` take the method's and the
dataset's published default in :meth:`TTAConfig.resolved`; :meth:`TTAConfig.validate` refuses a
setting that is out of range or does not fit the method, naming the command-line flag, before any
model loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError

__all__ = [
    "CTPT_LAMBDA",
    "EPISODIC",
    "FLAGS",
    "METHODS",
    "NATURAL_SHIFTS",
    "TDA_NEGATIVE",
    "TDA_POSITIVE",
    "TTAConfig",
    "TTAConfigError",
    "ZERO_VOTES",
    "dataset_key",
]

METHODS: tuple[str, ...] = ("tpt", "ctpt", "zero", "tda", "mta")
EPISODIC: frozenset[str] = frozenset({"tpt", "ctpt", "zero", "mta"})
"""Methods that treat every image on its own (TDA carries a cache from image to image)."""
PROMPT_TUNING: frozenset[str] = frozenset({"tpt", "ctpt"})
ZERO_VOTES: tuple[str, ...] = ("hard", "fp16")
TUNE: tuple[str, ...] = ("all", "shallow")

#: the command-line spelling of each field, for error messages (``protext.evaluation`` defines them)
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

# Upper bounds: far above every published setting, and beyond what can finish on any machine (the
# views of a batch go through the image tower together). ``protext.evaluation.config`` repeats them
# so its flags are refused without importing torch; a test keeps the two equal.
MAX_VIEWS = 1024
"""Views per image (published: 64)."""
MAX_STEPS = 1000
"""Adaptation steps per image (published: 1)."""
MAX_BATCH = 1024
"""Images adapted at once."""
MAX_VIEWS_IN_FLIGHT = 16384
"""``views x batch``: 16384 images of 224x224 are 9.9 GB of fp32 pixels before the first activation."""

NATURAL_SHIFTS: frozenset[str] = frozenset({"imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"})
"""ImageNet-A/-V2/-R/-Sketch: C-TPT's λ = 20 there, TDA's 64 AugMix views."""
IMAGENET_FAMILY: frozenset[str] = NATURAL_SHIFTS | {"imagenet"}

CTPT_LAMBDA = {"default": 50.0, "natural_shift": 20.0}
"""C-TPT's λ: 50 on ImageNet and the fine-grained sets, 20 on the natural shifts (TTA.md §2)."""

TDA_POSITIVE: dict[str, tuple[float, float]] = {
    "imagenet": (2.0, 5.0),
    "imagenet_a": (2.0, 5.0),
    "imagenet_v2": (1.0, 8.0),
    "imagenet_r": (1.0, 8.0),
    "imagenet_sketch": (2.363, 7.45),
    "caltech101": (5.0, 5.0),
    "dtd": (2.0, 3.0),
    "eurosat": (4.0, 8.0),
    "fgvc_aircraft": (2.0, 2.0),
    "food101": (1.0, 1.0),
    "oxford_flowers": (1.0, 5.0),
    "oxford_pets": (2.0, 7.0),
    "stanford_cars": (1.0, 7.0),
    "sun397": (2.0, 3.0),
    "ucf101": (3.0, 8.0),
}
"""TDA's published positive-cache (α⁺, β⁺) per dataset (TTA.md §3.6)."""
TDA_NEGATIVE: tuple[float, float] = (0.117, 1.0)
"""TDA's negative-cache (α⁻, β⁻), the same everywhere."""


def dataset_key(name: str) -> str:
    """The canonical dataset name the per-dataset tables use (``ImageNet-A`` → ``imagenet_a``)."""
    # one alias table for the whole package (protext.datasets); a name it does not know (a plain
    # folder, a user's own dataset) keeps its normalised spelling and so gets no published default
    from ..datasets.catalog import DatasetError, canonical_name

    try:
        return canonical_name(name)
    except DatasetError:
        return name.strip().lower().replace("-", "_").replace(" ", "_")


class TTAConfigError(UserError, ValueError):
    """A test-time adaptation setting is out of range or does not fit the method (names the flag)."""


def _finite(value: Optional[float]) -> bool:
    return value is None or math.isfinite(value)


@dataclass
class TTAConfig:
    """Settings of one test-time adaptation run; ``None`` means the published default.

    Attributes:
        method: one of :data:`METHODS`.
        views: views per image, view 0 included (default 64; TDA: 1 on ImageNet and the
            fine-grained sets, 64 on the natural shifts).
        selection: fraction of views kept by confidence (TPT/C-TPT/TDA 0.1, ZERO 0.3; MTA has none).
        steps: AdamW steps per image (TPT/C-TPT only; default 1).
        lr: AdamW learning rate (TPT/C-TPT).
        tune: ``all`` (context and deep prompts) or ``shallow`` (context only) (TPT/C-TPT).
        ctpt_lambda: C-TPT's λ (default 50, or 20 on ImageNet-A/-V2/-R/-Sketch).
        tda_alpha, tda_beta: TDA's positive-cache (α⁺, β⁺) (default: the published pair per dataset).
        zero_votes: ``hard`` (ε → 0) or ``fp16`` (the published fp16 runs' soft votes, ε = 2⁻¹⁰).
        augmix: AugMix on the random views (default: TPT/C-TPT on every dataset but the ImageNet
            family, TDA on the natural shifts, ZERO and MTA never).
        batch: images adapted at once by the episodic methods (predictions equal one at a time).
        naive: refused: the published-style TPT path is a test reference now
            (``tests/reference/tpt_reference.py``, timed by ``benchmarks/bench_tpt.py``).
        fp16: fp16 autocast, with a gradient scaler for TPT/C-TPT (CUDA only), as published on GPU.
        image_dtype: precision of image encoding only (e.g. ``torch.bfloat16``); None: the model's.
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

    @property
    def amp(self) -> bool:
        """Deprecated name of :attr:`fp16`."""
        return self.fp16

    @property
    def online(self) -> bool:
        """Whether the method carries state from image to image (the stream order matters)."""
        return self.method not in EPISODIC

    def validate(self, dataset_name: str) -> None:
        """Refuse bad settings with one line naming the flag; cheap, so call it before loading a model.

        Raises:
            TTAConfigError: the first problem found.
        """
        if self.method not in METHODS:
            raise TTAConfigError(f"--tta must be one of {', '.join(METHODS)}, got '{self.method}'.")
        self._check_ranges()
        self._check_fit()
        if self.method == "tda" and self.tda_alpha is None and dataset_key(dataset_name) not in TDA_POSITIVE:
            raise TTAConfigError(
                f"--tta tda has no published (alpha, beta) for dataset '{dataset_name}'; "
                "pass --tda-alpha and --tda-beta (e.g. --tda-alpha 2 --tda-beta 5, ImageNet's)."
            )

    def _check_ranges(self) -> None:
        if self.views is not None and not 1 <= self.views <= MAX_VIEWS:
            raise TTAConfigError(f"--tta-views must be between 1 and {MAX_VIEWS}, got {self.views}.")
        # a comparison with NaN is false, so NaN fails the range checks below
        if self.selection is not None and not 0.0 < self.selection <= 1.0:
            raise TTAConfigError(f"--tta-selection must be in (0, 1], got {self.selection}.")
        if self.steps is not None and not 0 <= self.steps <= MAX_STEPS:
            raise TTAConfigError(f"--tta-steps must be between 0 and {MAX_STEPS}, got {self.steps}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TTAConfigError(f"--tta-lr must be a positive number, got {self.lr}.")
        if self.tune not in TUNE:
            raise TTAConfigError(f"--tta-tune must be one of {', '.join(TUNE)}, got '{self.tune}'.")
        if self.ctpt_lambda is not None and not (self.ctpt_lambda >= 0 and _finite(self.ctpt_lambda)):
            raise TTAConfigError(f"--ctpt-lambda must be a finite number >= 0, got {self.ctpt_lambda}.")
        if self.tda_alpha is not None and not (self.tda_alpha >= 0 and _finite(self.tda_alpha)):
            raise TTAConfigError(f"--tda-alpha must be a finite number >= 0, got {self.tda_alpha}.")
        if self.tda_beta is not None and not (self.tda_beta > 0 and _finite(self.tda_beta)):
            raise TTAConfigError(f"--tda-beta must be a finite number > 0, got {self.tda_beta}.")
        if self.zero_votes not in ZERO_VOTES:
            raise TTAConfigError(f"--zero-votes must be one of {', '.join(ZERO_VOTES)}, got '{self.zero_votes}'.")
        if not 1 <= self.batch <= MAX_BATCH:
            raise TTAConfigError(f"--tta-batch must be between 1 and {MAX_BATCH}, got {self.batch}.")
        views = 64 if self.views is None else self.views  # the published count when unset
        if views * self.batch > MAX_VIEWS_IN_FLIGHT:
            raise TTAConfigError(
                f"--tta-batch {self.batch} x --tta-views {views} = {views * self.batch} views at once, more than "
                f"{MAX_VIEWS_IN_FLIGHT} (the image tower encodes them together); lower --tta-batch."
            )

    def _check_fit(self) -> None:
        """Options that belong to another method are refused, not silently ignored."""
        method = self.method
        if method not in PROMPT_TUNING:
            if self.steps is not None:
                raise TTAConfigError(f"--tta-steps applies to --tta tpt and ctpt; --tta {method} takes no gradient step.")
        if self.naive:
            raise TTAConfigError(
                "--tta-naive is gone: the published-style TPT path is a test reference "
                "(tests/reference/tpt_reference.py; benchmarks/bench_tpt.py times it); drop the flag."
            )
        if self.ctpt_lambda is not None and method != "ctpt":
            raise TTAConfigError(f"--ctpt-lambda is C-TPT's weight; it needs --tta ctpt, not --tta {method}.")
        if (self.tda_alpha is None) != (self.tda_beta is None):
            raise TTAConfigError("--tda-alpha and --tda-beta go together: pass both or neither.")
        if self.tda_alpha is not None and method != "tda":
            raise TTAConfigError(f"--tda-alpha/--tda-beta are TDA's cache weights; they need --tta tda, not --tta {method}.")
        if self.zero_votes != "hard" and method != "zero":
            raise TTAConfigError(f"--zero-votes needs --tta zero, not --tta {method}.")
        if method == "tda" and self.batch > 1:
            raise TTAConfigError(
                "--tta-batch is for the episodic methods; --tta tda is online (each image updates the cache "
                "the next one reads), so it adapts one image at a time: drop --tta-batch."
            )
        if method == "mta" and self.views is not None and self.views > 1:
            # the rule lives with the bandwidth itself (mta.view_bandwidths refuses the same counts)
            from .mta import fewest_views_with_a_neighbour, neighbour_count

            if neighbour_count(self.views) < 1:
                fewest = fewest_views_with_a_neighbour()
                raise TTAConfigError(
                    f"--tta mta needs --tta-views 1 or at least {fewest}, got {self.views}: its kernel bandwidth "
                    f"averages the distances to the nearest 30% of the other views, which is no view with 2 to "
                    f"{fewest - 1} (published: 64)."
                )
        if method == "mta" and self.selection is not None:
            raise TTAConfigError("--tta-selection does not apply to --tta mta (it weighs every view by inlierness).")
        if method in PROMPT_TUNING and self.fp16 and self.batch > 1:
            # one gradient scaler for the batch would skip every image's step when one overflows
            raise TTAConfigError("--tta-batch with --precision fp16 is not supported for --tta tpt/ctpt; use one or the other.")

    def resolved(self, dataset_name: str) -> "TTAConfig":
        """A validated copy with every ``None`` replaced by the method's default for ``dataset_name``."""
        self.validate(dataset_name)
        key, method = dataset_key(dataset_name), self.method
        shift = key in NATURAL_SHIFTS
        changes: dict = {}
        if self.views is None:
            changes["views"] = 1 if method == "tda" and not shift else 64
        if self.selection is None and method != "mta":
            changes["selection"] = 0.3 if method == "zero" else 0.1
        if self.steps is None and method in PROMPT_TUNING:
            changes["steps"] = 1
        if self.augmix is None:
            if method in PROMPT_TUNING:
                changes["augmix"] = key not in IMAGENET_FAMILY
            else:
                changes["augmix"] = method == "tda" and shift
        if method == "ctpt" and self.ctpt_lambda is None:
            changes["ctpt_lambda"] = CTPT_LAMBDA["natural_shift" if shift else "default"]
        if method == "tda" and self.tda_alpha is None:
            changes["tda_alpha"], changes["tda_beta"] = TDA_POSITIVE[key]
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """The settings as plain JSON values (for results files)."""
        out = dataclasses.asdict(self)
        out["image_dtype"] = None if self.image_dtype is None else str(self.image_dtype).replace("torch.", "")
        return out
