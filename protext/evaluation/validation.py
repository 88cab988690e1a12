"""The checks of an evaluation's flags that need no model and no file: :func:`validate`.

A bad combination is refused with one line naming the flags (:class:`~.flags.EvalError`) before
anything heavy loads. Torch-free like :mod:`.flags`; the test-time options are checked by the
registry (:mod:`protext.tta.registry`), the dataset name by the catalog's name table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..tta import registry as _registry
from .flags import (
    DEVICE_PATTERN, MAX_BATCH_SIZE, MAX_SEED, MAX_STREAM_RUNS, MAX_STREAM_SEEDS, METHODS, ONLINE_METHODS, PRECISIONS,
    PROMPT_TUNERS, SCENARIOS, SPLITS, TEMPLATE_RULES, TTA_INITS, TTA_METHODS, EvalError, uses_descriptions,
)

if TYPE_CHECKING:
    from .config import EvalConfig

#: options of the evaluation itself that only mean something with --tta
RUN_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tta_init": ("--tta-init", PROMPT_TUNERS),
    "stream_seeds": ("--stream-seeds", ONLINE_METHODS),
    "stream_runs": ("--stream-runs", ONLINE_METHODS),
}


def validate(config: "EvalConfig") -> None:
    """Reject flags that cannot mean anything, naming the flags (no file or model is touched)."""
    choice("--method", config.method, METHODS)
    choice("--split", config.split, SPLITS)
    choice("--precision", config.precision, PRECISIONS)
    choice("--templates", config.templates, TEMPLATE_RULES)
    _validate_dataset(config)
    if not DEVICE_PATTERN.match(config.device):
        raise EvalError(f"--device must be auto, cpu, mps, cuda or cuda:N, got '{config.device}'.")
    if config.template is not None:
        check_template(config.template)
    if uses_descriptions(config.method) and not config.descriptions:
        raise EvalError(f"--method {config.method} needs --descriptions FILE (.jsonl description cache or CuPL .json).")
    if config.method == "prompts" and not config.prompts:
        raise EvalError("--method prompts needs --prompts CHECKPOINT (.safetensors, or a CoOp .pth).")
    count("--batch-size", config.batch_size, 1, MAX_BATCH_SIZE)
    count("--workers", config.workers, 0, None)  # too many are capped (max_workers), not refused
    if config.limit is not None:
        count("--limit", config.limit, 1, None)  # more than the dataset holds means all of it
    count("--seed", config.seed, 0, MAX_SEED)
    _validate_tta(config)


def _validate_dataset(config: "EvalConfig") -> None:
    """An unknown --dataset name, and an empty --root, need no file system to be refused."""
    from ..datasets.catalog import DatasetError, canonical_name  # no torch: the name table only

    try:
        canonical_name(config.dataset)
    except DatasetError as err:
        raise EvalError(f"--dataset: {err}.") from None
    if not str(config.root).strip():
        raise EvalError("--root is empty; name the folder that holds the dataset.")
    # an empty path is falsy: it would silently mean "not given" (the default results path, no class list)
    for flag, value in (("--out", config.out), ("--classes", config.classes), ("--prompts", config.prompts),
                        ("--descriptions", config.descriptions)):
        if value is not None and not str(value).strip():
            raise EvalError(f"{flag} is empty; name a file, or leave the flag out.")


def _validate_tta(config: "EvalConfig") -> None:
    unknown = sorted(set(config.tta_options or {}) - {_registry.dest(f) for f in _registry.shared_flags()})
    if unknown:
        raise EvalError(f"tta_options: no method has an option '{unknown[0]}' (see python -m protext.eval --help).")
    values = config.tta_values()
    if config.tta is None:
        run = [flag for name, (flag, _) in RUN_OPTIONS.items() if is_set(getattr(config, name))]
        run += [flag for flag, value in (("--stream-seed", config.stream_seed), ("--scenario", config.scenario),
                                         ("--tasks", config.tasks)) if value is not None]
        for flag in run + ["--" + key.replace("_", "-") for key in values]:
            raise EvalError(f"{flag} is a test-time adaptation option; add --tta {{{','.join(TTA_METHODS)}}} or drop it.")
        return
    if "," in config.tta:
        _validate_pass(config, values)
        _validate_stream_update(config, values)
        return
    choice("--tta", config.tta, TTA_METHODS)
    if config.stream_runs is not None and config.tta not in ONLINE_METHODS:
        raise EvalError(f"--stream-runs: --tta {config.tta} treats every image on its own, so its result does not depend "
                        "on the stream order; one run is all there is (drop --stream-runs).")
    if config.tta == "dmn-oracle" and (config.stream_runs is not None or config.scenario is not None):
        flag = "--stream-runs" if config.stream_runs is not None else "--scenario"
        raise EvalError(f"{flag}: --tta dmn-oracle picks beta2 on the test labels after one whole stream, which the "
                        "replayed runs do not do; use --tta dmn (beta2 announced) or drop the flag.")
    for name, (flag, methods) in RUN_OPTIONS.items():
        if is_set(getattr(config, name)) and config.tta not in methods:
            raise EvalError(f"{flag} does not apply to --tta {config.tta} (it is for --tta {', '.join(methods)}); drop it.")
    try:
        _registry.check_given(config.tta, values)  # what depends on the dataset waits for it (prepare)
    except _registry.TTAConfigError as err:
        raise EvalError(str(err)) from None
    _validate_stream_update(config, values)
    if config.tunes_prompts:
        init = config.resolved_tta_init()
        choice("--tta-init", init, TTA_INITS)
        if init in ("prompts", "coop") and not config.prompts:
            raise EvalError(f"--tta-init {init} needs --prompts CHECKPOINT to start from.")
    if config.stream_seeds is not None:
        if not config.stream_seeds or len(set(config.stream_seeds)) != len(config.stream_seeds):
            raise EvalError(f"--stream-seeds must be distinct integers such as 1,2,3, got {config.stream_seeds}.")
        if len(config.stream_seeds) > MAX_STREAM_SEEDS:
            raise EvalError(f"--stream-seeds names {len(config.stream_seeds)} streams, each a full pass over the "
                            f"dataset; at most {MAX_STREAM_SEEDS}.")
        for seed in config.stream_seeds:
            count("--stream-seeds", seed, 0, MAX_SEED)
    if config.stream_seed is not None and config.stream_runs is None and config.scenario is None:
        raise EvalError("--stream-seed seeds the orders of --stream-runs or the draws of --scenario; add one or drop it.")
    if config.tasks is not None and config.scenario is None:
        raise EvalError("--tasks counts the tasks or streams of --scenario; add --scenario NAME or drop it.")
    if config.scenario is not None:
        choice("--scenario", config.scenario, SCENARIOS)
        if config.tunes_prompts:
            raise EvalError(f"--scenario replays each image's encoded views, and --tta {config.tta} tunes prompts through "
                            "the text tower from the views themselves; run it without --scenario.")
        if config.stream_runs is not None or config.stream_seeds is not None:
            raise EvalError("--scenario draws its own tasks and streams; drop --stream-runs/--stream-seeds.")
        if config.tasks is not None:
            count("--tasks", config.tasks, 1, MAX_STREAM_RUNS)
        count("--stream-seed", config.scenario_seed, 0, MAX_SEED)
    if config.stream_runs is not None:
        count("--stream-runs", config.stream_runs, 1, MAX_STREAM_RUNS)
        count("--stream-seed", config.stream_seed_or_default, 0, MAX_SEED)
        if config.stream_seeds is not None:
            raise EvalError("--stream-runs and --stream-seeds are two ways to draw stream orders; use one.")


def _validate_stream_update(config: "EvalConfig", values: dict[str, Any]) -> None:
    """``--stream-update batch`` (a registry option of the methods with a write/read split) is OGA's
    rule for the batches of ``--stream-runs``'s orders; no other run has those batches."""
    if values.get("stream_update") == "batch" and config.stream_runs is None:
        raise EvalError("--stream-update batch is OGA's rule for the batches of 32 of --stream-runs's orders (the whole "
                        "batch updates the state, then is predicted), not for a plain run, --stream-seeds or --scenario; "
                        "add --stream-runs N or drop it.")


