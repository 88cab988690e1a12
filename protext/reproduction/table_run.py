"""The table runner: pre-flight everything, then train and evaluate the cells still missing.

:func:`reproduce` walks the pipeline in order: check the flags and the folder, plan the cells, find
the datasets, gather the descriptions, load the model (the runner's environment), open the folder,
then compute each missing cell and rebuild ``TABLE.json`` and ``TABLE.md`` from the cell files.
Every check passes before anything is written, so bad input leaves no folder behind.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 drives and the other ranks follow (:class:`Team`):

* every rank runs the pre-flight; the ranks then compare their outcomes (and the datasets each
  sees under ``--root``), so one rank's problem stops all of them, reported once, by rank 0;
* rank 0 alone reads and writes the run folder: it opens it, decides which cells are finished
  (their files) or were evaluated before a kill (their results), trains prompts (the others wait,
  polling the job's store outside any collective, so a long training never times a collective
  out), writes every cell file and, once, ``TABLE.json`` and ``TABLE.md``;
* a cell to evaluate is announced to every rank, and all of them evaluate it together: the
  evaluation shards its images over the ranks and merges them exactly as ``python -m protext.eval``
  does under torchrun (:mod:`protext.evaluation.loop`);
* an online TTA cell (TDA: one ordered stream, which cannot be split without changing its result)
  is put aside and run, after the other cells, whole by one rank as a one-process evaluation; the
  ranks take such cells ``world_size`` at a time, and rank 0 writes their files.

A killed rank makes torchrun stop the others; every cell file already written is complete (written
atomically), and the rerun skips it on every rank, since only rank 0 decides.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UserError
from ..evaluation.config import uses_descriptions
from ..launch import launched_world_size
from ..protocols import Protocol, get_protocol
from .availability import Availability, check_datasets, check_external
from .backend import LibraryRunner
from .config import ReproduceConfig, slug, validate
from .descriptions import classes_of, gather_descriptions, materialise
from .figures import write_table_figures
from .plan import Cell, plan_cells, preset_info
from .render import render_markdown
from .run_folder import CELL_FORMAT, RunFolder, read_json, write_json, write_text
from .runner import CellRunner, EvalRequest, PromptJob
from .table_math import build_table
from .team import SharedError, Team, check_torchrun, join, online  # noqa: F401  (SharedError re-exported)

#: test hook: SIGKILL this process after that many newly computed cells (the kill-and-rerun test)
STOP_AFTER_ENV = "PROTEXT_REPRODUCE_KILL_AFTER_CELLS"


@dataclass
class TableRun:
    """What a table run produced: the table payload, its files, and what this call computed."""

    table: dict[str, Any]
    json_path: Path
    markdown_path: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    main: bool = True  # False on torchrun's other ranks: they write nothing and hold no table


@dataclass
class _Preflight:
    """What the checks before the model found: the folder, the cells, the datasets and descriptions."""

    folder: RunFolder
    cells: list[Cell]
    found: Availability
    external_problem: Optional[str]
    texts: dict[str, Any]


def reproduce(config: ReproduceConfig, runner: Optional[CellRunner] = None, *, say: Callable[[str], None] = print) -> TableRun:
    """Run (or continue) a table: pre-flight everything, then train and evaluate the missing cells.

    Under torchrun every rank calls it with the same flags; see the module's description for who
    does what. Rank 0 returns the table; the other ranks return a :class:`TableRun` with ``main``
    False and an empty table.

    Args:
        config: the table and every flag.
        runner: who trains and evaluates; None: :class:`~protext.reproduction.backend.LibraryRunner`.
        say: where progress lines go (rank 0's only, under torchrun).

    Raises:
        UserError: bad flags, a foreign or mismatched ``--out``, no dataset found, missing
            descriptions, or a model that does not load; raised before anything is written.
            Under torchrun, an error every rank raised is a :class:`SharedError` on ranks other than 0.
    """
    protocol = get_protocol(config.table)
    ranks = launched_world_size()
    if ranks > 1:
        check_torchrun(config)
    checked: Optional[_Preflight] = None
    problem: Optional[UserError] = None
    try:
        validate(config)
        checked = _preflight(config, protocol)
    except UserError as err:
        if ranks == 1:
            raise
        problem = err  # told to every rank first, so that all of them stop with one report
    ctx = join(config, problem, sorted(checked.found.present) if checked else None)
    assert checked is not None  # join raised on every rank otherwise
    folder, cells, found = checked.folder, checked.cells, checked.found
    runner = runner if runner is not None else LibraryRunner(config)
    environment = runner.environment()  # loads the model: a bad --model/--pretrained/--device fails here
    team = Team(ctx, runner)
    json_path, md_path = folder.path / f"{protocol.name}.json", folder.path / f"{protocol.name}.md"
    if not ctx.is_main:
        team.follow(folder, config)
        return TableRun({}, json_path, md_path, main=False)
    try:
        folder.open(config.identity(), protocol.name)
        team.opened(config)
        descriptions = {ds: materialise(config.descriptions, ds, data, folder) for ds, data in checked.texts.items()}
        for name, fix in found.missing.items():
            say(f"missing: {name}: {fix}")
        state = _RunState(config, folder, runner, descriptions, say, environment, team)
        for cell in cells:
            if cell.dataset in found.present and not (cell.external and checked.external_problem):
                state.run_cell(cell, found)
        state.run_put_aside()
        table = build_table(protocol, config, cells, folder, found, checked.external_problem, state.trained_records())
        write_json(json_path, table)
        figures = write_table_figures(table, md_path)  # TABLE.cost.png / TABLE.runs.png, those with something to show
        write_text(md_path, render_markdown(table, figures))
    except UserError as err:
        team.stop(err)
        raise
    team.done()
    return TableRun(table, json_path, md_path, state.computed, state.reused)


def _preflight(config: ReproduceConfig, protocol: Protocol) -> _Preflight:
    """Every check that needs no model; reads only (the folder is opened later, by rank 0)."""
    folder = RunFolder(config.output_dir(), config.prompts_dir())
    cells = plan_cells(protocol, config)
    folder.check(config.identity())
    found = check_datasets(protocol, config.root)
    for cell in cells:  # damaged cell files are reported before any work
        if cell.dataset in found.present:
            folder.read_cell(cell)
    external_problem = check_external(config, protocol)
    texts = gather_descriptions(config, cells, found)  # every check passes before anything is written
    return _Preflight(folder, cells, found, external_problem, texts)


class _RunState:
    """The cells and prompts of one call: computes what is missing, reuses what is on disk."""

    def __init__(self, config: ReproduceConfig, folder: RunFolder, runner: CellRunner, descriptions: dict[str, Path],
                 say: Callable[[str], None], environment: dict[str, Any], team: Team) -> None:
        self.config, self.folder, self.runner, self.descriptions, self.say = config, folder, runner, descriptions, say
        self.environment, self.team = environment, team
        self.run_id = uuid.uuid4().hex[:12]  # names this call in the cells it writes (under ``cost``)
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.done: dict[tuple, dict[str, Any]] = {}
        self.prompts: dict[str, dict[str, Any]] = {}
        self.put_aside: dict[tuple, EvalRequest] = {}  # online cells under torchrun, run after the others
        self.copies: list[Cell] = []  # cells equal to one put aside: copied once it is done
        self._checked: set[str] = set()

    def run_cell(self, cell: Cell, found: Availability) -> None:
        """Reuse the cell's file, copy an equal cell's record, or evaluate it (or put it aside); then write its file."""
        record = self.folder.read_cell(cell)
        if record is not None:
            self.reused.append(cell.key)
            self.done.setdefault(cell.computation(), record)
            if cell.preset:
                self.prompts.setdefault(cell.preset, self._prompt_record(cell.preset))
            return
        same = self.done.get(cell.computation())
        if same is not None:  # e.g. CuPL's novel cell is the CLIP novel cell: never evaluated twice
            self._copy(cell, same)
            return
        if cell.computation() in self.put_aside:
            self.copies.append(cell)
            return
        request = self._request(cell, found)
        finished = self._finished(request)
        if finished is None and self.team.active and online(cell):
            self.put_aside[cell.computation()] = request
            return
        began = time.perf_counter()
        result = finished if finished is not None else self.team.evaluate(request)
        self._finish(cell, self._record(request, result, time.perf_counter() - began))  # the whole cell: class features and images

    def run_put_aside(self) -> None:
        """The online cells put aside under torchrun, each whole on one rank, as many at once as
        there are ranks; then the cells equal to them."""
        waiting = list(self.put_aside.values())
        for start in range(0, len(waiting), self.team.size):
            batch = waiting[start : start + self.team.size]
            for request, (result, seconds) in zip(batch, self.team.alone(batch)):
                self._finish(request.cell, self._record(request, result, seconds))
        self.put_aside.clear()
        for cell in self.copies:
            self._copy(cell, self.done[cell.computation()])
        self.copies.clear()

    def _finished(self, request: EvalRequest) -> Optional[dict[str, Any]]:
        """The evaluation's result if it finished before a kill (runners that can tell), else None."""
        finished = getattr(self.runner, "finished", None)
        return finished(request) if finished is not None else None

    def _copy(self, cell: Cell, same: dict[str, Any]) -> None:
        origin = same.get("same_as") or same["key"]
        record = {**same, "key": cell.key, "settings": cell.settings(), "same_as": origin,
                  "cost": {"seconds": 0.0, "run": self.run_id}}
        self._finish(cell, record)

    def _finish(self, cell: Cell, record: dict[str, Any]) -> None:
        self.folder.write_cell(cell, record)
        self.done[cell.computation()] = record
        self.computed.append(cell.key)
        self.say(f"{cell.key}: top-1 {record['metrics']['top1']:.2f} ({record['cost']['seconds']:.1f}s)")
        _maybe_stop_for_test(len(self.computed))

    def _request(self, cell: Cell, found: Availability) -> EvalRequest:
        """The cell's evaluation request; trains (or resumes) the prompts it needs first."""
        checkpoint = self.ensure_prompts(cell.preset, found) if cell.preset else None
        if cell.external == "coop":
            checkpoint = Path(self.config.coop)
        return EvalRequest(
            cell, self.config.root, self.folder.path / "eval" / cell.key, checkpoint,
            self.descriptions.get(cell.dataset) if uses_descriptions(cell.features) else None, self.config.limit,
        )

    def _record(self, request: EvalRequest, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        cell, checkpoint = request.cell, request.checkpoint
        return {
            "format": CELL_FORMAT,
            "key": cell.key,
            "settings": cell.settings(),
            "metrics": result["metrics"],
            "template_used": result.get("template", cell.template),
            "cost": {"seconds": round(seconds, 3), **result.get("cost", {}), "run": self.run_id},
            "checkpoint": str(checkpoint) if checkpoint else None,
            "descriptions": str(request.descriptions) if request.descriptions else None,
            "evaluation": result.get("details", {}),
            "environment": self.environment,
            "same_as": None,
        }

    def ensure_prompts(self, preset: str, found: Availability) -> Path:
        """The preset's finished checkpoint: reused when complete, else trained (or resumed) now."""
        path = self.folder.prompts / f"{slug(preset)}.safetensors"
        record_path = path.with_suffix(".json")
        if record_path.is_file():
            if preset not in self._checked:  # once per run: the fingerprint hashes the whole text tower
                self.runner.check_prompts(path)
                self._checked.add(preset)
            self.prompts.setdefault(preset, self._prompt_record(preset))
            return path
        info = preset_info(preset)
        job = PromptJob(
            preset, info.dataset, info.split, classes_of(info.dataset, found), self.descriptions[info.dataset],
            path, {k: v for k, v in (("epochs", self.config.epochs), ("depth", self.config.depth)) if v is not None},
        )
        if path.exists():
            self.runner.check_prompts(path)
        self.say(f"training {preset} -> {path}")
        record = {"preset": preset, **self.runner.train(job), "checkpoint": str(path)}
        write_json(record_path, record)  # written last: its presence means the checkpoint is complete
        self.prompts[preset] = record
        return path

    def _prompt_record(self, preset: str) -> dict[str, Any]:
        path = self.folder.prompts / f"{slug(preset)}.json"
        return read_json(path, "delete it and its .safetensors to retrain") if path.is_file() else {"preset": preset}

    def trained_records(self) -> dict[str, dict[str, Any]]:
        """Every preset's training record seen by this call, by preset name."""
        return dict(sorted(self.prompts.items()))


def _maybe_stop_for_test(computed: int) -> None:
    """The kill-and-rerun test's hook: die without cleanup, exactly as ``kill -9`` would."""
    limit = os.environ.get(STOP_AFTER_ENV)
    if limit and computed >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
