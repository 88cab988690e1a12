"""``TABLE.md``: the table payload as markdown, ours (published, difference) per cell, then every setting.

Rendering reads the payload of :func:`protext.reproduction.table_math.build_table` only, so the same
payload always gives the same file.
"""

from __future__ import annotations

from typing import Any


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
