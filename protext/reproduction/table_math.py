"""The table: ours beside the paper's, every average and harmonic mean recomputed from the rows.

The paper's own averages are shown beside ours but never used: at least one printed average is not
the mean of its own row. The payload is built from the cell files on disk alone, so a killed and
rerun table ends with the same ``TABLE.json`` as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import __version__
from ..protocols import Protocol, Row
from .availability import Availability
from .config import ReproduceConfig
from .plan import Cell, cell_key
from .run_folder import RunFolder

TABLE_FORMAT = "protext-reproduce-table/1"


def harmonic_mean(base: Optional[float], novel: Optional[float]) -> Optional[float]:
    """2·b·n/(b+n), the base-to-novel summary (None when a half is missing; 0 when both are 0)."""
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def _mean(values: list[Optional[float]]) -> Optional[float]:
    """The mean, or None when any value is missing (an average over part of a row is no average)."""
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
        found = {split: records.get(cell_key(row.name, dataset, split)) for split in protocol.splits}
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


def _pivot(protocol: Protocol, rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The protocol's method × setting summary of the rows' first average (StatA's layout), with the
    published-only methods (not implemented here) as rows of their own; None without a pivot."""
    if not protocol.pivot:
        return None
    average = protocol.averages[0].name
    by_name = {row["name"]: row["averages"][average] for row in rows}
    settings = list(dict.fromkeys(setting for _, _, setting, _ in protocol.pivot))
    cells = []
    for row, method, setting, published in protocol.pivot:
        mine = by_name[row]
        cells.append({"method": method, "setting": setting, "row": row, "implemented": True,
                      **_entry(mine["top1"]["ours"], published),
                      "eta": mine.get("eta", {}).get("ours"), "complete": mine["top1"]["complete"], "of": mine["top1"]["of"]})
    for method, setting, published in protocol.published_only:
        if setting in settings:
            cells.append({"method": method, "setting": setting, "row": None, "implemented": False,
                          **_entry(None, published), "eta": None, "complete": 0, "of": 0})
    return {"average": average, "settings": settings, "methods": list(dict.fromkeys(c["method"] for c in cells)),
            "cells": cells}


def build_table(
    protocol: Protocol, config: ReproduceConfig, cells: list[Cell], folder: RunFolder, found: Availability,
    external_problem: Optional[str], prompts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The table payload, built from the cell files on disk only (so reruns give the same file)."""
    records = {c.key: r for c in cells if c.dataset in found.present for r in [folder.read_cell(c)] if r}
    not_run = {r.name: external_problem for r in protocol.rows if r.external and external_problem}
    rows = [_table_row(protocol, row, records) for row in protocol.rows]
    pivot = _pivot(protocol, rows)
    shown = set(pivot["settings"]) if pivot else set()
    extra = {}
    if protocol.report_runs:
        extra = {
            "report_runs": True,
            "pivot": pivot,
            "published_only": [{"method": m, "setting": s, "published": v} for m, s, v in protocol.published_only
                               if s not in shown],
        }
    return {
        "format": TABLE_FORMAT,
        "table": protocol.name,
        "title": protocol.title,
        "protext_version": __version__,
        "run": {**config.identity(), "descriptions": config.descriptions, "root": config.root},
        "departures": config.departures(trains=protocol.trains_prompts),
        "protocol_departures": protocol.all_departures(),
        "notes": list(protocol.notes),
        "datasets": list(protocol.datasets),
        "splits": list(protocol.splits),
        "measures": list(protocol.measures()),
        "missing_datasets": dict(found.missing),
        "datasets_found": dict(found.found),
        "rows_not_run": not_run,
        "rows": rows,
        "cells": [records[c.key] for c in cells if c.key in records],
        "cells_not_run": [c.key for c in cells if c.key not in records],
        "prompts": prompts,
        "cost": {
            "evaluation_seconds": round(sum(r["cost"]["seconds"] for r in records.values()), 3),
            "training_seconds": round(sum(float(p.get("cost", {}).get("seconds") or 0.0) for p in prompts.values()), 3),
        },
        **extra,
    }