def _validate_pass(config: "EvalConfig", values: dict[str, Any]) -> None:
    """Several methods in one pass (``--tta zero,tda,mta``): each reads view features (no prompt
    tuner), each option belongs to at least one of them, and each is valid for those it belongs to."""
    names = [name.strip() for name in config.tta.split(",")]
    for name in names:
        choice("--tta", name, TTA_METHODS)
        if _registry.get(name).tunes_prompts:
            raise EvalError(f"--tta {config.tta}: {name} tunes prompts through the text tower, so it cannot share one "
                            "encoding of the views with other methods; run it on its own.")
    if len(set(names)) != len(names) or len(names) < 2:
        raise EvalError(f"--tta {config.tta}: name each method once, at least two of them.")
    for flag, value in (("--tta-batch", config.tta_batch), ("--stream-seeds", config.stream_seeds),
                        ("--tta-init", config.tta_init), ("--stream-runs", config.stream_runs),
                        ("--scenario", config.scenario)):
        if value is not None:
            raise EvalError(f"{flag} is not supported with several methods in one pass (it adapts one image at a "
                            "time over one stream); run the methods one at a time.")
    for key in values:
        takers = [n for n in names if "--" + key.replace("_", "-") in
                  {opt.flag for _, opt in _registry.options(_registry.get(n))}]
        if not takers:
            raise EvalError(f"--{key.replace('_', '-')} does not apply to any of --tta {config.tta}; drop it.")
    for name in names:
        own = {_registry.dest(opt.flag) for _, opt in _registry.options(_registry.get(name))}
        try:
            _registry.check_given(name, {k: v for k, v in values.items() if k in own})
        except _registry.TTAConfigError as err:
            raise EvalError(str(err)) from None


def is_set(value: Any) -> bool:
    """Whether an option of the run was given: None is "not given", and so is False (a switch left off)."""
    return value is not None and value is not False


def count(flag: str, value: int, low: int, high: Optional[int]) -> None:
    """Refuse an integer flag outside ``[low, high]`` (``high`` None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvalError(f"{flag} must be a whole number, got {value!r}.")
    if value < low or (high is not None and value > high):
        want = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise EvalError(f"{flag} must be {want}, got {value}.")


def choice(flag: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Refuse a value that is not one of ``allowed``, listing them."""
    if value not in allowed:
        raise EvalError(f"{flag} must be one of {', '.join(allowed)}, got '{value}'.")


def check_template(template: str) -> None:
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
