"""Run a published table (:mod:`protext.protocols`): train what it needs, evaluate every cell, compare.

One table is a plan of cells (row × dataset [× base/novel]). Each cell's settings come from the
protocol alone (features, class split, template rule and the exact template, preset and its n_ctx,
test-time adaptation), so the results say precisely what ran. The work itself is done by a
:class:`CellRunner`: :class:`LibraryRunner` trains with :func:`protext.training.run_training` and
evaluates with :func:`protext.evaluation.evaluate` on one model loaded once; tests plug in a fake.

Everything lands under one output root ``OUT`` (``--out``) and survives a kill:

``OUT/TABLE/run.json``
    what the folder is a run of (table, model, weights, smoke-test caps); a rerun with other
    settings is refused instead of mixing results.
``OUT/TABLE/cells/<row>__<dataset>__<split>.json``
    one file per finished cell, written atomically the moment it finishes; a rerun skips it.
``OUT/prompts/<model>-<weights>-<hash>/<preset>.safetensors`` (+ ``.json``, written last)
    the prompts a preset trained, reused by every cell, every table and every rerun on the same
    weights (the text-only ImageNet prompts serve protext-text-only and protext-dg alike).
``OUT/TABLE/eval/``, ``OUT/TABLE/descriptions/``
    the evaluation's own results and resumable logs, and the CuPL descriptions each dataset was given.
``OUT/TABLE/TABLE.json``, ``OUT/TABLE/TABLE.md``
    rebuilt from the cell files alone, so a killed-and-rerun table ends with the same files as an
    uninterrupted one (machine-dependent numbers, under ``cost``, are read back, never re-measured).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from . import __version__
from .atomic import atomic_write
from .errors import UserError
from .protocols import CLASS_COUNTS, Protocol, Row, get_protocol
from .templates import CONTEXT_PHRASE, template_for

RUN_FORMAT = "protext-reproduce/1"
CELL_FORMAT = "protext-reproduce-cell/1"
#: test hook: SIGKILL this process after that many newly computed cells (the kill-and-rerun test)
STOP_AFTER_ENV = "PROTEXT_REPRODUCE_KILL_AFTER_CELLS"
#: the template field of cells whose class features average ZERO's seven templates
ENSEMBLE = "ensemble of 7 templates"
#: the template field of cells whose class features average CLIP's 80 ImageNet templates (TDA on R, Sketch)
ENSEMBLE80 = "ensemble of CLIP's 80 templates"
#: class features that are template ensembles: their cells' template field, and where it comes from
_ENSEMBLE_CELLS = {
    "ensemble": (ENSEMBLE, "ZERO+Ensemble's seven templates (TTA.md §1.6)"),
    "ensemble80": (ENSEMBLE80, "CLIP's 80 ImageNet templates, open_clip's OPENAI_IMAGENET_TEMPLATES (TTA.md §3.7)"),
}


class ReproduceError(UserError):
    """Bad input for a table run; the one-line message names the flag, file or folder at fault."""


# --------------------------------------------------------------------------------------------------
# configuration and cells


@dataclass
class ReproduceConfig:
    """Everything ``python -m protext.reproduce`` takes.

    ``limit``, ``epochs``, ``tta_views`` and ``depth`` shrink a run for smoke tests (or fit a small
    model); each is a departure from the published protocol and is listed as such in ``TABLE.md``.
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
        return Path(self.out or "reproduction") / "prompts" / f"{_slug(self.model)}-{_slug(Path(self.pretrained).stem)}-{digest}"

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
        return out


@dataclass(frozen=True)
class Cell:
    """One number of a table, with every setting that produced it (all from the protocol)."""

    table: str
    row: str
    dataset: str
    split: str
    features: str
    template_rule: str
    template: str
    template_source: str
    n_classes: int
    preset: Optional[str] = None
    n_ctx: Optional[int] = None
    tta: Optional[dict[str, Any]] = None
    external: Optional[str] = None

    @property
    def key(self) -> str:
        """The cell's file name stem: ``<row>__<dataset>__<split>`` in safe characters."""
        return f"{_slug(self.row)}__{self.dataset}__{self.split}"

    def settings(self) -> dict[str, Any]:
        """Every setting, JSON-ready."""
        return asdict(self)

    def computation(self) -> tuple:
        """What the number depends on; cells equal here share one evaluation (CuPL novel = CLIP)."""
        tta = json.dumps(self.tta, sort_keys=True)
        return (self.dataset, self.split, self.features, self.template, self.preset, tta, self.external)


def _slug(text: str) -> str:
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in keep.split("-") if part)


def _cell_template(row: Row, dataset: str, features: str) -> tuple[str, str]:
    """(template, where it comes from) for a row's cell on ``dataset``."""
    if features in _ENSEMBLE_CELLS:
        return _ENSEMBLE_CELLS[features]
    if features == "cupl":  # recorded for completeness: CuPL's class features use no template
        return template_for(dataset, row.template_rule), "not used: the class's CuPL descriptions"
    preset = row.preset_for(dataset)
    if features == "prompts" and preset is not None and _preset(preset).dataset == dataset:
        # in-domain: the training template, written in full so the context replaces its phrase
        return f"{CONTEXT_PHRASE} {_preset(preset).template}", "training template (in-domain prompts)"
    return template_for(dataset, row.template_rule), f"{row.template_rule} rule"


