"""Pictures of a reproduce table, written beside ``TABLE.md``: cost against accuracy, and runs.

Two figures, each drawn from the table payload of
:func:`protext.reproduction.table_math.build_table` alone (the dict ``TABLE.md`` is rendered from),
so the same payload always gives the same picture and the picture shows what the table says:

* :func:`write_cost_figure` (``TABLE.cost.png``): one point per row (method), x = GFLOPs per image
  (log scale), y = the row's average over one of the table's averages; one column of panels per
  average, a second row of panels with the average ECE. A hollow marker at the same x is the
  paper's number where there is one. Rows without a complete average or without GFLOPs in every
  averaged cell are left out and named under the panels.
* :func:`write_runs_figure` (``TABLE.runs.png``): for a table whose cells ran several stream
  orders, tasks or streams, one panel per dataset and one strip per row: every run's accuracy as
  a dot, the worst ``⌈10 %⌉`` (the tail) in red, the mean and the ETA as ticks across the strip.

What is averaged, and why:

* The accuracy of a row is the table's own average (``rows[i]["averages"][name][measure]["ours"]``):
  the mean over the average's datasets, or for base-to-novel tables the harmonic mean of the base
  and novel means (CoOp's rule). Like the table, a row missing any cell of an average has no
  average there and is not drawn. When datasets were not found under ``--root`` every row misses
  them, so the table has no averages at all; the figure then averages over the datasets found
  (by the same rule) and says so in the panel's title ("3 of 10 datasets found").
* The ECE of a row is averaged the same way, from the table's ECE cells where the table reports
  ECE, else from the cells' results (every evaluation records it); base-to-novel tables get no ECE
  panel (two halves, two calibrations: no one number).
* The GFLOPs of a row are the plain mean of its averaged cells' GFLOPs per image (every cell of
  the row on those datasets, both halves for base-to-novel): each dataset counts once, as in the
  accuracy average. A cell copied from an equal one (``same_as``) takes the GFLOPs of the cell it
  copies (the copy's own cost is the zero seconds of a copy).
* The runs figure draws one panel per dataset, never an average over datasets "per run index":
  run ``r`` on one dataset and run ``r`` on another are unrelated permutations of different sets,
  so pairing them would make up a distribution no stream ever had, and its tail would not be the
  tail of any run. The mean and ETA of a strip are :func:`protext.streams.summarize_runs` of its
  per-run accuracies (the ETA is defined on the runs of one dataset). A row whose cell ran once
  (an episodic method: its order does not matter) is drawn as a single black diamond.

matplotlib is imported inside the drawing functions with the Agg backend (files only, no display),
as :mod:`protext.results` does; the data each picture shows is collected in
:mod:`protext.reproduction.figure_data`, which needs neither it nor torch.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..atomic import atomic_write
from .figure_data import (  # noqa: F401  (re-exported: the data behind each picture)
    CostPanel,
    CostPoint,
    RunStrip,
    cell_gflops,
    cell_runs,
    cost_panels,
    run_strips,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the y-axis label of each measure a panel can show
MEASURE_LABELS = {
    "top1": "top-1 accuracy (%)",
    "hm": "harmonic mean of base and novel (%)",
    "ece": "ECE (%), lower is better",
}
_OURS, _PUBLISHED, _TAIL, _RUN = "#4c72b0", "#dd8452", "#c44e52", "#4c72b0"
_DPI = 100


# --------------------------------------------------------------------------------------------------
# drawing


def _new_figure(width: float, height: float) -> "Figure":
    """A figure drawn by Agg (files only: no display is needed or wanted)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _title(table: Mapping[str, Any], what: str) -> str:
    run = table["run"]
    title = f"{table['table']} ({run['model']}, {run['pretrained']}): {what}"
    if run["limit"] is not None:
        title += f"; --limit {run['limit']} images per cell"
    return title


def _save(fig: "Figure", path: str | os.PathLike) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return Path(path)


