"""What the pictures of a reproduce table show, as plain data: the points of the cost figure and the
strips of the runs figure, collected from the table payload alone (no matplotlib, no torch).

:mod:`protext.reproduction.figures` draws them; the rules (what is averaged, and why) are in its
docstring. Kept apart so that the numbers a figure shows are tested without drawing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from ..streams import summarize_runs
from .table_math import harmonic_mean


@dataclass(frozen=True)
class CostPoint:
    """One row of the table in one panel: its GFLOPs per image, our average and the paper's."""

    row: str
    gflops: float
    value: float
    published: Optional[float] = None


@dataclass(frozen=True)
class CostPanel:
    """One panel of the cost figure: a measure averaged over one of the table's averages.

    Attributes:
        average: the average's name, as the table prints it (``avg (OOD 4)``).
        measure: ``top1``, ``hm`` (base-to-novel tables) or ``ece``.
        datasets: the datasets averaged: the average's own, less those not found under ``--root``.
        of: how many datasets the table's average covers.
        points: the rows drawn, in the table's row order.
        left_out: the rows not drawn, each with why.
    """

    average: str
    measure: str
    datasets: tuple[str, ...]
    of: int
    points: tuple[CostPoint, ...]
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStrip:
    """One row's runs on one dataset (a strip of the runs figure).

    Attributes:
        row: the row's name.
        dataset: the dataset.
        runs: every run's top-1 accuracy, sorted from worst to best; empty for a cell run once.
        mean: the mean over the runs (for a cell run once, its top-1).
        eta: the Expected Tail Accuracy (mean of the ``tail`` worst runs); None for a cell run once.
        tail: how many of the worst runs make the tail (0 for a cell run once).
        kind: ``orders``, ``tasks`` or ``streams`` as the evaluation names its runs; ``once`` for a cell run once.
        published: the paper's number for the cell, if the table has one.
    """

    row: str
    dataset: str
    runs: tuple[float, ...]
    mean: float
    eta: Optional[float]
    tail: int
    kind: str
    published: Optional[float] = None


