"""The table runner: pre-flight everything, then train and evaluate the cells still missing.

:func:`reproduce` walks the pipeline in order: check the flags and the folder, plan the cells, find
the datasets, gather the descriptions, load the model (the runner's environment), open the folder,
then compute each missing cell and rebuild ``TABLE.json`` and ``TABLE.md`` from the cell files.
Every check passes before anything is written, so bad input leaves no folder behind.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..protocols import get_protocol
from .availability import Availability, check_datasets, check_external
from .backend import LibraryRunner
from .config import ReproduceConfig, slug, validate
from .descriptions import classes_of, gather_descriptions, materialise
from .plan import Cell, plan_cells, preset_info
from .render import render_markdown
from .run_folder import CELL_FORMAT, RunFolder, read_json, write_json, write_text
from .runner import CellRunner, EvalRequest, PromptJob
from .table_math import build_table

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


def reproduce(config: ReproduceConfig, runner: Optional[CellRunner] = None, *, say: Callable[[str], None] = print) -> TableRun:
    """Run (or continue) a table: pre-flight everything, then train and evaluate the missing cells.

    Args:
        config: the table and every flag.
        runner: who trains and evaluates; None: :class:`~protext.reproduction.backend.LibraryRunner`.
        say: where progress lines go.

    Raises:
        UserError: bad flags, a foreign or mismatched ``--out``, no dataset found, missing
            descriptions, or a model that does not load; raised before anything is written.
    """
    protocol = get_protocol(config.table)
    validate(config)
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
    descriptions = {ds: materialise(config.descriptions, ds, data, folder) for ds, data in texts.items()}
    for name, fix in found.missing.items():
        say(f"missing: {name}: {fix}")
    state = _RunState(config, folder, runner, descriptions, say, environment)
    for cell in cells:
        if cell.dataset in found.present and not (cell.external and external_problem):
            state.run_cell(cell, found)
    table = build_table(protocol, config, cells, folder, found, external_problem, state.trained_records())
    json_path, md_path = folder.path / f"{protocol.name}.json", folder.path / f"{protocol.name}.md"
    write_json(json_path, table)
    write_text(md_path, render_markdown(table))
    return TableRun(table, json_path, md_path, state.computed, state.reused)


class _RunState:
    """The cells and prompts of one call: computes what is missing, reuses what is on disk."""

    def __init__(self, config: ReproduceConfig, folder: RunFolder, runner: CellRunner, descriptions: dict[str, Path],
                 say: Callable[[str], None], environment: dict[str, Any]) -> None:
        self.config, self.folder, self.runner, self.descriptions, self.say = config, folder, runner, descriptions, say
        self.environment = environment
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.done: dict[tuple, dict[str, Any]] = {}
        self.prompts: dict[str, dict[str, Any]] = {}
        self._checked: set[str] = set()

    def run_cell(self, cell: Cell, found: Availability) -> None:
        """Reuse the cell's file, copy an equal cell's record, or evaluate it; then write its file."""
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
