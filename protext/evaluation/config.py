"""What an evaluation run depends on (:class:`EvalConfig`) and the checks that need no model.

This module imports no torch: ``python -m protext.eval --help`` builds its parser from the names
here, and a bad combination of flags is refused before anything heavy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

SPLITS = ("all", "base", "novel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: how the class features are built: one template, CuPL descriptions, learned prompts, or the
#: 7-template ensemble of ZERO+Ensemble (TTA.md §1.6)
METHODS = ("clip", "cupl", "prompts", "ensemble")
#: must equal ``protext.templates.TEMPLATE_RULES`` (tested); repeated here so --help needs no import
TEMPLATE_RULES = ("protext", "coop", "tpt")
TTA_METHODS = ("tpt", "ctpt", "zero", "tda", "mta")
TTA_INITS = ("handcrafted", "prompts", "coop")
TTA_TUNE = ("all", "shallow")
ZERO_VOTES = ("hard", "fp16")
COOP_SUFFIXES = (".pth", ".pt", ".tar")
#: methods whose state carries from one image to the next (the stream order matters)
ONLINE_METHODS = ("tda",)

#: per TTA option: its flag, and the methods it means something for
TTA_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tta_views": ("--tta-views", TTA_METHODS),
    "tta_selection": ("--tta-selection", ("tpt", "ctpt", "zero", "tda")),
    "tta_steps": ("--tta-steps", ("tpt", "ctpt")),
    "tta_lr": ("--tta-lr", ("tpt", "ctpt")),
    "tta_init": ("--tta-init", ("tpt", "ctpt")),
    "tta_tune": ("--tta-tune", ("tpt", "ctpt")),
    "tta_batch": ("--tta-batch", ("tpt", "ctpt", "zero", "mta")),
    "tta_naive": ("--tta-naive", ("tpt", "ctpt")),
    "ctpt_lambda": ("--ctpt-lambda", ("ctpt",)),
    "tda_alpha": ("--tda-alpha", ("tda",)),
    "tda_beta": ("--tda-beta", ("tda",)),
    "zero_votes": ("--zero-votes", ("zero",)),
    "augmix": ("--augmix", ("tpt", "ctpt", "tda")),
    "stream_seeds": ("--stream-seeds", ONLINE_METHODS),
}

#: settings that do not change any image's result: left out of the resume fingerprint, so a rerun
#: with more workers, another --out or --limit still reuses the finished images
_NOT_IN_FINGERPRINT = ("out", "overwrite", "workers", "progress", "limit")


class EvalError(UserError):
    """An inconsistent combination of evaluation flags; the message names the flags."""


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
    stream_seeds: Optional[list[int]] = None
    batch_size: int = 64
    workers: int = 2
    seed: int = 0
    out: Optional[str] = None
    overwrite: bool = False
    save_logits: bool = False
    progress: bool = True

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject flags that cannot mean anything, naming the flags (no file or model is touched)."""
        _choice("--method", self.method, METHODS)
        _choice("--split", self.split, SPLITS)
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--templates", self.templates, TEMPLATE_RULES)
        if self.template is not None and "{}" not in self.template:
            raise EvalError(f"--template '{self.template}' has no '{{}}' where the class name goes.")
        if self.method == "cupl" and not self.descriptions:
            raise EvalError("--method cupl needs --descriptions FILE (.jsonl description cache or CuPL .json).")
        if self.method == "prompts" and not self.prompts:
            raise EvalError("--method prompts needs --prompts CHECKPOINT (.safetensors, or a CoOp .pth).")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.workers < 0:
            raise EvalError(f"--workers must be >= 0, got {self.workers}.")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit}.")
        self._validate_tta()

    def _validate_tta(self) -> None:
        if self.tta is None:
            for name, (flag, _) in TTA_OPTIONS.items():
                if _is_set(getattr(self, name)):
                    raise EvalError(f"{flag} is a test-time adaptation option; add --tta {{{','.join(TTA_METHODS)}}} or drop it.")
            return
        _choice("--tta", self.tta, TTA_METHODS)
        for name, (flag, methods) in TTA_OPTIONS.items():
            if _is_set(getattr(self, name)) and self.tta not in methods:
                raise EvalError(f"{flag} does not apply to --tta {self.tta} (it is for --tta {', '.join(methods)}); drop it.")
        self._validate_tta_ranges()
        if self.tta in ("tpt", "ctpt"):
            init = self.resolved_tta_init()
            _choice("--tta-init", init, TTA_INITS)
            if init in ("prompts", "coop") and not self.prompts:
                raise EvalError(f"--tta-init {init} needs --prompts CHECKPOINT to start from.")
            if self.tta_tune is not None:
                _choice("--tta-tune", self.tta_tune, TTA_TUNE)
        if self.zero_votes is not None:
            _choice("--zero-votes", self.zero_votes, ZERO_VOTES)

    def _validate_tta_ranges(self) -> None:
        checks = [
            ("--tta-views", self.tta_views, lambda v: v >= 1, "at least 1"),
            ("--tta-selection", self.tta_selection, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("--tta-steps", self.tta_steps, lambda v: v >= 0, ">= 0"),
            ("--tta-lr", self.tta_lr, lambda v: v > 0 and math.isfinite(v), "a positive number"),
            ("--tta-batch", self.tta_batch, lambda v: v >= 1, "at least 1"),
            ("--ctpt-lambda", self.ctpt_lambda, lambda v: v >= 0 and math.isfinite(v), ">= 0"),
            ("--tda-alpha", self.tda_alpha, lambda v: v >= 0 and math.isfinite(v), ">= 0"),
            ("--tda-beta", self.tda_beta, lambda v: v > 0 and math.isfinite(v), "> 0"),
        ]
        for flag, value, ok, want in checks:
            if value is not None and not ok(value):
                raise EvalError(f"{flag} must be {want}, got {value}.")
        if (self.tda_alpha is None) != (self.tda_beta is None):
            raise EvalError("--tda-alpha and --tda-beta go together (the positive cache's pair); pass both or neither.")
        if self.stream_seeds is not None and (not self.stream_seeds or len(set(self.stream_seeds)) != len(self.stream_seeds)):
            raise EvalError(f"--stream-seeds must be distinct integers such as 1,2,3, got {self.stream_seeds}.")

    # ----------------------------------------------------------------------------------------------
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
        return self.tta in ("tpt", "ctpt")

    def uses_checkpoint(self) -> bool:
        """Whether the class features or the tuned prompts come from ``--prompts``."""
        if self.method == "prompts":
            return True
        return self.tunes_prompts and self.resolved_tta_init() in ("prompts", "coop")

    def label(self) -> str:
        """Short name of the run: ``clip``, ``prompts + TPT``, ..."""
        return self.method + (f" + {self.tta.upper()}" if self.tta else "")

    def output_path(self) -> Path:
        """``--out``, or ``results/DATASET-SPLIT-METHOD[-TTA].json``."""
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-{self.tta}" if self.tta else self.method
        return Path("results") / f"{self.dataset}-{self.split}-{tag}.json"

    def input_paths(self) -> dict[str, str]:
        """Files the run reads, by flag (an output may never be one of them)."""
        named = {"--prompts": self.prompts, "--descriptions": self.descriptions, "--classes": self.classes}
        if self.pretrained and Path(self.pretrained).suffix:
            named["--pretrained"] = self.pretrained
        return {flag: path for flag, path in named.items() if path}

    def fingerprint(self, file_digests: dict[str, str]) -> str:
        """A hash of every setting that changes an image's result, and of the input files' contents."""
        settings = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
        blob = json.dumps({"settings": settings, "files": file_digests}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def _choice(flag: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise EvalError(f"{flag} must be one of {', '.join(allowed)}, got '{value}'.")


def parse_stream_seeds(text: str) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]`` (an argparse ``type``: argparse reports the error as
    ``argument --stream-seeds: ...`` and exits 2)."""
    from argparse import ArgumentTypeError

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ArgumentTypeError(f"must be comma-separated integers such as 1,2,3, got '{text}'") from None
    if not seeds:
        raise ArgumentTypeError(f"must name at least one integer seed, got '{text}'")
    return seeds
