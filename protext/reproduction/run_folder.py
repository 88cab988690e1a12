"""The run folder: ``OUT/TABLE`` with its ``run.json`` and one file per finished cell (the resume state).

A table survives a kill because every finished cell is written atomically the moment it finishes
and a rerun reads it back instead of recomputing it. The folder refuses another run's content and
anything that is not a protext reproduce folder; it never deletes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write
from .config import ReproduceError
from .plan import Cell

RUN_FORMAT = "protext-reproduce/1"
CELL_FORMAT = "protext-reproduce-cell/1"


def read_json(path: Path, way_out: str) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged or half-written file is an error naming it and ``way_out``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReproduceError(f"{path} is damaged or half-written ({type(err).__name__}: {err}); {way_out}.") from None
    if not isinstance(data, dict):
        raise ReproduceError(f"{path} is not a JSON object; {way_out}.")
    return data


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, atomically (a kill leaves the old file or the new one)."""
    write_text(path, json.dumps(payload, indent=2) + "\n")  # keys in the payload's order


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` in UTF-8, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
            saved = read_json(run_file, "delete the folder or pass another --out").get("identity")
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
            write_json(self.path / "run.json", {"format": RUN_FORMAT, "table": table, "identity": identity})

    def cell_file(self, cell: Cell) -> Path:
        """Where ``cell``'s record lives once it is finished."""
        return self.cells / f"{cell.key}.json"

    def read_cell(self, cell: Cell) -> Optional[dict[str, Any]]:
        """A finished cell's record, None if not finished; a damaged file is an error naming it."""
        path = self.cell_file(cell)
        if not path.exists():
            return None
        record = read_json(path, "delete that file to recompute the cell")
        if record.get("format") != CELL_FORMAT or record.get("settings") != cell.settings():
            raise ReproduceError(
                f"{path} is not this table's result for {cell.key} (other settings or format); delete it to recompute the cell."
            )
        return record

    def write_cell(self, cell: Cell, record: dict[str, Any]) -> None:
        """Write a finished cell's record, atomically: from now on a rerun reuses it."""
        write_json(self.cell_file(cell), record)