def _preset(name: str):
    from .presets import get_preset

    return get_preset(name)


def _cell_for(protocol: Protocol, row: Row, dataset: str, split: str, config: ReproduceConfig) -> Cell:
    features = row.features_for(dataset, split)
    preset = row.preset_for(dataset) if features == "prompts" else None
    template, source = _cell_template(row, dataset, features)
    tta = row.tta.for_dataset(dataset) if row.tta else None
    if tta is not None and config.tta_views is not None:
        tta["views"] = config.tta_views
    handcrafted = tta is not None and (tta.get("init") or ("handcrafted" if tta["method"] in ("tpt", "ctpt") else None)) == "handcrafted"
    n_ctx = _preset(preset).n_ctx if preset else (4 if handcrafted else None)
    total = CLASS_COUNTS[dataset]
    n_classes = {"all": total, "base": math.ceil(total / 2), "novel": total - math.ceil(total / 2)}[split]
    return Cell(
        protocol.name, row.name, dataset, split, features, row.template_rule, template, source, n_classes,
        preset, n_ctx, tta, row.external,
    )


def plan_cells(protocol: Protocol, config: ReproduceConfig) -> list[Cell]:
    """Every cell of a table, row by row, in the paper's column order."""
    return [
        _cell_for(protocol, row, dataset, split, config)
        for row in protocol.rows
        for dataset in protocol.datasets
        for split in protocol.splits
    ]


