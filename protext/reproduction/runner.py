"""The runner interface: what the table runner asks of whoever trains and evaluates.

:class:`protext.reproduction.backend.LibraryRunner` does it with protext's own training and
evaluation in real runs; the planner's tests plug in a fake that answers in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol as TypingProtocol

from .plan import Cell


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
    """Does a table's work; :class:`~protext.reproduction.backend.LibraryRunner` in real runs, a fake in the planner's tests."""

    def environment(self) -> dict[str, Any]:
        """Device, versions and model identity recorded with every cell."""

    def check_prompts(self, path: Path) -> None:
        """Raise :class:`UserError` when an existing checkpoint was made on other weights."""

    def train(self, job: PromptJob) -> dict[str, Any]:
        """Train (or finish training) ``job``; return a JSON-ready record (wall time under ``cost``)."""

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Evaluate a cell; return ``metrics`` (``top1`` in %, ``n_images``, ``n_classes``), ``seconds``, ``template``."""

    # Optional: ``finished(request) -> Optional[dict]``, the result of an evaluation that finished
    # before a kill (same form as ``evaluate``'s), None when there is none. Under torchrun rank 0
    # calls it before calling every rank into an evaluation; a runner without it is never asked.
