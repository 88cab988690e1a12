"""What an evaluation run depends on: :class:`EvalConfig`, its fields and the settings derived from them.

One job, split from three others that used to share this file: what each flag accepts is in
:mod:`.flags`, the checks that combine flags in :mod:`.validation`, the default results name and the
resume fingerprint in :mod:`.identity`. Every name that lived here is still importable from here
(``from protext.evaluation.config import METHODS, EvalError, parse_stream_seeds``).

Like those modules it imports no torch: ``python -m protext.eval --help`` builds its parser from
these names, and a bad combination of flags is refused before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from ..tta import registry as _registry
from . import identity as _identity
from . import validation as _validation
from .flags import (
    COOP_SUFFIXES, MAX_BATCH_SIZE, MAX_SEED, MAX_STREAM_RUNS, MAX_STREAM_SEEDS, MAX_TTA_BATCH, MAX_TTA_STEPS,
    MAX_TTA_VIEWS, MAX_VIEWS_IN_FLIGHT, METHODS, MIXED_FEATURES, ONLINE_METHODS, PRECISIONS, PROMPT_TUNERS, SCENARIOS,
    SPLITS, TEMPLATE_RULES, TPS_FEATURES, TTA_INITS, TTA_METHODS, WORKERS_PER_CORE, EvalError, max_workers,
    parse_stream_seeds, uses_descriptions,
)

__all__ = [
    "COOP_SUFFIXES", "MAX_BATCH_SIZE", "MAX_SEED", "MAX_STREAM_RUNS", "MAX_STREAM_SEEDS", "MAX_TTA_BATCH", "MAX_TTA_STEPS",
    "MAX_TTA_VIEWS", "MAX_VIEWS_IN_FLIGHT", "METHODS", "MIXED_FEATURES", "ONLINE_METHODS", "PRECISIONS", "PROMPT_TUNERS",
    "SCENARIOS", "SPLITS", "TEMPLATE_RULES", "TPS_FEATURES", "TTA_INITS", "TTA_METHODS", "WORKERS_PER_CORE",
    "EvalConfig", "EvalError", "max_workers", "parse_stream_seeds", "uses_descriptions",
]

#: the settings left out of the resume fingerprint (its old name here; tests compare it with the docs)
_NOT_IN_FINGERPRINT = _identity.NOT_IN_FINGERPRINT


@dataclass
class EvalConfig:
    """Everything a run depends on; written into the results JSON as ``settings``.

    TTA options left at ``None`` take the method's published default (:mod:`protext.tta`); setting
    one that the method does not use is an error, so nothing is silently ignored.
    """

    dataset: str
    root: str
    split: str = "all"
    classes: Optional[str] = None
    limit: Optional[int] = None
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "auto"
    method: str = "clip"
    template: Optional[str] = None
    templates: str = "protext"
    descriptions: Optional[str] = None
    prompts: Optional[str] = None
    allow_other_weights: bool = False
    tta: Optional[str] = None
    tta_views: Optional[int] = None
    tta_selection: Optional[float] = None
    tta_steps: Optional[int] = None
    tta_lr: Optional[float] = None
    tta_init: Optional[str] = None
    tta_tune: Optional[str] = None
    tta_batch: Optional[int] = None
    tta_naive: bool = False
    ctpt_lambda: Optional[float] = None
    tda_alpha: Optional[float] = None
    tda_beta: Optional[float] = None
    zero_votes: Optional[str] = None
    augmix: Optional[bool] = None
    tta_options: Optional[dict[str, Any]] = None
    stream_seeds: Optional[list[int]] = None
    stream_runs: Optional[int] = None
    stream_seed: Optional[int] = None
    scenario: Optional[str] = None
    tasks: Optional[int] = None
    batch_size: int = 64
    workers: int = 2
    seed: int = 0
    out: Optional[str] = None
    overwrite: bool = False
    save_logits: bool = False
    progress: bool = True

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject flags that cannot mean anything, naming the flags (no file or model is touched);
        see :func:`.validation.validate`."""
        _validation.validate(self)

    def tta_values(self) -> dict[str, Any]:
        """Every test-time option set, by flag dest (``tda_alpha``): the options with a field of their
        own (the flags older than the registry) and those in :attr:`tta_options`."""
        values = dict(self.tta_options or {})
        for flag, (opt, _) in _registry.shared_flags().items():
            key = _registry.dest(flag)
            if hasattr(self, key) and getattr(self, key) is not None:  # the field wins over tta_options
                values[key] = getattr(self, key)
            # None is "not given"; so is False for an off-by-default switch (--tta-naive), while
            # False for an on/off option (--no-augmix) is a choice
            if values.get(key) is None or (values[key] is False and opt.default is False):
                values.pop(key, None)
        return values

    def with_tta_values(self, values: Mapping[str, Any]) -> "EvalConfig":
        """This config with test-time options (by flag dest) set where ``python -m protext.eval``
        puts them: on the field of that name where there is one (the flags older than the registry),
        else in :attr:`tta_options`; ``None`` (not given) is dropped. The inverse of :meth:`tta_values`."""
        fields = {key: value for key, value in values.items() if key in self.__dataclass_fields__}
        extra = {**(self.tta_options or {}),
                 **{key: value for key, value in values.items() if key not in fields and value is not None}}
        return replace(self, **fields, tta_options=extra or None)

    def command_line(self) -> list[Any]:
        """The ``python -m protext.eval`` flags that run this config on its own: every non-default
        setting, and the test-time options as the registry declares their flags (what the quickstart
        prints before each row)."""
        flags: list[Any] = ["--dataset", self.dataset, "--root", self.root, "--method", self.method]
        optional = [
            ("descriptions", "--descriptions"), ("prompts", "--prompts"), ("tta", "--tta"),
            ("model", "--model"), ("pretrained", "--pretrained"), ("device", "--device"),
            ("precision", "--precision"), ("seed", "--seed"), ("workers", "--workers"),
        ]
        for name, flag in optional:
            value = getattr(self, name)
            if value is not None and value != self.__dataclass_fields__[name].default:
                flags += [flag, value]
        values = self.tta_values()
        for flag, (opt, _) in _registry.shared_flags().items():  # in the registry's order
            key = _registry.dest(flag)
            if key not in values:
                continue
            if opt.type is bool:  # a --flag/--no-flag pair, or a switch that tta_values keeps only when on
                flags.append(flag if values[key] else "--no-" + flag[2:])
            else:
                flags += [flag, values[key]]
        return [*flags, "--out", self.out]

    @property
    def scenario_seed(self) -> int:
        """The seed of ``--scenario``'s draws: ``--stream-seed``, or StatA's 1."""
        return 1 if self.stream_seed is None else self.stream_seed

    @property
    def stream_seed_or_default(self) -> int:
        """The master seed of ``--stream-runs``'s orders: ``--stream-seed``, or OGA's 42."""
        return 42 if self.stream_seed is None else self.stream_seed

    @property
    def tta_methods(self) -> list[str]:
        """The methods of ``--tta`` (several when comma-separated)."""
        return [name.strip() for name in self.tta.split(",")] if self.tta else []

    def resolved_tta_init(self) -> str:
        """``--tta-init``, or what ``--method`` implies: clip → handcrafted, prompts → the checkpoint."""
        if self.tta_init:
            return self.tta_init
        if self.method == "clip":
            return "handcrafted"
        if self.method == "prompts":
            return "coop" if Path(self.prompts or "").suffix in COOP_SUFFIXES else "prompts"
        raise EvalError(
            f"--tta {self.tta} tunes prompt vectors, and --method {self.method} has none (its classes are averaged "
            "text features). Use --method clip or --method prompts, or pass --tta-init."
        )

    @property
    def tunes_prompts(self) -> bool:
        return self.tta in PROMPT_TUNERS

    def uses_checkpoint(self) -> bool:
        """Whether the class features or the tuned prompts come from ``--prompts``."""
        if self.method == "prompts":
            return True
        return self.tunes_prompts and self.resolved_tta_init() in ("prompts", "coop")

    def label(self) -> str:
        """Short name of the run: ``clip``, ``prompts + TPT``, ..."""
        return self.method + (f" + {self.tta.upper()}" if self.tta else "")

    # ----------------------------------------------------------------------------------------------
    def output_path(self) -> Path:
        """``--out``, or the default results name (:func:`.identity.output_path`)."""
        return _identity.output_path(self)

    def identity(self) -> dict[str, Any]:
        """Every setting that can change a result, paths made absolute (:func:`.identity.identity`)."""
        return _identity.identity(self)

    def input_paths(self) -> dict[str, str]:
        """Files the run reads, by flag (an output may never be one of them)."""
        return _identity.input_paths(self)

    def fingerprint(self, file_digests: dict[str, str]) -> str:
        """A hash of every setting that changes an image's result, and of the input files' contents
        (:func:`.identity.fingerprint`)."""
        return _identity.fingerprint(self, file_digests)
