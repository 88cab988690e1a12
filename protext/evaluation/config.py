"""What an evaluation run depends on (:class:`EvalConfig`) and the checks that need no model.

This module imports no torch: ``python -m protext.eval --help`` builds its parser from the names
here, and a bad combination of flags is refused before anything heavy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..classlists import BUILTIN as BUILTIN_CLASS_LISTS
from ..errors import UserError
# the test-time methods, their options and checks come from one place, the registry (torch-free)
from ..tta import registry as _registry
from ..tta.methods import common as _common

SPLITS = ("all", "base", "novel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: how the class features are built: one template, CuPL descriptions, learned prompts, or the
#: 7-template ensemble of ZERO+Ensemble (TTA.md §1.6)
METHODS = ("clip", "cupl", "prompts", "ensemble", "ensemble80", "template+cupl", "ensemble+cupl", "ensemble80+cupl",
           "ensemble80+descriptors")
#: class features that pool templates and CuPL descriptions in one mean, as DMN-ZS's and DPE's
#: published ``tip_cupl`` features do (TTA2.md §6, §7): the prompts of a class are its templates
#: (the run's one template, or an ensemble) followed by its descriptions
MIXED_FEATURES = ("template+cupl", "ensemble+cupl", "ensemble80+cupl")


#: TPS's published prototypes (TTA2.md §10): the mean of CLIP's 80 templates and the mean of
#: "{class}, which … {descriptor}" sentences, averaged ("micro" pooling)
TPS_FEATURES = "ensemble80+descriptors"


def uses_descriptions(method: str) -> bool:
    """Whether ``--method`` builds class features from ``--descriptions``."""
    return method == "cupl" or method in MIXED_FEATURES or method == TPS_FEATURES
#: must equal ``protext.templates.TEMPLATE_RULES`` (tested); repeated here so --help needs no import
TEMPLATE_RULES = ("protext", "coop", "tpt")
TTA_INITS = ("handcrafted", "prompts", "coop")
COOP_SUFFIXES = (".pth", ".pt", ".tar")
TTA_METHODS: tuple[str, ...] = _registry.names()
#: methods whose state carries from one image to the next (the stream order matters)
ONLINE_METHODS: tuple[str, ...] = tuple(name for name in TTA_METHODS if _registry.get(name).online)
#: the prompt tuners: they take --tta-init, and start from what it names
PROMPT_TUNERS: tuple[str, ...] = tuple(name for name in TTA_METHODS if _registry.get(name).tunes_prompts)
#: options of the evaluation itself that only mean something with --tta
_RUN_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tta_init": ("--tta-init", PROMPT_TUNERS),
    "stream_seeds": ("--stream-seeds", ONLINE_METHODS),
    "stream_runs": ("--stream-runs", ONLINE_METHODS),
}

#: settings that do not change any image's result: left out of the resume fingerprint, so a rerun
#: with more workers, another --out or --limit still reuses the finished images. ``limit`` is in it
#: for the online methods all the same: their stream is a permutation of the first ``limit`` images,
#: so another limit is another stream (see :meth:`EvalConfig.fingerprint`)
_NOT_IN_FINGERPRINT = ("out", "overwrite", "workers", "progress", "limit")
#: settings that cannot change a result, so they do not change the default results name either
#: (``limit`` does: a smoke run of 10 images must not take the name of the full run)
_NOT_IN_NAME = ("out", "overwrite", "workers", "progress")
#: settings that name a file or folder: the default results name hashes the absolute path, so the
#: same relative path run from two folders (two different inputs) gets two names
_PATH_SETTINGS = ("root", "classes", "descriptions", "prompts", "pretrained")

# Upper bounds of the count flags. Each value is far above any published setting, and what lies
# beyond it cannot finish on any machine: refusing at once beats an out-of-memory error after the
# model has loaded, or a run that never ends. The TTA bounds are the registry's
# (``protext.tta.methods.common``), torch-free like this module.
MAX_TTA_VIEWS = _common.MAX_VIEWS
MAX_TTA_STEPS = _common.MAX_STEPS
MAX_TTA_BATCH = _common.MAX_BATCH
MAX_VIEWS_IN_FLIGHT = _common.MAX_VIEWS_IN_FLIGHT
#: images per zero-shot batch (default 64): 8192 images of 224x224 are 4.9 GB of fp32 pixels
MAX_BATCH_SIZE = 8192
#: streams of an online method, each a full pass over the dataset
MAX_STREAM_SEEDS = 100
#: orders replayed from one encoding (OGA: 100), or tasks of a scenario (StatA: 1000); each is a pass
#: of the method's own arithmetic
MAX_STREAM_RUNS = 10_000
#: StatA's named scenarios (protext.streams holds their settings; repeated so --help needs no import)
SCENARIOS = ("very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all",
             "online-low", "online-medium", "online-high", "online-separate")
#: seeds key torch and numpy generators: numpy refuses negative seeds, torch those of 2**64 and more
MAX_SEED = 2**63 - 1
#: DataLoader processes per available CPU core: more only compete for the cores (and each holds a
#: copy of the dataset), so more are capped with a warning rather than refused (a script written
#: for a large machine still runs on a small one; the number of workers never changes a result)
WORKERS_PER_CORE = 4
#: what --device accepts (as --help says); checked here so a typo needs no torch to be refused
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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
        """Reject flags that cannot mean anything, naming the flags (no file or model is touched)."""
        _choice("--method", self.method, METHODS)
        _choice("--split", self.split, SPLITS)
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--templates", self.templates, TEMPLATE_RULES)
        self._validate_dataset()
        if not _DEVICE.match(self.device):
            raise EvalError(f"--device must be auto, cpu, mps, cuda or cuda:N, got '{self.device}'.")
        if self.template is not None:
            _check_template(self.template)
        if uses_descriptions(self.method) and not self.descriptions:
            raise EvalError(f"--method {self.method} needs --descriptions FILE (.jsonl description cache or CuPL .json).")
        if self.method == "prompts" and not self.prompts:
            raise EvalError("--method prompts needs --prompts CHECKPOINT (.safetensors, or a CoOp .pth).")
        _count("--batch-size", self.batch_size, 1, MAX_BATCH_SIZE)
        _count("--workers", self.workers, 0, None)  # too many are capped (max_workers), not refused
        if self.limit is not None:
            _count("--limit", self.limit, 1, None)  # more than the dataset holds means all of it
        _count("--seed", self.seed, 0, MAX_SEED)
        self._validate_tta()

    def _validate_dataset(self) -> None:
        """An unknown --dataset name, and an empty --root, need no file system to be refused."""
        from ..datasets.catalog import DatasetError, canonical_name  # no torch: the name table only

        try:
            canonical_name(self.dataset)
        except DatasetError as err:
            raise EvalError(f"--dataset: {err}.") from None
        if not str(self.root).strip():
            raise EvalError("--root is empty; name the folder that holds the dataset.")
        # an empty path is falsy: it would silently mean "not given" (the default results path, no class list)
        for flag, value in (("--out", self.out), ("--classes", self.classes), ("--prompts", self.prompts),
                            ("--descriptions", self.descriptions)):
            if value is not None and not str(value).strip():
                raise EvalError(f"{flag} is empty; name a file, or leave the flag out.")

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

    def _validate_tta(self) -> None:
        unknown = sorted(set(self.tta_options or {}) - {_registry.dest(f) for f in _registry.shared_flags()})
        if unknown:
            raise EvalError(f"tta_options: no method has an option '{unknown[0]}' (see python -m protext.eval --help).")
        values = self.tta_values()
        if self.tta is None:
            run = [flag for name, (flag, _) in _RUN_OPTIONS.items() if _is_set(getattr(self, name))]
            run += [flag for flag, value in (("--stream-seed", self.stream_seed), ("--scenario", self.scenario),
                                             ("--tasks", self.tasks)) if value is not None]
            for flag in run + ["--" + key.replace("_", "-") for key in values]:
                raise EvalError(f"{flag} is a test-time adaptation option; add --tta {{{','.join(TTA_METHODS)}}} or drop it.")
            return
        if "," in self.tta:
            self._validate_pass(values)
            return
        _choice("--tta", self.tta, TTA_METHODS)
        if self.stream_runs is not None and self.tta not in ONLINE_METHODS:
            raise EvalError(f"--stream-runs: --tta {self.tta} treats every image on its own, so its result does not depend "
                            "on the stream order; one run is all there is (drop --stream-runs).")
        for name, (flag, methods) in _RUN_OPTIONS.items():
            if _is_set(getattr(self, name)) and self.tta not in methods:
                raise EvalError(f"{flag} does not apply to --tta {self.tta} (it is for --tta {', '.join(methods)}); drop it.")
        try:
            _registry.check_given(self.tta, values)  # what depends on the dataset waits for it (prepare)
        except _registry.TTAConfigError as err:
            raise EvalError(str(err)) from None
        if self.tunes_prompts:
            init = self.resolved_tta_init()
            _choice("--tta-init", init, TTA_INITS)
            if init in ("prompts", "coop") and not self.prompts:
                raise EvalError(f"--tta-init {init} needs --prompts CHECKPOINT to start from.")
        if self.stream_seeds is not None:
            if not self.stream_seeds or len(set(self.stream_seeds)) != len(self.stream_seeds):
                raise EvalError(f"--stream-seeds must be distinct integers such as 1,2,3, got {self.stream_seeds}.")
            if len(self.stream_seeds) > MAX_STREAM_SEEDS:
                raise EvalError(f"--stream-seeds names {len(self.stream_seeds)} streams, each a full pass over the "
                                f"dataset; at most {MAX_STREAM_SEEDS}.")
            for seed in self.stream_seeds:
                _count("--stream-seeds", seed, 0, MAX_SEED)
        if self.stream_seed is not None and self.stream_runs is None and self.scenario is None:
            raise EvalError("--stream-seed seeds the orders of --stream-runs or the draws of --scenario; add one or drop it.")
        if self.tasks is not None and self.scenario is None:
            raise EvalError("--tasks counts the tasks or streams of --scenario; add --scenario NAME or drop it.")
        if self.scenario is not None:
            _choice("--scenario", self.scenario, SCENARIOS)
            if self.tunes_prompts:
                raise EvalError(f"--scenario replays each image's encoded views, and --tta {self.tta} tunes prompts through "
                                "the text tower from the views themselves; run it without --scenario.")
            if self.stream_runs is not None or self.stream_seeds is not None:
                raise EvalError("--scenario draws its own tasks and streams; drop --stream-runs/--stream-seeds.")
            if self.tasks is not None:
                _count("--tasks", self.tasks, 1, MAX_STREAM_RUNS)
            _count("--stream-seed", self.scenario_seed, 0, MAX_SEED)
        if self.stream_runs is not None:
            _count("--stream-runs", self.stream_runs, 1, MAX_STREAM_RUNS)
            _count("--stream-seed", self.stream_seed_or_default, 0, MAX_SEED)
            if self.stream_seeds is not None:
                raise EvalError("--stream-runs and --stream-seeds are two ways to draw stream orders; use one.")

    def _validate_pass(self, values: dict[str, Any]) -> None:
        """Several methods in one pass (``--tta zero,tda,mta``): each reads view features (no prompt
        tuner), each option belongs to at least one of them, and each is valid for those it belongs to."""
        names = [name.strip() for name in self.tta.split(",")]
        for name in names:
            _choice("--tta", name, TTA_METHODS)
            if _registry.get(name).tunes_prompts:
                raise EvalError(f"--tta {self.tta}: {name} tunes prompts through the text tower, so it cannot share one "
                                "encoding of the views with other methods; run it on its own.")
        if len(set(names)) != len(names) or len(names) < 2:
            raise EvalError(f"--tta {self.tta}: name each method once, at least two of them.")
        for flag, value in (("--tta-batch", self.tta_batch), ("--stream-seeds", self.stream_seeds),
                            ("--tta-init", self.tta_init), ("--stream-runs", self.stream_runs),
                            ("--scenario", self.scenario)):
            if value is not None:
                raise EvalError(f"{flag} is not supported with several methods in one pass (it adapts one image at a "
                                "time over one stream); run the methods one at a time.")
        for key in values:
            takers = [n for n in names if "--" + key.replace("_", "-") in
                      {opt.flag for _, opt in _registry.options(_registry.get(n))}]
            if not takers:
                raise EvalError(f"--{key.replace('_', '-')} does not apply to any of --tta {self.tta}; drop it.")
        for name in names:
            own = {_registry.dest(opt.flag) for _, opt in _registry.options(_registry.get(name))}
            try:
                _registry.check_given(name, {k: v for k, v in values.items() if k in own})
            except _registry.TTAConfigError as err:
                raise EvalError(str(err)) from None

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
        return self.tta in PROMPT_TUNERS

    def uses_checkpoint(self) -> bool:
        """Whether the class features or the tuned prompts come from ``--prompts``."""
        if self.method == "prompts":
            return True
        return self.tunes_prompts and self.resolved_tta_init() in ("prompts", "coop")

    def label(self) -> str:
        """Short name of the run: ``clip``, ``prompts + TPT``, ..."""
        return self.method + (f" + {self.tta.upper()}" if self.tta else "")

    def output_path(self) -> Path:
        """``--out``, or ``results/DATASET-SPLIT-METHOD[-TTA]-MODEL-WEIGHTS[-SOURCE]-HASH.json``.

        The default name reads like CLIP_benchmark's (dataset, model and weights in the name) and
        ends in a hash of everything that changes a result (:meth:`identity`), so two runs that
        could give different results never share a name: two image folders, a checkpoint and its
        CoOp export, another template or TTA setting. The same command gets the same name, so a
        rerun finds its own log or finished result. SOURCE is the checkpoint's or description
        file's name; a plain folder's name is added to ``folder``.
        """
        if self.out:
            return Path(self.out)
        dataset = self.dataset if self.dataset != "folder" else f"folder_{Path(self.root).expanduser().resolve().name}"
        parts = [dataset, self.split, self.method, self.tta, self.model, _weights_name(self.pretrained)]
        source = self._source_file()
        if source:
            parts.append(Path(source).name)
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        name = "-".join(_name_part(part) for part in parts if part)
        return Path("results") / f"{name}-{digest[:10]}.json"

    def identity(self) -> dict[str, Any]:
        """Every setting that can change a result, with file and folder settings made absolute
        (the default results name is a hash of this)."""
        out = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_NAME}
        for key in _PATH_SETTINGS:
            value = out.get(key)
            if key == "pretrained" and value and not Path(value).suffix and not Path(value).exists():
                continue  # an open_clip tag ('openai'), not a file
            if key == "classes" and value and str(value).lower() in BUILTIN_CLASS_LISTS and not Path(value).exists():
                continue  # a built-in class list
            if value:
                out[key] = str(Path(value).expanduser().resolve())
        return out

    def _source_file(self) -> Optional[str]:
        """The file the class features come from, for the default results name: the checkpoint or
        the descriptions (None for templates, and for flags :meth:`validate` refuses)."""
        try:
            if self.uses_checkpoint():
                return self.prompts
        except EvalError:
            return None
        return self.descriptions if uses_descriptions(self.method) else None

    def input_paths(self) -> dict[str, str]:
        """Files the run reads, by flag (an output may never be one of them)."""
        named = {"--prompts": self.prompts, "--descriptions": self.descriptions, "--classes": self.classes}
        if self.pretrained and Path(self.pretrained).suffix:
            named["--pretrained"] = self.pretrained
        return {flag: path for flag, path in named.items() if path}

    def fingerprint(self, file_digests: dict[str, str]) -> str:
        """A hash of every setting that changes an image's result, and of the input files' contents.

        The images themselves (the folder's listing) and the class names are not in it: the
        resume log records them and a rerun on other images is refused (:mod:`.resume`), rather
        than silently starting a new log beside the old one.
        """
        settings = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
        if self.tta in ONLINE_METHODS:
            settings["limit"] = self.limit  # the stream is a permutation of the first `limit` images
        blob = json.dumps({"settings": settings, "files": file_digests}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def _count(flag: str, value: int, low: int, high: Optional[int]) -> None:
    """Refuse an integer flag outside ``[low, high]`` (``high`` None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvalError(f"{flag} must be a whole number, got {value!r}.")
    if value < low or (high is not None and value > high):
        want = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise EvalError(f"{flag} must be {want}, got {value}.")


def _check_template(template: str) -> None:
    """A template must take the class name in exactly one ``{}`` and nothing else: ``str.format``
    would raise on ``{0}``/``{name}`` or a second ``{}`` only when the features are built."""
    try:
        filled = template.format("\x00")
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or filled.count("\x00") != 1:
        raise EvalError(
            f"--template '{template}' must hold exactly one '{{}}' where the class name goes and no other braces "
            "(write a literal brace as '{{' or '}}')."
        )


def _name_part(text: str) -> str:
    """One readable part of a results file name: safe characters only, at most 40 of them (the hash
    after the parts keeps names apart, so shortening loses nothing)."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("._")[:40] or "_"


def _weights_name(pretrained: str) -> str:
    """An open_clip tag as is; a weights file by its name."""
    return Path(pretrained).name if Path(pretrained).suffix or os.sep in pretrained else pretrained


def max_workers() -> int:
    """The most DataLoader processes worth starting here: :data:`WORKERS_PER_CORE` per CPU core
    this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return WORKERS_PER_CORE * max(1, cores)


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
