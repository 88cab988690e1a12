"""``TABLE.md``: the table payload as markdown, ours (published, difference) per cell, then every setting.

Rendering reads the payload of :func:`protext.reproduction.table_math.build_table` only, so the same
payload always gives the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional


def _fmt(entry: dict[str, Any], missing: str = "—") -> str:
    """``ours (published, difference)``, with ``missing`` in place of a number we do not have."""
    ours, published, diff = entry["ours"], entry["published"], entry["difference"]
    mine = missing if ours is None else f"{ours:.2f}"
    if published is None:
        return mine
    return f"{mine} ({published:.2f}, {diff:+.2f})" if diff is not None else f"{mine} ({published:.2f})"


def _fmt_average(entry: dict[str, Any]) -> str:
    """An average; one not computed says how many of its cells the row has, when it has any."""
    done = entry["complete"]
    return _fmt(entry, f"— ({done}/{entry['of']} cells)" if done else "—")


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
        tta, seconds = _tta_text(s["tta"], ("steps", "lr", "selection")), _seconds(rec)
        lines.append(
            f"| {rec['key']} | {s['features']} | {s['split']} | {m.get('n_classes', s['n_classes'])} | "
            f"`{rec['template_used']}` ({s['template_rule']}) | {s['n_ctx'] or '—'} | {s['preset'] or '—'} | {tta} | "
            f"{m.get('n_images', '?')} | {m['top1']:.2f} | {seconds} | {rec['environment'].get('device', '?')} |"
        )
    return lines


def _tta_text(tta: Optional[dict[str, Any]], skip: tuple[str, ...]) -> str:
    """A cell's TTA settings in one line (``—`` without TTA), leaving out ``skip`` and unset values."""
    if not tta:
        return "—"
    return " ".join(f"{k} {v}" for k, v in tta.items() if v is not None and k not in skip)


def _seconds(rec: dict[str, Any]) -> str:
    """A cell's seconds, or ``= KEY`` for a cell copied from an equal one."""
    return f"= {rec['same_as']}" if rec.get("same_as") else f"{rec['cost']['seconds']:.1f}"


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:.2f}"


def _gflops(value: Optional[float]) -> str:
    """GFLOPs per image in three significant digits below 100, whole numbers above (never 2.3e+03)."""
    if value is None:
        return "?"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _runs_cells_table(table: dict[str, Any]) -> list[str]:
    """The cells of a protocol table: what each replayed, and its mean, ETA, spread and cost."""
    head = ("| cell | template (rule) | TTA | runs | images | mean top-1 | ETA | spread | GFLOPs/image | seconds | "
            "device |")
    lines = [head, "|" + " --- |" * 11]
    for rec in table["cells"]:
        s, m, cost = rec["settings"], rec["metrics"], rec["cost"]
        tta = _tta_text(s["tta"], ("steps", "lr", "selection", "init"))
        runs = s.get("runs") or {}
        what = " ".join(f"{k} {v}" for k, v in runs.items() if k not in ("last_batch",) and v is not None)
        gflops = cost.get("gflops_per_image")
        seconds = _seconds(rec)
        lines.append(
            f"| {rec['key']} | `{rec['template_used']}` ({s['template_rule']}) | {tta} | {what} | {m.get('n_images', '?')} | "
            f"{_num(m.get('top1'))} | {_num(m.get('eta'))} | {_num(m.get('spread'))} | {_gflops(gflops)} | "
            f"{seconds} | {rec['environment'].get('device', '?')} |"
        )
    return lines


def _pivot_section(table: dict[str, Any]) -> list[str]:
    """The method × setting summary of the 11-set averages: ours (published, difference), the ETA after it."""
    pivot = table.get("pivot")
    if not pivot:
        return []
    out = [f"## {pivot['average']} by method and setting", "",
           "Each cell: our mean (published, ours − published) · our ETA. Rows marked * are not implemented in protext: "
           "their published numbers only.", ""]
    out += ["| method / setting | " + " | ".join(pivot["settings"]) + " |", "|" + " --- |" * (len(pivot["settings"]) + 1)]
    for method in pivot["methods"]:
        cells = {c["setting"]: c for c in pivot["cells"] if c["method"] == method}
        implemented = any(c["implemented"] for c in cells.values())
        texts = []
        for setting in pivot["settings"]:
            cell = cells.get(setting)
            if cell is None:
                texts.append("")
                continue
            text = _fmt_average(cell) if cell["implemented"] else f"* ({cell['published']:.2f})"
            texts.append(text + ("" if cell["eta"] is None else f" · {cell['eta']:.2f}"))
        out.append(f"| {method}{'' if implemented else ' *'} | " + " | ".join(texts) + " |")
    return out + [""]


def _published_only_section(table: dict[str, Any]) -> list[str]:
    entries = table.get("published_only") or []
    if not entries:
        return []
    out = ["## Published numbers without a row here", "",
           "Methods protext does not implement, or settings this table does not run; shown for reference only.", "",
           "| published method | setting | published |", "| --- | --- | --- |"]
    return out + [f"| {e['method']} | {e['setting']} | {e['published']:.2f} |" for e in entries] + [""]


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


_FIGURE_CAPTIONS = {
    "cost": "Average top-1 (and ECE) against GFLOPs per image, one point per row; hollow: the paper's number.",
    "runs": "Every run's top-1 per dataset and row; red: the worst 10 % (the tail), ticks: mean and ETA.",
}


def render_markdown(table: dict[str, Any], figures: Optional[Mapping[str, Path]] = None) -> str:
    """``TABLE.md``: ours (published, difference) per cell, recomputed averages, the pictures written
    beside it (``figures``: kind -> path, from :func:`protext.reproduction.figures.write_table_figures`),
    then every setting."""
    out = [f"# {table['table']}", "", table["title"], ""]
    out += ["Each cell: ours (published, ours − published). Averages and harmonic means are recomputed from the",
            "rows; the number in brackets under an average is the paper's printed average.", ""]
    measures = table["measures"]
    titles = {"top1": "top-1 accuracy (%)", "ece": "expected calibration error (%)", "hm": "harmonic mean"}
    runs = table.get("report_runs")
    if runs:
        titles.update({"top1": "mean top-1 over the runs (%)",
                       "eta": "ETA: mean top-1 of the worst 10 % of runs (%)",
                       "spread": "spread: standard deviation of the per-run top-1 (points)"})
        out += _pivot_section(table) + _published_only_section(table)
    for measure in measures:
        if len(measures) > 1:
            out += [f"## {titles.get(measure, measure)}", ""]
        out += _measure_table(table, measure) + [""]
    for kind, path in (figures or {}).items():
        out += [f"![{kind}]({Path(path).name})", "", _FIGURE_CAPTIONS.get(kind, ""), ""]
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
    out += ["## Cells", ""] + (_runs_cells_table(table) if runs else _cells_table(table)) + [""]
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