# --------------------------------------------------------------------------------------------------
# the table's data


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _records(table: Mapping[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every cell record by ``(row, dataset, split)``."""
    out = {}
    for record in table["cells"]:
        s = record["settings"]
        out[(s["row"], s["dataset"], s["split"])] = record
    return out


def cell_gflops(record: Mapping[str, Any], by_key: Mapping[str, Mapping[str, Any]]) -> Optional[float]:
    """A cell's GFLOPs per image, or None when it has none; a copied cell (``same_as``) takes its origin's.

    The figure is looked up under ``cost`` (``gflops_per_image``, or ``flops.gflops_per_image`` as
    an evaluation's timing records it).
    """
    origin = record.get("same_as")
    if origin:
        record = by_key.get(origin, {})
    cost = record.get("cost") or {}
    value = cost.get("gflops_per_image")
    if value is None:
        value = (cost.get("flops") or {}).get("gflops_per_image")
    return None if value is None else float(value)


def _average_groups(table: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, datasets)`` of each of the table's averages (from its protocol); one over every
    dataset for a table protext does not know."""
    from ..protocols import UnknownTableError, get_protocol  # on use: the figures need only the table's names

    try:
        protocol = get_protocol(table["table"])
    except UnknownTableError:
        protocol = None
    rows = table["rows"]
    named = list(rows[0]["averages"]) if rows else []
    if protocol is not None:
        known = {a.name: a.datasets for a in protocol.averages}
        if named and all(name in known for name in named):
            return [(name, tuple(known[name])) for name in named]
    return [("all datasets", tuple(table["datasets"]))]


def _accuracy_measure(table: Mapping[str, Any]) -> str:
    return "hm" if "hm" in table["measures"] else "top1"


def _combine(measure: str, numbers: Mapping[str, Mapping[str, Optional[float]]], datasets: Sequence[str]) -> Optional[float]:
    """The average of ``measure`` over ``datasets`` by the table's rule (None when a number is missing)."""
    if measure == "hm":
        halves = []
        for half in ("base", "novel"):
            values = [numbers[d].get(half) for d in datasets]
            if any(v is None for v in values):
                return None
            halves.append(_mean(values))  # type: ignore[arg-type]
        return harmonic_mean(*halves)
    values = [numbers[d].get(measure) for d in datasets]
    if any(v is None for v in values):
        return None
    return _mean(values)  # type: ignore[arg-type]


def _numbers(table: Mapping[str, Any], row: Mapping[str, Any], records, which: str) -> dict[str, dict[str, Optional[float]]]:
    """``{dataset: {measure: number}}`` of a row, ``which`` being ``ours`` or ``published``: the
    table's cells, and the cells' ECE where the table reports none (ours only)."""
    out: dict[str, dict[str, Optional[float]]] = {}
    for dataset in table["datasets"]:
        cells = row["cells"][dataset]
        numbers = {m: cells[m][which] for m in table["measures"]}
        if "ece" not in numbers:  # (a base-to-novel cell has no "all" record: no ECE, no ECE panel)
            record = records.get((row["name"], dataset, "all"))
            ece = record["metrics"].get("ece") if record is not None and which == "ours" else None
            numbers["ece"] = None if ece is None else float(ece)
        out[dataset] = numbers
    return out


def _why_left_out(measure: str, numbers, gflops: dict[str, Optional[float]], datasets: Sequence[str]) -> Optional[str]:
    complete = sum(numbers[d].get(measure) is not None for d in datasets)  # a dataset's HM: both halves or None
    if complete < len(datasets):
        return f"{complete} of {len(datasets)} cells"
    counted = sum(gflops[d] is not None for d in datasets)
    if counted < len(datasets):
        return f"no GFLOPs in {len(datasets) - counted} of {len(datasets)} datasets"
    return None


def cost_panels(table: Mapping[str, Any]) -> list[CostPanel]:
    """The cost figure's panels: for each of the table's averages, the accuracy measure, then ECE.

    A panel lists every row: drawn (a :class:`CostPoint`) or left out with why: a row the run
    skipped (``rows_not_run``), a row missing a cell of the average, or one whose cells carry no
    GFLOPs per image. See the module's description for what is averaged.
    """
    records = _records(table)
    by_key = {r["key"]: r for r in table["cells"]}
    missing = set(table["missing_datasets"])
    not_run = table["rows_not_run"]
    splits = table["splits"]
    accuracy = _accuracy_measure(table)
    measures = [accuracy, "ece"]  # an ECE panel without points (base-to-novel: none per half) is dropped below
    panels = []
    for measure in measures:
        for name, group in _average_groups(table):
            datasets = tuple(d for d in group if d not in missing)
            full = len(datasets) == len(group)
            points, left_out = [], {}
            for row in table["rows"]:
                if row["name"] in not_run:
                    left_out[row["name"]] = f"not run: {not_run[row['name']]}"
                    continue
                if not datasets:
                    left_out[row["name"]] = "none of the average's datasets found"
                    continue
                ours, theirs = _numbers(table, row, records, "ours"), _numbers(table, row, records, "published")
                per_cell = {d: [records.get((row["name"], d, s)) for s in splits] for d in datasets}
                counts = {d: [None if r is None else cell_gflops(r, by_key) for r in cells] for d, cells in per_cell.items()}
                gflops = {d: (None if any(g is None for g in gs) else _mean(gs)) for d, gs in counts.items()}
                why = _why_left_out(measure, ours, gflops, datasets)
                if why is None and min(gflops[d] for d in datasets) <= 0:  # type: ignore[type-var]
                    why = "GFLOPs per image not positive (no point on a log axis)"
                if why is not None:
                    left_out[row["name"]] = why
                    continue
                value = _combine(measure, ours, datasets)
                published = _combine(measure, theirs, datasets)
                # what the table prints, rounded as it is (a table protext does not know prints no such average)
                entry = row["averages"].get(name, {}).get(measure) if full else None
                if entry is not None:
                    value = entry["ours"] if entry["ours"] is not None else value
                    printed = entry["published"]
                    published = printed if printed is not None else entry["mean_of_published_cells"]
                x = _mean([gflops[d] for d in datasets])  # type: ignore[misc]
                points.append(CostPoint(row["name"], x, value, published))  # type: ignore[arg-type]
            panels.append(CostPanel(name, measure, datasets, len(group), tuple(points), left_out))
    return [p for p in panels if p.points or p.measure != "ece"]


def cell_runs(record: Mapping[str, Any]) -> Optional[tuple[str, list[float]]]:
    """``(kind, per-run top-1 accuracies)`` of a cell that ran several times, else None.

    The runs are looked up under ``evaluation.runs`` (a protocol table's cell: ``per_run_top1``)
    or ``runs`` (an evaluation's results: ``per_run``, one dict per run); an ``order-free`` cell,
    or one without per-run accuracies, ran once.
    """
    runs = (record.get("evaluation") or {}).get("runs") or record.get("runs") or {}
    values = runs.get("per_run_top1")
    if values is None:
        values = [run["top1"] for run in runs.get("per_run") or ()]
    if not values:
        return None
    return str(runs.get("kind", "runs")), [float(v) for v in values]


def run_strips(table: Mapping[str, Any], datasets: Optional[Sequence[str]] = None) -> dict[str, list[RunStrip]]:
    """The runs figure's data: ``{dataset: [strip per row]}`` for each dataset (of ``datasets``, in
    the table's order; None: all) where at least one row's cell ran several times.

    A strip's mean and ETA are :func:`protext.streams.summarize_runs` of the per-run top-1
    accuracies. A row whose cell ran once is kept as a single value (its top-1); a row without a
    cell on the dataset is left out of that panel.
    """
    records = _records(table)
    wanted = table["datasets"] if datasets is None else [d for d in table["datasets"] if d in set(datasets)]
    out: dict[str, list[RunStrip]] = {}
    for dataset in wanted:
        strips = []
        for row in table["rows"]:
            record = records.get((row["name"], dataset, "all"))
            if record is None:
                continue
            published = row["cells"][dataset]["top1"]["published"]
            runs = cell_runs(record)
            if runs is None:
                strips.append(RunStrip(row["name"], dataset, (), float(record["metrics"]["top1"]), None, 0, "once", published))
                continue
            kind, values = runs
            summary = summarize_runs(values)
            strips.append(RunStrip(row["name"], dataset, tuple(sorted(values)), summary.mean, summary.eta,
                                   summary.tail_runs, kind, published))
        if any(s.runs for s in strips):
            out[dataset] = strips
    return out