def describe_plan(config: ReproduceConfig) -> str:
    """The cells a table would run, one line each with every setting (nothing is read or run)."""
    protocol = get_protocol(config.table)
    lines = [f"{protocol.name}: {protocol.title}"]
    for cell in plan_cells(protocol, config):
        tta = "" if not cell.tta else " tta=" + ",".join(f"{k}:{v}" for k, v in cell.tta.items() if v is not None)
        preset = f" preset={cell.preset} n_ctx={cell.n_ctx}" if cell.preset else (f" n_ctx={cell.n_ctx}" if cell.n_ctx else "")
        external = f" needs --{cell.external}" if cell.external else ""
        lines.append(
            f"  {cell.key}: {cell.features}, {cell.n_classes} classes, template '{cell.template}' "
            f"({cell.template_source}){preset}{tta}{external}"
        )
    lines += [f"  departs: {d}" for d in config.departures(trains=any(r.preset for r in protocol.rows))]
    lines += [f"  known departure: {d}" for d in protocol.all_departures()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the runner interface


@dataclass
class PromptJob:
    """Prompts one preset must train: the preset, its descriptions and classes, where they go, and
    the smoke-test overrides of the preset (``epochs``, ``depth``)."""

    preset: str
    dataset: str
    split: str
    classes: list[str]
    descriptions: Path
    checkpoint: Path
    overrides: dict[str, Any]


@dataclass
class EvalRequest:
    """One cell's evaluation: the cell, where its inputs are and where its evaluation writes."""

    cell: Cell
    root: str
    out: Path
    checkpoint: Optional[Path] = None
    descriptions: Optional[Path] = None
    limit: Optional[int] = None


class CellRunner(TypingProtocol):
    """Does a table's work; :class:`LibraryRunner` in real runs, a fake in the planner's tests."""

    def environment(self) -> dict[str, Any]:
        """Device, versions and model identity recorded with every cell."""

    def check_prompts(self, path: Path) -> None:
        """Raise :class:`UserError` when an existing checkpoint was made on other weights."""

    def train(self, job: PromptJob) -> dict[str, Any]:
        """Train (or finish training) ``job``; return a JSON-ready record (wall time under ``cost``)."""

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Evaluate a cell; return ``metrics`` (``top1`` in %, ``n_images``, ``n_classes``), ``seconds``, ``template``."""


# --------------------------------------------------------------------------------------------------
# the output folder


class RunFolder:
    """The output folder of one table run: refuses foreign or mismatched content, never deletes."""

    def __init__(self, path: Path, prompts: Path) -> None:
        self.path = path
        self.cells = path / "cells"
        self.prompts = prompts

    def check(self, identity: dict[str, Any]) -> bool:
        """Whether the folder already holds this run; refuses another run's or foreign content. Writes nothing."""
        run_file = self.path / "run.json"
        if run_file.is_file():
            saved = _read_json(run_file, "delete the folder or pass another --out").get("identity")
            if saved != identity:
                saved = saved if isinstance(saved, dict) else {}
                diff = ", ".join(f"{k} {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v)
                raise ReproduceError(f"--out {self.path} holds another run ({diff}); pass another --out or the same flags.")
            return True
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ReproduceError(
                f"--out {self.path} is not empty and has no run.json: not a protext reproduce folder; pass another --out."
            )
        return False

    def open(self, identity: dict[str, Any], table: str) -> None:
        """Create the folder's run.json (after every pre-flight check passed), unless it exists."""
        if not self.check(identity):
            _write_json(self.path / "run.json", {"format": RUN_FORMAT, "table": table, "identity": identity})

    def cell_file(self, cell: Cell) -> Path:
        return self.cells / f"{cell.key}.json"

    def read_cell(self, cell: Cell) -> Optional[dict[str, Any]]:
        """A finished cell's record, None if not finished; a damaged file is an error naming it."""
        path = self.cell_file(cell)
        if not path.exists():
            return None
        record = _read_json(path, "delete that file to recompute the cell")
        if record.get("format") != CELL_FORMAT or record.get("settings") != cell.settings():
            raise ReproduceError(
                f"{path} is not this table's result for {cell.key} (other settings or format); delete it to recompute the cell."
            )
        return record

    def write_cell(self, cell: Cell, record: dict[str, Any]) -> None:
        _write_json(self.cell_file(cell), record)


def _read_json(path: Path, way_out: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReproduceError(f"{path} is damaged or half-written ({type(err).__name__}: {err}); {way_out}.") from None
    if not isinstance(data, dict):
        raise ReproduceError(f"{path} is not a JSON object; {way_out}.")
    return data


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# pre-flight: datasets, descriptions, external checkpoints


@dataclass
class Availability:
    """Which of a table's datasets are under ``--root``; for the others, what to place where.

    ``found`` records, per present dataset, its layout and its test images against the published
    test set's size: a smaller copy gives numbers that are not the paper's, and the table says so.
    """

    present: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    found: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_datasets(protocol: Protocol, root: str) -> Availability:
    """Look for every dataset of the table (:func:`protext.datasets.dataset_status`); none is an error."""
    from .datasets import dataset_status

    result = Availability()
    for name in protocol.datasets:
        status = dataset_status(name, root)
        if status.state != "found":
            result.missing[name] = f"{status.state}: {status.problem + '; ' if status.problem else ''}{status.fix}"
            continue
        result.present.append(name)
        result.classes[name] = _dataset_classes(name, root)
        result.found[name] = {"layout": status.layout, "folder": str(status.folder), "test_images": status.images,
                              "published_test_images": status.published}
    if not result.present:
        first = next(iter(result.missing.values()))
        raise ReproduceError(
            f"--root {root} holds none of {protocol.name}'s {len(protocol.datasets)} datasets "
            f"({', '.join(protocol.datasets)}); for example {first}"
        )
    return result


def _build(name: str, root: str, split: str):
    from .datasets import build_dataset

    return build_dataset(name, root, split=split, partition="test")


def _dataset_classes(name: str, root: str) -> list[str]:
    """The dataset's class names in label order (the class mask of ImageNet-A/-R applied)."""
    return list(_build(name, root, "all").classnames)


def _cupl_source(dataset: str) -> str:
    """The dataset whose CuPL file describes ``dataset``'s classes (ImageNet's for its variants)."""
    return "imagenet" if dataset.startswith("imagenet") else dataset


def _release_descriptions(folder: str, dataset: str, classes: list[str]) -> dict[str, list[str]]:
    """CuPL's descriptions of ``classes`` from CuPL's release folder (its file names and original
    keys, renamed through protext's documented key map), keyed by the dataset's class names."""
    from .descriptions.cupl import release_descriptions

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # keys of classes a dataset lacks: CuPL's, not the user's
            return release_descriptions(folder, _cupl_source(dataset), classes=classes)
    except UserError as err:
        raise ReproduceError(f"--descriptions: {err}") from None


def gather_descriptions(config: ReproduceConfig, cells: list[Cell], found: Availability) -> dict[str, dict[str, list[str]]]:
    """Per dataset that needs them, its CuPL descriptions keyed by its own class names.

    Every class a cell scores or a preset trains on must have descriptions; otherwise the error
    names the CuPL file and the classes. Returns ``{dataset: {class: [description, ...]}}``.
    """
    needed: dict[str, list[str]] = {}
    for cell in cells:
        if cell.dataset in found.present and (cell.features == "cupl" or cell.preset):
            source = _preset(cell.preset).dataset if cell.preset else cell.dataset
            needed[source] = _merge(needed.get(source, []), _classes_of(source, found))
    if not needed:
        return {}
    if not config.descriptions:
        raise ReproduceError(
            f"{config.table} needs CuPL descriptions for {', '.join(needed)}: pass --descriptions DIR "
            "(CuPL's release folder, e.g. ../shared/cupl)."
        )
    return {ds: _release_descriptions(config.descriptions, ds, names) for ds, names in needed.items()}


def _classes_of(dataset: str, found: Availability) -> list[str]:
    """A dataset's class names: from its files, or for ImageNet (which trains cross-dataset
    prompts even when only the targets are on disk) the built-in list."""
    if dataset in found.classes:
        return found.classes[dataset]
    from .classlists import read_classes

    return read_classes("imagenet")


def _merge(first: list[str], second: list[str]) -> list[str]:
    seen = set(first)
    return first + [n for n in second if n not in seen]


def _materialise(release: str, dataset: str, data: dict[str, list[str]], folder: RunFolder) -> Path:
    """Write ``dataset``'s descriptions (every sample, repeats kept) as a protext description file."""
    from .descriptions import read_descriptions
    from .descriptions.cupl import import_descriptions

    path = folder.path / "descriptions" / f"{dataset}.jsonl"
    if path.exists():
        if read_descriptions(path) != data:
            raise ReproduceError(
                f"{path} differs from CuPL's file for {dataset} in {release}: the descriptions changed since "
                "this run began; pass another --out."
            )
        return path
    import_descriptions(data, path)
    return path


def check_external(config: ReproduceConfig, protocol: Protocol) -> Optional[str]:
    """Why the rows that need ``--coop`` cannot run (None when they can or none needs it)."""
    if not any(row.external for row in protocol.rows):
        return None
    if not config.coop:
        return "needs CoOp's 16-shot ImageNet prompts (trained on images): pass --coop FILE"
    if not Path(config.coop).is_file():
        raise ReproduceError(f"--coop {config.coop}: no such file (CoOp's ImageNet prompt checkpoint, .pth).")
    return None


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class TableRun:
    """What a table run produced: the table payload, its files, and what this call computed."""

    table: dict[str, Any]
    json_path: Path
    markdown_path: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def reproduce(config: ReproduceConfig, runner: Optional[CellRunner] = None, *, say: Callable[[str], None] = print) -> TableRun:
    """Run (or continue) a table: pre-flight everything, then train and evaluate the missing cells."""
    protocol = get_protocol(config.table)
    _validate(config)
    folder = RunFolder(config.output_dir(), config.prompts_dir())
    cells = plan_cells(protocol, config)
    folder.check(config.identity())
    found = check_datasets(protocol, config.root)
    for cell in cells:  # damaged cell files are reported before any work
        if cell.dataset in found.present:
            folder.read_cell(cell)
    external_problem = check_external(config, protocol)
    texts = gather_descriptions(config, cells, found)  # every check passes before anything is written
    runner = runner if runner is not None else LibraryRunner(config)
    environment = runner.environment()  # loads the model: a bad --model/--pretrained/--device fails here
    folder.open(config.identity(), protocol.name)
    descriptions = {ds: _materialise(config.descriptions, ds, data, folder) for ds, data in texts.items()}
    for name, fix in found.missing.items():
        say(f"missing: {name}: {fix}")
    state = _RunState(config, folder, runner, descriptions, say, environment)
    for cell in cells:
        if cell.dataset in found.present and not (cell.external and external_problem):
            state.run_cell(cell, found)
    table = build_table(protocol, config, cells, folder, found, external_problem, state.trained_records())
    json_path, md_path = folder.path / f"{protocol.name}.json", folder.path / f"{protocol.name}.md"
    _write_json(json_path, table)
    _write_text(md_path, render_markdown(table))
    return TableRun(table, json_path, md_path, state.computed, state.reused)


#: upper bounds only a typo exceeds: ``--workers 1000000`` would fork a million DataLoader processes
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1_000_000
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def _validate(config: ReproduceConfig) -> None:
    """The flags and the output folder, before any file is read or torch imported."""
    caps = (("--limit", config.limit), ("--epochs", config.epochs), ("--tta-views", config.tta_views), ("--depth", config.depth))
    for flag, value in caps:
        if value is not None and value < 1:
            raise ReproduceError(f"{flag} must be at least 1, got {value}.")
    if not 0 <= config.workers <= MAX_WORKERS:
        raise ReproduceError(f"--workers must be between 0 and {MAX_WORKERS} (DataLoader processes), got {config.workers}.")
    if not 1 <= config.batch_size <= MAX_BATCH_SIZE:
        raise ReproduceError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {config.batch_size}.")
    if not SEED_RANGE[0] <= config.seed <= SEED_RANGE[1]:
        raise ReproduceError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {config.seed}.")
    if not Path(config.root).is_dir():
        raise ReproduceError(f"--root {config.root}: no such folder (the folder holding the datasets).")
    from .preflight import check_output_dir

    # --out itself, not only OUT/TABLE: a file there, or a read-only place, is named as the user gave it
    check_output_dir(config.out or "reproduction", "--out")


class _RunState:
    """The cells and prompts of one call: computes what is missing, reuses what is on disk."""

    def __init__(self, config, folder: RunFolder, runner: CellRunner, descriptions: dict[str, Path], say,
                 environment: dict[str, Any]) -> None:
        self.config, self.folder, self.runner, self.descriptions, self.say = config, folder, runner, descriptions, say
        self.environment = environment
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.done: dict[tuple, dict[str, Any]] = {}
        self.prompts: dict[str, dict[str, Any]] = {}
        self._checked: set[str] = set()

    def run_cell(self, cell: Cell, found: Availability) -> None:
        record = self.folder.read_cell(cell)
        if record is not None:
            self.reused.append(cell.key)
            self.done.setdefault(cell.computation(), record)
            if cell.preset:
                self.prompts.setdefault(cell.preset, self._prompt_record(cell.preset))
            return
        same = self.done.get(cell.computation())
        if same is not None:  # e.g. CuPL's novel cell is the CLIP novel cell: never evaluated twice
            origin = same.get("same_as") or same["key"]
            record = {**same, "key": cell.key, "settings": cell.settings(), "same_as": origin, "cost": {"seconds": 0.0}}
        else:
            record = self._evaluate(cell, found)
        self.folder.write_cell(cell, record)
        self.done[cell.computation()] = record
        self.computed.append(cell.key)
        self.say(f"{cell.key}: top-1 {record['metrics']['top1']:.2f} ({record['cost']['seconds']:.1f}s)")
        _maybe_stop_for_test(len(self.computed))

    def _evaluate(self, cell: Cell, found: Availability) -> dict[str, Any]:
        checkpoint = self.ensure_prompts(cell.preset, found) if cell.preset else None
        if cell.external == "coop":
            checkpoint = Path(self.config.coop)
        request = EvalRequest(
            cell, self.config.root, self.folder.path / "eval" / cell.key, checkpoint,
            self.descriptions.get(cell.dataset) if cell.features == "cupl" else None, self.config.limit,
        )
        began = time.perf_counter()
        result = self.runner.evaluate(request)
        seconds = time.perf_counter() - began  # the whole cell: class features and images
        return {
            "format": CELL_FORMAT,
            "key": cell.key,
            "settings": cell.settings(),
            "metrics": result["metrics"],
            "template_used": result.get("template", cell.template),
            "cost": {"seconds": round(seconds, 3), **result.get("cost", {})},
            "checkpoint": str(checkpoint) if checkpoint else None,
            "descriptions": str(request.descriptions) if request.descriptions else None,
            "evaluation": result.get("details", {}),
            "environment": self.environment,
            "same_as": None,
        }

    def ensure_prompts(self, preset: str, found: Availability) -> Path:
        """The preset's finished checkpoint: reused when complete, else trained (or resumed) now."""
        path = self.folder.prompts / f"{_slug(preset)}.safetensors"
        record_path = path.with_suffix(".json")
        if record_path.is_file():
            if preset not in self._checked:  # once per run: the fingerprint hashes the whole text tower
                self.runner.check_prompts(path)
                self._checked.add(preset)
            self.prompts.setdefault(preset, self._prompt_record(preset))
            return path
        info = _preset(preset)
        job = PromptJob(
            preset, info.dataset, info.split, _classes_of(info.dataset, found), self.descriptions[info.dataset],
            path, {k: v for k, v in (("epochs", self.config.epochs), ("depth", self.config.depth)) if v is not None},
        )
        if path.exists():
            self.runner.check_prompts(path)
        self.say(f"training {preset} -> {path}")
        record = {"preset": preset, **self.runner.train(job), "checkpoint": str(path)}
        _write_json(record_path, record)  # written last: its presence means the checkpoint is complete
        self.prompts[preset] = record
        return path

    def _prompt_record(self, preset: str) -> dict[str, Any]:
        path = self.folder.prompts / f"{_slug(preset)}.json"
        return _read_json(path, "delete it and its .safetensors to retrain") if path.is_file() else {"preset": preset}

    def trained_records(self) -> dict[str, dict[str, Any]]:
        return dict(sorted(self.prompts.items()))


def _maybe_stop_for_test(computed: int) -> None:
    """The kill-and-rerun test's hook: die without cleanup, exactly as ``kill -9`` would."""
    limit = os.environ.get(STOP_AFTER_ENV)
    if limit and computed >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# the table: ours beside the paper's, averages and harmonic means recomputed

TABLE_FORMAT = "protext-reproduce-table/1"


def harmonic_mean(base: Optional[float], novel: Optional[float]) -> Optional[float]:
    """2·b·n/(b+n), the base-to-novel summary (None when a half is missing; 0 when both are 0)."""
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def _mean(values: list[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def _entry(ours: Optional[float], published: Optional[float]) -> dict[str, Optional[float]]:
    diff = None if ours is None or published is None else ours - published
    return {"ours": _round(ours), "published": published, "difference": _round(diff)}


def _metric(record: Optional[dict], name: str) -> Optional[float]:
    value = record["metrics"].get(name) if record else None
    return None if value is None else float(value)


def _row_values(protocol: Protocol, row: Row, records: dict[str, dict]) -> dict[str, dict[str, Optional[float]]]:
    """``{dataset: {measure: our number}}`` for one row (HM computed from our base and novel)."""
    values: dict[str, dict[str, Optional[float]]] = {}
    for dataset in protocol.datasets:
        found = {split: records.get(f"{_slug(row.name)}__{dataset}__{split}") for split in protocol.splits}
        if protocol.base_to_novel:
            base, novel = _metric(found["base"], "top1"), _metric(found["novel"], "top1")
            values[dataset] = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        else:
            values[dataset] = {m: _metric(found["all"], m) for m in protocol.measures()}
    return values


def _averages(protocol: Protocol, numbers: dict[str, dict[str, Optional[float]]], datasets) -> dict[str, Optional[float]]:
    """Means over ``datasets``; for base-to-novel the HM of the base and novel means (CoOp's rule)."""
    if protocol.base_to_novel:
        base = _mean([numbers[d]["base"] for d in datasets])
        novel = _mean([numbers[d]["novel"] for d in datasets])
        return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
    return {m: _mean([numbers[d][m] for d in datasets]) for m in protocol.measures()}


def _published_numbers(protocol: Protocol, row: Row) -> dict[str, dict[str, Optional[float]]]:
    return {d: {m: protocol.published.get((row.name, d, m)) for m in protocol.measures()} for d in protocol.datasets}


def _table_row(protocol: Protocol, row: Row, records: dict[str, dict]) -> dict[str, Any]:
    ours = _row_values(protocol, row, records)
    published = _published_numbers(protocol, row)
    cells = {d: {m: _entry(ours[d][m], published[d][m]) for m in protocol.measures()} for d in protocol.datasets}
    averages = {}
    for average in protocol.averages:
        mine = _averages(protocol, ours, average.datasets)
        theirs = _averages(protocol, published, average.datasets)
        averages[average.name] = {
            m: {
                **_entry(mine[m], protocol.published_averages.get((row.name, average.name, m))),
                "mean_of_published_cells": _round(theirs[m]),
                "complete": sum(ours[d][m] is not None for d in average.datasets),
                "of": len(average.datasets),
            }
            for m in protocol.measures()
        }
    return {
        "name": row.name, "features": row.features, "template_rule": row.template_rule, "preset": row.preset,
        "tta": row.tta.as_dict() if row.tta else None, "note": row.note, "cells": cells, "averages": averages,
    }


def build_table(
    protocol: Protocol, config: ReproduceConfig, cells: list[Cell], folder: RunFolder, found: Availability,
    external_problem: Optional[str], prompts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The table payload, built from the cell files on disk only (so reruns give the same file)."""
    records = {c.key: r for c in cells if c.dataset in found.present for r in [folder.read_cell(c)] if r}
    not_run = {r.name: external_problem for r in protocol.rows if r.external and external_problem}
    return {
        "format": TABLE_FORMAT,
        "table": protocol.name,
        "title": protocol.title,
        "protext_version": __version__,
        "run": {**config.identity(), "descriptions": config.descriptions, "root": config.root},
        "departures": config.departures(trains=any(r.preset for r in protocol.rows)),
        "protocol_departures": protocol.all_departures(),
        "notes": list(protocol.notes),
        "datasets": list(protocol.datasets),
        "splits": list(protocol.splits),
        "measures": list(protocol.measures()),
        "missing_datasets": dict(found.missing),
        "datasets_found": dict(found.found),
        "rows_not_run": not_run,
        "rows": [_table_row(protocol, row, records) for row in protocol.rows],
        "cells": [records[c.key] for c in cells if c.key in records],
        "cells_not_run": [c.key for c in cells if c.key not in records],
        "prompts": prompts,
        "cost": {
            "evaluation_seconds": round(sum(r["cost"]["seconds"] for r in records.values()), 3),
            "training_seconds": round(sum(float(p.get("cost", {}).get("seconds") or 0.0) for p in prompts.values()), 3),
        },
    }


def _fmt(entry: dict[str, Any]) -> str:
    ours, published, diff = entry["ours"], entry["published"], entry["difference"]
    mine = "—" if ours is None else f"{ours:.2f}"
    if published is None:
        return mine
    return f"{mine} ({published:.2f}, {diff:+.2f})" if diff is not None else f"{mine} ({published:.2f})"


def _fmt_average(entry: dict[str, Any]) -> str:
    text = _fmt(entry)
    if entry["ours"] is None and entry["complete"]:
        text = text.replace("—", f"— ({entry['complete']}/{entry['of']} cells)", 1)
    return text


def _measure_table(table: dict[str, Any], measure: str) -> list[str]:
    averages = [a for a in table["rows"][0]["averages"]] if table["rows"] else []
    head = ["method", *table["datasets"], *averages]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table["rows"]:
        cells = [_fmt(row["cells"][d][measure]) for d in table["datasets"]]
        cells += [_fmt_average(row["averages"][a][measure]) for a in averages]
        lines.append("| " + " | ".join([row["name"], *cells]) + " |")
    return lines


def _cells_table(table: dict[str, Any]) -> list[str]:
    head = "| cell | features | split | classes | template (rule) | n_ctx | preset | TTA | images | top-1 | seconds | device |"
    lines = [head, "|" + " --- |" * 12]
    for rec in table["cells"]:
        s, m = rec["settings"], rec["metrics"]
        tta = "—" if not s["tta"] else " ".join(
            f"{k} {v}" for k, v in s["tta"].items() if v is not None and k not in ("steps", "lr", "selection"))
        seconds = f"= {rec['same_as']}" if rec.get("same_as") else f"{rec['cost']['seconds']:.1f}"
        lines.append(
            f"| {rec['key']} | {s['features']} | {s['split']} | {m.get('n_classes', s['n_classes'])} | "
            f"`{rec['template_used']}` ({s['template_rule']}) | {s['n_ctx'] or '—'} | {s['preset'] or '—'} | {tta} | "
            f"{m.get('n_images', '?')} | {m['top1']:.2f} | {seconds} | {rec['environment'].get('device', '?')} |"
        )
    return lines


def _datasets_section(table: dict[str, Any]) -> list[str]:
    """Each dataset found: layout and test images against the published test set."""
    found = table.get("datasets_found") or {}
    if not found:
        return []
    out = ["## Datasets found", "", "| dataset | layout | test images | published test set |", "| --- | --- | --- | --- |"]
    for name, info in found.items():
        short = info["test_images"] != info["published_test_images"]
        mark = " (not the published test set: numbers are not comparable)" if short else ""
        out.append(f"| {name} | {info['layout']} | {info['test_images']}{mark} | {info['published_test_images']} |")
    return out + [""]


def render_markdown(table: dict[str, Any]) -> str:
    """``TABLE.md``: ours (published, difference) per cell, recomputed averages, then every setting."""
    out = [f"# {table['table']}", "", table["title"], ""]
    out += ["Each cell: ours (published, ours − published). Averages and harmonic means are recomputed from the",
            "rows; the number in brackets under an average is the paper's printed average.", ""]
    measures = table["measures"]
    titles = {"top1": "top-1 accuracy (%)", "ece": "expected calibration error (%)", "hm": "harmonic mean"}
    for measure in measures:
        if len(measures) > 1:
            out += [f"## {titles.get(measure, measure)}", ""]
        out += _measure_table(table, measure) + [""]
    if table["departures"]:
        out += ["## This run departs from the published protocol", ""] + [f"- {d}" for d in table["departures"]] + [""]
    out += ["## Where protext still departs from the paper's setting", ""]
    out += [f"- {d}" for d in table["protocol_departures"]] + [""]
    out += _datasets_section(table)
    if table["missing_datasets"]:
        out += ["## Missing datasets (not run)", ""]
        out += [f"- {name}: {fix}" for name, fix in table["missing_datasets"].items()] + [""]
    if table["rows_not_run"]:
        out += ["## Rows not run", ""] + [f"- {r}: {why}" for r, why in table["rows_not_run"].items()] + [""]
    out += ["## Protocol notes", ""] + [f"- {n}" for n in table["notes"]]
    out += [f"- {row['name']}: {row['note']}" for row in table["rows"] if row["note"]] + [""]
    out += ["## Cells", ""] + _cells_table(table) + [""]
    if table["prompts"]:
        out += ["## Prompts trained", "", "| preset | epochs | seconds | checkpoint |", "| --- | --- | --- | --- |"]
        for preset, rec in table["prompts"].items():
            seconds = rec.get("cost", {}).get("seconds")
            out.append(f"| {preset} | {rec.get('epochs', '?')} | {'?' if seconds is None else f'{seconds:.1f}'} | {rec.get('checkpoint', '?')} |")
        out.append("")
    env = table["cells"][0]["environment"] if table["cells"] else {}
    out += ["## Run", ""] + [f"- {k}: {v}" for k, v in {**table["run"], **env}.items()]
    cost = table["cost"]
    out += [f"- seconds: evaluation {cost['evaluation_seconds']}, training {cost['training_seconds']}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the real runner: protext's training and evaluation on one model loaded once


class LibraryRunner:
    """Trains with :func:`protext.training.run_training`, evaluates with :func:`protext.evaluation.evaluate`.

    The model is loaded once, on first use, and passed to every training and evaluation.
    """

    def __init__(self, config: ReproduceConfig) -> None:
        self.config = config
        self._clip = None
        self._device = None

    def _load(self):
        if self._clip is None:
            import torch

            from .models import load_clip

            name = self.config.device
            name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
            if name.startswith("cuda") and not torch.cuda.is_available():
                raise ReproduceError(f"--device {self.config.device}: CUDA is not available on this machine; use --device cpu or auto.")
            try:
                self._device = torch.device(name)
            except RuntimeError:
                raise ReproduceError(f"--device must be auto, cpu, cuda or cuda:N, got {self.config.device!r}.") from None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
                try:
                    self._clip = load_clip(self.config.model, self.config.pretrained, device=self._device, seed=self.config.seed)
                except (ValueError, FileNotFoundError, RuntimeError) as err:
                    raise ReproduceError(f"--model {self.config.model} --pretrained {self.config.pretrained}: {err}") from None
        return self._clip

    def environment(self) -> dict[str, Any]:
        from .evaluation.runtime import device_name, versions
        from .hardware import cpu_capability
        from .models import text_fingerprint

        clip = self._load()
        return {
            "device": str(self._device),
            "device_name": device_name(self._device),
            "cpu_capability": cpu_capability(),
            "versions": versions(),
            "python": platform.python_version(),
            "model": clip.identity,
            "text_tower_fingerprint": text_fingerprint(clip.model),
        }

    def check_prompts(self, path: Path) -> None:
        from .checkpoint import check_weights, load_prompts

        check_weights(load_prompts(path), self._load(), path)

    def train(self, job: PromptJob) -> dict[str, Any]:
        from .training import TrainJob, run_training

        finished = _finished_checkpoint(job.checkpoint)
        if finished is not None:  # trained before a kill that came before its record was written
            return finished
        classes = job.checkpoint.with_suffix(".classes.json")
        _write_json(classes, job.classes)
        train_job = TrainJob(
            descriptions=job.descriptions, preset=job.preset, classes=str(classes), split=job.split,
            overrides=dict(job.overrides), out=job.checkpoint,
            cache_dir=job.checkpoint.parent / "targets", resume=True, model=self.config.model,
            pretrained=self.config.pretrained, device=str(self._device or self.config.device),
        )
        self._load()
        outcome = run_training(train_job, clip=self._clip, progress=self.config.progress)
        if not outcome.complete:
            raise ReproduceError(f"training {job.preset} stopped: {outcome.message or outcome.status}")
        last = outcome.history[-1] if outcome.history else None
        return {
            "cost": {"seconds": round(float(outcome.seconds), 3)}, "epochs": len(outcome.history),
            "final_loss": getattr(last, "loss", None), "samples": outcome.samples, "classes": len(outcome.classes),
            "settings": _jsonable(train_job.settings()),
        }

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        from .evaluation import EvalConfig, evaluate

        cell, tta = request.cell, request.cell.tta or {}
        config = EvalConfig(
            dataset=cell.dataset, root=request.root, split=cell.split, limit=request.limit,
            model=self.config.model, pretrained=self.config.pretrained, device=self.config.device,
            precision=self.config.precision, method=cell.features,
            template=None if cell.features in _ENSEMBLE_CELLS else cell.template,
            templates=cell.template_rule, descriptions=_opt(request.descriptions), prompts=_opt(request.checkpoint),
            tta=tta.get("method"), tta_views=tta.get("views"), tta_selection=tta.get("selection"),
            tta_steps=tta.get("steps"), tta_lr=tta.get("lr"), tta_init=tta.get("init"), augmix=tta.get("augmix"),
            batch_size=self.config.batch_size, workers=self.config.workers,
            seed=self.config.seed if tta.get("seed") is None else tta["seed"],  # ZERO: its published seed
            out=str(request.out / "results.json"), progress=self.config.progress,
        )
        done = request.out / "results.json"
        if done.is_file():  # evaluated before a kill that came before the cell file: not redone
            return _cell_result(_read_json(done, f"delete {request.out} to re-evaluate the cell"), cell.template)
        payload = evaluate(config, clip=self._load(), progress=self.config.progress)
        return _cell_result(payload, cell.template)


def _finished_checkpoint(path: Path) -> Optional[dict[str, Any]]:
    """The record of a checkpoint whose training completed, or None (absent or unfinished)."""
    if not path.is_file():
        return None
    from .checkpoint import load_prompts

    meta = load_prompts(path).meta
    if not meta.get("complete"):
        return None
    return {"cost": {"seconds": None}, "epochs": meta.get("epochs_done"), "final_loss": meta.get("final_loss"),
            "samples": meta.get("samples"), "classes": len(meta.get("classes") or []), "settings": meta.get("preset_values")}


def _opt(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(asdict(value), default=str))
    except TypeError:
        return str(value)


def _cell_result(payload: dict[str, Any], ensemble: str = ENSEMBLE) -> dict[str, Any]:
    """The parts of an evaluation's results a table cell keeps; ``ensemble`` names the template of an
    ensemble cell (whose evaluation records a list of templates, not one)."""
    metrics = payload["metrics"]
    kept = {k: metrics[k] for k in ("top1", "top5", "mean_per_class", "ece", "acc1", "acc5", "mean_per_class_recall", "n_images")
            if k in metrics}
    kept["n_classes"] = payload["dataset"]["n_classes"]
    return {
        "metrics": kept,
        "cost": {"image_seconds": payload["timing"]["eval_seconds"], "seconds_per_image": payload["timing"]["seconds_per_image"], "peak_memory": payload["timing"]["peak_memory"]},
        "template": payload["template"].get("template") or ensemble,
        "details": {
            "template": payload["template"],
            "method": payload["method"],
            "checkpoint": payload.get("checkpoint"),
            "tta": {k: v for k, v in (payload.get("tta") or {}).items() if not k.startswith("seconds")} or None,
            "runtime": payload["runtime"],
        },
    }