def _figure_legend(fig: "Figure", loc: str, anchor: tuple[float, float]) -> None:
    """One legend for the whole figure: every label drawn in any panel, once, in a line."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc=loc, bbox_to_anchor=anchor, ncol=len(handles), fontsize=8,
               frameon=False)


def draw_cost_figure(table: Mapping[str, Any]) -> Optional["Figure"]:
    """The cost figure of :func:`cost_panels` (None when no panel has a point): panels in a grid,
    one column per average and one row per measure, GFLOPs per image on a log x axis."""
    panels = cost_panels(table)
    if not any(p.points for p in panels):
        return None
    from matplotlib.ticker import LogFormatter

    columns = list(dict.fromkeys(p.average for p in panels))
    lines = list(dict.fromkeys(p.measure for p in panels))
    left_out = {row: why for p in panels for row, why in p.left_out.items()}
    note = "; ".join(f"{row} ({textwrap.shorten(why, 70)})" for row, why in left_out.items())
    wrapped = textwrap.wrap(f"not drawn: {note}", 140) if note else []
    fig = _new_figure(5.5 * len(columns), 4.2 * len(lines) + 0.9 + 0.18 * len(wrapped))
    axes = fig.subplots(len(lines), len(columns), squeeze=False)
    for panel in panels:
        ax = axes[lines.index(panel.measure)][columns.index(panel.average)]
        xs = [p.gflops for p in panel.points]
        ax.scatter(xs, [p.value for p in panel.points], s=40, color=_OURS, zorder=3, label="ours")
        theirs = [p for p in panel.points if p.published is not None]
        if theirs:
            ax.scatter([p.gflops for p in theirs], [p.published for p in theirs], s=60, facecolors="none",
                       edgecolors=_PUBLISHED, linewidths=1.5, zorder=2, label="published (the paper's number, at our x)")
        for p in theirs:  # each paper's number tied to ours by a dotted line: the gap is what the table's difference says
            ax.plot([p.gflops, p.gflops], [p.value, p.published], linestyle=":", color=_PUBLISHED, linewidth=1, zorder=1)
        for p in panel.points:
            ax.annotate(p.row, (p.gflops, p.value), xytext=(5, 4), textcoords="offset points", fontsize=7)
        ax.set_xscale("log")
        # plain numbers (35, 100, 2300), and the minor ticks labelled when the points span under a decade
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.margins(x=0.25, y=0.15)
        found = "" if len(panel.datasets) == panel.of else f", {len(panel.datasets)} of {panel.of} datasets found"
        ax.set_title(f"{panel.average}{found}", fontsize=9)
        ax.set_xlabel("GFLOPs per image (log scale)", fontsize=8)
        ax.set_ylabel(MEASURE_LABELS.get(panel.measure, panel.measure), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for line in range(len(lines)):
        for column in range(len(columns)):
            ax = axes[line][column]
            if not ax.has_data():
                ax.set_axis_off()
    fig.suptitle(_title(table, "accuracy against GFLOPs per image"), fontsize=10)
    _figure_legend(fig, "upper center", (0.5, 0.955))
    if wrapped:
        fig.text(0.01, 0.01, "\n".join(wrapped), fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.02 + 0.03 * len(wrapped), 1, 0.93))
    return fig


def write_cost_figure(table: Mapping[str, Any], path: str | os.PathLike) -> Optional[Path]:
    """Write the cost figure of ``table`` (a :func:`~protext.reproduction.table_math.build_table`
    payload) as a PNG at ``path``, atomically; returns ``path``, or None (nothing written) when no
    row has both an average and GFLOPs per image."""
    fig = draw_cost_figure(table)
    return None if fig is None else _save(fig, path)


def _jitter(i: int) -> float:
    """A deterministic vertical offset of the ``i``-th run in a strip (golden-ratio spread, no RNG)."""
    return ((i * 0.6180339887) % 1.0 - 0.5) * 0.5


def draw_runs_figure(table: Mapping[str, Any], datasets: Optional[Sequence[str]] = None) -> Optional["Figure"]:
    """The runs figure of :func:`run_strips` (None when no cell ran several times): one panel per
    dataset, one strip per row, the tail's dots in red, the mean (black) and ETA (red dashed) as
    ticks across each strip, the paper's number as a hollow diamond."""
    panels = run_strips(table, datasets)
    if not panels:
        return None
    rows = [r["name"] for r in table["rows"] if any(s.row == r["name"] for strips in panels.values() for s in strips)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    inches = 0.45 if len(rows) <= 8 else 0.3  # per strip: a 24-row table (stata) stays on a screen or two
    fig = _new_figure(4.6 * ncols + 1.2, (inches * len(rows) + 1.3) * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for index, (dataset, strips) in enumerate(panels.items()):
        ax = axes[index // ncols][index % ncols]
        for strip in strips:
            y = rows.index(strip.row)
            if strip.runs:
                ax.scatter(strip.runs[strip.tail:], [y + _jitter(i) for i in range(strip.tail, len(strip.runs))],
                           s=9, color=_RUN, alpha=0.6, zorder=2, label="a run")
                ax.scatter(strip.runs[:strip.tail], [y + _jitter(i) for i in range(strip.tail)],
                           s=12, color=_TAIL, zorder=3, label="worst 10 % (tail)")
                ax.vlines([strip.mean], y - 0.38, y + 0.38, colors="black", linewidth=2, zorder=4, label="mean")
                ax.vlines([strip.eta], y - 0.38, y + 0.38, colors=_TAIL, linestyles="dashed", linewidth=2, zorder=4,
                          label="ETA")
            else:
                ax.scatter([strip.mean], [y], marker="D", s=30, color="black", zorder=4, label="run once (order-free)")
            if strip.published is not None:
                ax.scatter([strip.published], [y], marker="D", s=45, facecolors="none", edgecolors=_PUBLISHED,
                           linewidths=1.5, zorder=5, label="published")
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("top-1 accuracy of a run (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    for index in range(len(panels), nrows * ncols):
        axes[index // ncols][index % ncols].set_axis_off()
    first = axes[0][0]
    first.set_yticks(range(len(rows)), rows)
    first.set_ylim(len(rows) - 0.5, -0.5)  # the table's first row on top
    _figure_legend(fig, "lower center", (0.5, 0.0))
    kinds = sorted({s.kind for strips in panels.values() for s in strips if s.runs})
    fig.suptitle(_title(table, f"per-run top-1 over {', '.join(kinds)}, the worst 10 % marked"), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return fig


def write_runs_figure(table: Mapping[str, Any], path: str | os.PathLike,
                      datasets: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Write the runs figure of ``table`` as a PNG at ``path``, atomically; returns ``path``, or
    None (nothing written) when no cell of ``datasets`` (None: every dataset) ran several times."""
    fig = draw_runs_figure(table, datasets)
    return None if fig is None else _save(fig, path)


def write_table_figures(table: Mapping[str, Any], markdown_path: str | os.PathLike) -> dict[str, Path]:
    """Both figures beside ``TABLE.md``: ``TABLE.cost.png`` and ``TABLE.runs.png``, those that have
    something to show; returns ``{"cost": path, "runs": path}`` for the files written."""
    markdown_path = Path(markdown_path)
    stem = markdown_path.with_suffix("")
    written = {}
    for name, write in (("cost", write_cost_figure), ("runs", write_runs_figure)):
        path = write(table, stem.with_name(f"{stem.name}.{name}.png"))
        if path is not None:
            written[name] = path
    return written


__all__ = [
    "CostPanel", "CostPoint", "RunStrip", "cell_gflops", "cell_runs", "cost_panels", "draw_cost_figure", "draw_runs_figure",
    "run_strips", "write_cost_figure", "write_runs_figure", "write_table_figures",
]
