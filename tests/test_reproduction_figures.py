"""The table figures against numbers worked out by hand: the points drawn, the averages behind them,
the runs' tail and ETA, and the PNG files.

Every table here is built by the real :func:`protext.reproduction.table_math.build_table` from
cell records written by hand, so the figures read the same payload ``TABLE.md`` is rendered from.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Optional

import pytest

from protext.protocols import get_protocol, table_names
from protext.reproduction.availability import Availability
from protext.reproduction.config import ReproduceConfig
from protext.reproduction.figures import (
    CostPanel,
    cell_gflops,
    cell_runs,
    cost_panels,
    draw_cost_figure,
    draw_runs_figure,
    run_strips,
    write_cost_figure,
    write_runs_figure,
    write_table_figures,
)
from protext.reproduction.plan import cell_key, plan_cells
from protext.reproduction.table_math import build_table

OOD4 = ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")


class _Folder:
    """A run folder that holds the records given (the table reads cells only through ``read_cell``)."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = records

    def read_cell(self, cell):
        return self.records.get(cell.key)


def _record(cell, top1: float, ece: float = 5.0, gflops: Optional[float] = 35.0, **extra) -> dict[str, Any]:
    cost: dict[str, Any] = {"seconds": 1.0}
    if gflops is not None:
        cost["gflops_per_image"] = gflops
    return {"format": "protext-reproduce-cell/1", "key": cell.key, "settings": cell.settings(),
            "metrics": {"top1": top1, "ece": ece, "n_images": 10}, "template_used": cell.template, "cost": cost,
            "checkpoint": None, "descriptions": None, "evaluation": {}, "environment": {"device": "cpu"},
            "same_as": None, **extra}


def _table(name: str, numbers, missing=(), external_problem=None, limit=None) -> dict[str, Any]:
    """The table ``name`` with a record per cell from ``numbers(cell)`` (None: no record)."""
    protocol = get_protocol(name)
    config = ReproduceConfig(table=name, root="/data", limit=limit)
    cells = plan_cells(protocol, config)
    records = {}
    for cell in cells:
        record = numbers(cell)
        if record is not None:
            records[cell.key] = record
    found = Availability(present=[d for d in protocol.datasets if d not in missing],
                         missing={d: "place it under /data" for d in missing})
    return build_table(protocol, config, cells, _Folder(records), found, external_problem, {})


# -- tta-ood: rows ZERO, ZERO + Ensemble, TDA, C-TPT (acc / ECE); average over the 4 OOD sets --------

#: per row: top-1, ECE and GFLOPs per image on (imagenet, A, V2, R, Sketch)
TOP1 = {"ZERO": (70, 60, 62, 64, 50), "ZERO + Ensemble": (71, 61, 63, 66, 52), "TDA": (72, 50, 60, 70, 40),
        "C-TPT (acc / ECE)": (69, 51, 52, 53, 54)}
ECE = {"ZERO": (9, 8, 6, 4, 2), "ZERO + Ensemble": (1, 3, 5, 7, 9), "TDA": (2, 2, 2, 2, 6),
       "C-TPT (acc / ECE)": (1, 1, 1, 1, 1)}
GFLOPS = {"ZERO": (9000, 2300, 2300, 2300, 2304), "ZERO + Ensemble": (9000, 2400, 2400, 2400, 2400),
          "TDA": (9000, 35.5, 36.5, 35.0, 37.0), "C-TPT (acc / ECE)": (9000, 2300, None, 2300, 2300)}
DATASETS = ("imagenet",) + OOD4


def _ood(cell):
    i = DATASETS.index(cell.dataset)
    return _record(cell, TOP1[cell.row][i], ECE[cell.row][i], GFLOPS[cell.row][i])


def _points(panel) -> dict[str, tuple]:
    return {p.row: (p.gflops, p.value, p.published) for p in panel.points}


def test_cost_points_are_the_tables_averages_over_the_averages_datasets_only():
    table = _table("tta-ood", _ood)
    top1, ece = cost_panels(table)
    assert (top1.average, top1.measure, top1.datasets, top1.of) == ("avg (OOD 4)", "top1", OOD4, 4)
    assert (ece.average, ece.measure) == ("avg (OOD 4)", "ece")
    # by hand, over A, V2, R, Sketch (ImageNet's 9000 GFLOPs and its accuracy are not averaged)
    want_top1 = {"ZERO": (9204 / 4, 59.0), "ZERO + Ensemble": (2400.0, 60.5), "TDA": (36.0, 55.0)}
    want_ece = {"ZERO": (9204 / 4, 5.0), "ZERO + Ensemble": (2400.0, 6.0), "TDA": (36.0, 3.0)}
    got = _points(top1)
    assert list(got) == ["ZERO", "ZERO + Ensemble", "TDA"]  # the table's row order
    for row, (x, y) in want_top1.items():
        assert got[row][:2] == pytest.approx((x, y), abs=1e-9)
    for row, (x, y) in want_ece.items():
        assert _points(ece)[row][:2] == pytest.approx((x, y), abs=1e-9)
    # the table's own averages, which TABLE.md prints
    rows = {r["name"]: r for r in table["rows"]}
    assert got["TDA"][1] == rows["TDA"]["averages"]["avg (OOD 4)"]["top1"]["ours"]
    # C-TPT has no GFLOPs on V2: left out of both panels, with why
    assert top1.left_out == ece.left_out == {"C-TPT (acc / ECE)": "no GFLOPs in 1 of 4 datasets"}


def test_published_marker_is_the_mean_of_the_papers_cells_when_it_prints_no_average():
    table = _table("tta-ood", _ood)
    top1 = cost_panels(table)[0]
    protocol = get_protocol("tta-ood")
    for row in ("ZERO", "ZERO + Ensemble", "TDA"):
        cells = [protocol.published.get((row, d, "top1")) for d in OOD4]
        want = None if None in cells else round(sum(cells) / 4, 4)
        assert _points(top1)[row][2] == pytest.approx(want) if want is not None else _points(top1)[row][2] is None
    assert any(p.published is not None for p in top1.points)


def test_a_row_missing_a_cell_is_left_out_like_the_table_leaves_its_average_out():
    table = _table("tta-ood", lambda c: None if (c.row, c.dataset) == ("TDA", "imagenet_r") else _ood(c))
    top1 = cost_panels(table)[0]
    assert "TDA" not in _points(top1)
    assert top1.left_out["TDA"] == "3 of 4 cells"
    assert [r for r in table["rows"] if r["name"] == "TDA"][0]["averages"]["avg (OOD 4)"]["top1"]["ours"] is None
    # a missing ImageNet cell does not matter: ImageNet is not averaged
    table = _table("tta-ood", lambda c: None if (c.row, c.dataset) == ("TDA", "imagenet") else _ood(c))
    assert _points(cost_panels(table)[0])["TDA"][:2] == pytest.approx((36.0, 55.0))


def test_datasets_not_found_are_averaged_out_and_named_in_the_title():
    table = _table("tta-ood", _ood, missing=("imagenet_sketch",))
    top1, ece = cost_panels(table)
    assert top1.datasets == ("imagenet_a", "imagenet_v2", "imagenet_r") and top1.of == 4
    got = _points(top1)
    assert got["ZERO"][:2] == pytest.approx((2300.0, 62.0))
    assert got["TDA"][:2] == pytest.approx(((35.5 + 36.5 + 35.0) / 3, 60.0))
    assert _points(ece)["ZERO + Ensemble"][1] == pytest.approx(5.0)
    protocol = get_protocol("tta-ood")  # the paper's cells over the same three sets
    cells = [protocol.published.get(("TDA", d, "top1")) for d in top1.datasets]
    if None not in cells:
        assert got["TDA"][2] == pytest.approx(sum(cells) / 3)
    fig = draw_cost_figure(table)
    assert fig.axes[0].get_title() == "avg (OOD 4), 3 of 4 datasets found"


def test_cost_figure_draws_the_points_on_a_log_axis_with_an_ece_panel():
    table = _table("tta-ood", _ood)
    fig = draw_cost_figure(table)
    assert len(fig.axes) == 2
    for ax, measure in zip(fig.axes, ("top1", "ece")):
        assert ax.get_xscale() == "log"
        panel = [p for p in cost_panels(table) if p.measure == measure][0]
        ours = [xy for point in ax.collections[0].get_offsets().tolist() for xy in point]
        assert ours == pytest.approx([xy for p in panel.points for xy in (p.gflops, p.value)])
        labels = [t.get_text() for t in ax.texts]
        assert labels == ["ZERO", "ZERO + Ensemble", "TDA"]
    assert "ECE" in fig.axes[1].get_ylabel() and "top-1" in fig.axes[0].get_ylabel()
    assert "GFLOPs" in fig.axes[0].get_xlabel()
    title = fig._suptitle.get_text()
    assert "tta-ood" in title and "ViT-B-16" in title and "openai" in title
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "C-TPT (acc / ECE)" in notes and "no GFLOPs" in notes


def test_without_any_gflops_there_is_no_cost_figure(tmp_path):
    table = _table("tta-ood", lambda c: _record(c, 50.0, gflops=None))
    assert all(not p.points for p in cost_panels(table))
    assert draw_cost_figure(table) is None
    assert write_cost_figure(table, tmp_path / "t.cost.png") is None
    assert not (tmp_path / "t.cost.png").exists()


def test_a_table_without_ece_cells_takes_ece_from_the_cells_results():
    # protext-tpt: top-1 only, two averages (10 targets, 4 variants): a column of panels each
    protocol = get_protocol("protext-tpt")
    datasets = list(protocol.datasets)

    def numbers(cell):
        if cell.row not in ("ProText", "ProText + TPT"):
            return None
        i = datasets.index(cell.dataset)
        tpt = cell.row == "ProText + TPT"
        return _record(cell, 60.0 + i + (2 if tpt else 0), ece=float(i % 3) + (4 if tpt else 0),
                       gflops=(2300.0 + i) if tpt else 35.0)

    table = _table("protext-tpt", numbers)
    panels = cost_panels(table)
    assert [(p.average, p.measure) for p in panels] == [
        ("avg (10 targets)", "top1"), ("avg (4 variants)", "top1"), ("avg (10 targets)", "ece"), ("avg (4 variants)", "ece")]
    targets = [datasets.index(d) for d in protocol.averages[0].datasets]
    variants = [datasets.index(d) for d in protocol.averages[1].datasets]
    assert _points(panels[0])["ProText + TPT"][:2] == pytest.approx((2300 + sum(targets) / 10, 62 + sum(targets) / 10))
    assert _points(panels[1])["ProText"][:2] == pytest.approx((35.0, 60 + sum(variants) / 4))
    assert _points(panels[2])["ProText + TPT"][1] == pytest.approx(4 + sum(i % 3 for i in targets) / 10)
    assert _points(panels[3])["ProText"][1] == pytest.approx(sum(i % 3 for i in variants) / 4)
    assert _points(panels[0])["ProText"][2] == 67.23  # the paper's printed average
    assert panels[2].points[0].published is None  # no published ECE here
    assert panels[0].left_out["ProText + DPE"] == "0 of 10 cells"
    fig = draw_cost_figure(table)
    assert len(fig.axes) == 4 and all(ax.get_xscale() == "log" for ax in fig.axes)


def test_base_to_novel_plots_the_hm_of_the_means_and_copied_cells_take_their_origins_gflops():
    protocol = get_protocol("protext-base2novel")
    n = len(protocol.datasets)

    def numbers(cell):
        i = protocol.datasets.index(cell.dataset)
        if cell.row == "CuPL" and cell.split == "novel":  # a copy of CLIP's novel cell, as the runner writes it
            origin = cell_key("CLIP", cell.dataset, "novel")
            return {**_record(cell, 40.0 + i, gflops=None), "same_as": origin, "cost": {"seconds": 0.0}}
        base = {"CLIP": 60.0, "CuPL": 70.0, "ProText": 80.0}[cell.row]
        top1 = base + i if cell.split == "base" else 40.0 + i * i
        gflops = {"CLIP": 36.0, "CuPL": 50.0, "ProText": 100.0}[cell.row] + (2 if cell.split == "novel" else 0)
        return _record(cell, top1, gflops=gflops)

    table = _table("protext-base2novel", numbers)
    panels = cost_panels(table)
    assert [(p.average, p.measure) for p in panels] == [("average", "hm")]  # no ECE for two halves
    mean_novel = sum(40.0 + i * i for i in range(n)) / n
    for row, base0 in (("CLIP", 60.0), ("ProText", 80.0)):
        mean_base = base0 + (n - 1) / 2
        want = 2 * mean_base * mean_novel / (mean_base + mean_novel)
        assert _points(panels[0])[row][1] == pytest.approx(want, abs=1e-4)
        per_dataset = [2 * (base0 + i) * (40.0 + i * i) / (base0 + i + 40.0 + i * i) for i in range(n)]
        assert abs(sum(per_dataset) / n - want) > 0.1  # the mean of per-dataset HMs would be another point
    assert _points(panels[0])["CLIP"][0] == pytest.approx(37.0)
    assert _points(panels[0])["CuPL"][0] == pytest.approx((50.0 + 38.0) / 2)  # novel halves: CLIP's 38
    assert _points(panels[0])["CLIP"][2] == 71.7  # the paper's printed HM average
    fig = draw_cost_figure(table)
    assert len(fig.axes) == 1 and "harmonic" in fig.axes[0].get_ylabel()


def test_rows_the_run_skipped_are_named_not_drawn():
    table = _table("tpt-ood", lambda c: None if c.external else _record(c, 55.0, gflops=40.0),
                   external_problem="needs --coop FILE")
    top1 = cost_panels(table)[0]
    assert top1.left_out["CoOp (16-shot)"] == "not run: needs --coop FILE"
    assert "CoOp (16-shot)" not in _points(top1)


def test_cell_gflops_reads_cost_or_its_flops_record_and_follows_same_as():
    by_key = {"a": {"cost": {"flops": {"gflops_per_image": 12.5}}}}
    assert cell_gflops(by_key["a"], by_key) == 12.5
    assert cell_gflops({"cost": {"gflops_per_image": 3}}, {}) == 3.0
    assert cell_gflops({"cost": {"gflops_per_image": 3}, "same_as": "a"}, by_key) == 12.5
    assert cell_gflops({"cost": {"seconds": 1.0}}, {}) is None
    assert cell_gflops({"same_as": "gone"}, {}) is None


# -- runs ------------------------------------------------------------------------------------------------

#: TDA's 15 runs on ImageNet-A: the tail is ceil(1.5) = 2 runs (48 and 49), ties far from the cut
TDA_A = [55.0, 49.0, 52.0, 60.0, 48.0, 53.5, 51.0, 58.0, 54.0, 50.0, 57.0, 56.0, 52.5, 59.0, 61.0]
#: DMN-like runs on V2, 10 runs with a tie at the cut: the tail is 1 run
TDA_V2 = [60.0, 58.0, 58.0, 62.0, 61.0, 59.0, 63.0, 64.0, 60.5, 59.5]


def _runs(values):
    return {"kind": "orders", "n_runs": len(values), "per_run": [{"run": r, "top1": v} for r, v in enumerate(values)]}


def _with_runs(cell):
    record = _ood(cell)
    if cell.row == "TDA" and cell.dataset == "imagenet_a":
        record["runs"] = _runs(TDA_A)
    if cell.row == "ZERO + Ensemble" and cell.dataset == "imagenet_v2":  # as a protocol table's cell keeps them
        record["evaluation"] = {"runs": {"kind": "streams", "summary": {}, "per_run_top1": TDA_V2}}
    if cell.row == "ZERO":
        record["evaluation"] = {"runs": {"kind": "order-free", "note": "one run"}}
    return record


def test_run_strips_have_the_tail_and_eta_by_hand():
    table = _table("tta-ood", _with_runs)
    strips = run_strips(table)
    assert list(strips) == ["imagenet_a", "imagenet_v2"]  # datasets where a cell ran several times
    a = {s.row: s for s in strips["imagenet_a"]}
    assert list(a) == ["ZERO", "ZERO + Ensemble", "TDA", "C-TPT (acc / ECE)"]
    tda = a["TDA"]
    assert tda.runs == tuple(sorted(TDA_A)) and tda.tail == 2 and tda.kind == "orders"
    assert tda.mean == pytest.approx(sum(TDA_A) / 15)
    assert tda.eta == pytest.approx((48.0 + 49.0) / 2)
    zero = a["ZERO"]  # ran once: its top-1, no tail
    assert (zero.runs, zero.mean, zero.eta, zero.tail, zero.kind) == ((), 60.0, None, 0, "once")
    protocol = get_protocol("tta-ood")
    assert tda.published == protocol.published.get(("TDA", "imagenet_a", "top1"))
    assert zero.dataset == tda.dataset == "imagenet_a"
    assert zero.published == protocol.published[("ZERO", "imagenet_a", "top1")]  # the paper's number, run once too
    v2 = {s.row: s for s in strips["imagenet_v2"]}["ZERO + Ensemble"]
    assert v2.tail == 1 and v2.eta == 58.0 and v2.mean == pytest.approx(60.5) and v2.kind == "streams"
    assert list(run_strips(table, ["imagenet_v2", "imagenet_r"])) == ["imagenet_v2"]
    assert run_strips(_table("tta-ood", _ood)) == {}


def test_runs_figure_marks_the_tail_and_draws_mean_and_eta(tmp_path):
    table = _table("tta-ood", _with_runs)
    fig = draw_runs_figure(table, ["imagenet_a"])
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "imagenet_a"
    y = 2  # TDA is the third row, top to bottom
    by_label = {}
    for c in ax.collections:
        by_label.setdefault(c.get_label(), []).append(c)
    tail = by_label["worst 10 % (tail)"][0].get_offsets()
    assert sorted(tail[:, 0].tolist()) == [48.0, 49.0] and all(abs(v - y) < 0.5 for v in tail[:, 1])
    rest = by_label["a run"][0].get_offsets()
    assert sorted(rest[:, 0].tolist()) == sorted(TDA_A)[2:]
    mean = by_label["mean"][0].get_segments()[0]
    eta = by_label["ETA"][0].get_segments()[0]
    assert mean[0][0] == pytest.approx(sum(TDA_A) / 15) and eta[0][0] == pytest.approx(48.5)
    assert mean[0][1] < y < mean[1][1]
    once = by_label["run once (order-free)"]
    assert sorted(c.get_offsets()[0][0] for c in once) == [51.0, 60.0, 61.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ZERO", "ZERO + Ensemble", "TDA", "C-TPT (acc / ECE)"]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first row on top
    assert draw_runs_figure(table, ["imagenet_r"]) is None
    assert write_runs_figure(_table("tta-ood", _ood), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_pngs_are_written_beside_the_markdown(tmp_path):
    table = _table("tta-ood", _with_runs, limit=20)
    written = write_table_figures(table, tmp_path / "tta-ood.md")
    assert written == {"cost": tmp_path / "tta-ood.cost.png", "runs": tmp_path / "tta-ood.runs.png"}
    for path in written.values():
        width, height = _png_size(path)
        assert 400 <= width <= 3000 and 250 <= height <= 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tta-ood.cost.png", "tta-ood.runs.png"]  # no temporaries
    assert "--limit 20" in draw_cost_figure(table)._suptitle.get_text()
    assert write_table_figures(_table("tta-ood", _ood), tmp_path / "x" / "t.md") == {"cost": tmp_path / "x" / "t.cost.png"}
    assert math.isclose(_png_size(write_cost_figure(table, tmp_path / "c.png"))[0], _png_size(written["cost"])[0])


def test_cell_runs_reads_both_formats_and_order_free_cells_ran_once():
    assert cell_runs({"evaluation": {"runs": {"kind": "orders", "per_run_top1": [3, 1.5]}}}) == ("orders", [3.0, 1.5])
    assert cell_runs({"runs": {"kind": "tasks", "per_run": [{"top1": 2}, {"top1": 4}]}}) == ("tasks", [2.0, 4.0])
    assert cell_runs({"runs": {"per_run": [{"top1": 2}]}}) == ("runs", [2.0])
    assert cell_runs({"evaluation": {"runs": {"kind": "order-free", "note": "one run"}}}) is None
    assert cell_runs({"evaluation": {}, "metrics": {"top1": 50.0}}) is None


@pytest.mark.skipif("oga-runs" not in table_names(), reason="the oga-runs table is not registered in this tree")
def test_oga_runs_table_mean_over_the_runs_against_gflops_and_one_panel_per_dataset():
    datasets = get_protocol("oga-runs").datasets
    assert len(datasets) == 11

    def numbers(cell):
        i = datasets.index(cell.dataset)
        if cell.row == "Zero-shot CLIP":
            record = _record(cell, 60.0 + i, ece=4.0, gflops=35.25)
            record["metrics"].update(eta=60.0 + i, spread=0.0, runs=1)
            record["evaluation"] = {"runs": {"kind": "order-free"}}
            return record
        if cell.row == "DMN-ZS" and cell.dataset == "dtd":  # a row in the middle without a cell
            return None
        shift = {"TDA": 2.0, "DMN-ZS": 1.0, "DPE": 3.0}[cell.row]
        runs = [60.0 + i + shift + d for d in (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 0.0, -0.5, 0.5, 0.0)]
        record = _record(cell, sum(runs) / 10, ece=3.0 + shift, gflops=35.5 + shift)
        record["metrics"].update(eta=min(runs), spread=1.0, runs=10)
        record["evaluation"] = {"runs": {"kind": "orders", "per_run_top1": runs, "per_run_ece": [1.0] * 10}}
        return record

    table = _table("oga-runs", numbers)
    top1, ece = cost_panels(table)
    assert (top1.average, top1.datasets) == ("avg (11)", datasets)
    mean_i = sum(range(11)) / 11  # 5
    got = _points(top1)
    assert got["Zero-shot CLIP"] == pytest.approx((35.25, 60.0 + mean_i, 65.3))
    # each run list's mean is 60 + i + shift + 0.0 (the offsets sum to 0)
    assert got["TDA"] == pytest.approx((37.5, 62.0 + mean_i, 67.7))
    assert got["DPE"][:2] == pytest.approx((38.5, 63.0 + mean_i)) and got["DPE"][2] is None
    assert top1.left_out == {"DMN-ZS": "10 of 11 cells"}
    assert _points(ece)["TDA"][1] == pytest.approx(5.0)
    strips = run_strips(table)
    assert list(strips) == list(datasets)
    tda = {s.row: s for s in strips["dtd"]}["TDA"]
    i = datasets.index("dtd")
    assert tda.tail == 1 and tda.eta == pytest.approx(60.0 + i + 2.0 - 2.0) and tda.mean == pytest.approx(62.0 + i)
    assert [s.row for s in strips["dtd"]] == ["Zero-shot CLIP", "TDA", "DPE"]  # DMN-ZS has no dtd cell
    assert {s.row: s for s in strips["dtd"]}["Zero-shot CLIP"].kind == "once"
    fig = draw_runs_figure(table)
    assert len([ax for ax in fig.axes if ax.has_data()]) == 11


# -- tables the protocols do not describe, and rows with nothing to draw (figure_data survivors) -----------------


def test_a_table_protext_does_not_know_is_drawn_over_all_its_datasets():
    protocol = get_protocol("tta-ood")
    known = _table("tta-ood", _ood)
    unknown = {**known, "table": "my-own"}  # e.g. a TABLE.json of a table this version does not register
    renamed = {**known, "rows": [{**r, "averages": {"mine": r["averages"]["avg (OOD 4)"]}} for r in known["rows"]]}
    for table in (unknown, renamed):
        top1, ece = cost_panels(table)
        assert (top1.average, top1.measure, top1.datasets, top1.of) == ("all datasets", "top1", DATASETS, 5)
        assert (ece.average, ece.measure, ece.datasets) == ("all datasets", "ece", DATASETS)
        # by hand over all five sets: no printed average to take, so the mean of the cells
        zero = [protocol.published[("ZERO", d, "top1")] for d in DATASETS]
        assert _points(top1)["ZERO"] == pytest.approx((18204 / 5, 306 / 5, sum(zero) / 5))
        assert _points(top1)["TDA"][:2] == pytest.approx(((9000 + 35.5 + 36.5 + 35.0 + 37.0) / 5, 292 / 5))
        assert _points(ece)["ZERO + Ensemble"][:2] == pytest.approx((18600 / 5, 5.0))
        assert top1.left_out == {"C-TPT (acc / ECE)": "no GFLOPs in 1 of 5 datasets"}


def test_a_table_with_one_row_or_none_keeps_its_average():
    known = _table("tta-ood", _ood)
    (top1, _ece) = cost_panels({**known, "rows": known["rows"][:1]})
    assert top1.average == "avg (OOD 4)" and list(_points(top1)) == ["ZERO"]
    assert _points(top1)["ZERO"][:2] == pytest.approx((9204 / 4, 59.0))
    assert cost_panels({**known, "rows": []}) == [
        CostPanel("all datasets", "top1", DATASETS, 5, (), {})]  # an empty ECE panel is dropped


def test_a_skipped_row_does_not_hide_the_rows_after_it():
    table = {**_table("tta-ood", _ood), "rows_not_run": {"ZERO": "skipped by hand"}}
    top1, ece = cost_panels(table)
    assert list(_points(top1)) == list(_points(ece)) == ["ZERO + Ensemble", "TDA"]
    assert top1.left_out == {"ZERO": "not run: skipped by hand", "C-TPT (acc / ECE)": "no GFLOPs in 1 of 4 datasets"}


def test_an_average_whose_datasets_are_all_missing_names_every_row():
    table = _table("tta-ood", _ood, missing=OOD4)
    panels = cost_panels(table)
    assert [(p.measure, p.datasets, p.points) for p in panels] == [("top1", (), ())]  # the empty ECE panel dropped
    assert panels[0].left_out == {row: "none of the average's datasets found" for row in TOP1}


def test_base_to_novel_with_a_dataset_missing_is_the_hm_of_the_means_over_the_rest():
    protocol = get_protocol("protext-base2novel")
    found = [d for d in protocol.datasets if d != "eurosat"]

    def numbers(cell):
        if (cell.row, cell.dataset, cell.split) == ("CuPL", "dtd", "novel"):
            return None  # CuPL misses one half of one dataset
        i = protocol.datasets.index(cell.dataset)
        top1 = {"CLIP": 60.0, "CuPL": 70.0, "ProText": 80.0}[cell.row] + i if cell.split == "base" else 40.0 + i * i
        return _record(cell, top1, gflops=10.0)

    (hm,) = cost_panels(_table("protext-base2novel", numbers, missing=("eurosat",)))
    assert (hm.measure, hm.datasets, hm.of) == ("hm", tuple(found), 11)
    idx = [protocol.datasets.index(d) for d in found]
    base, novel = sum(60.0 + i for i in idx) / 10, sum(40.0 + i * i for i in idx) / 10
    pub_base = sum(protocol.published[("CLIP", d, "base")] for d in found) / 10
    pub_novel = sum(protocol.published[("CLIP", d, "novel")] for d in found) / 10
    assert _points(hm)["CLIP"] == pytest.approx(
        (10.0, 2 * base * novel / (base + novel), 2 * pub_base * pub_novel / (pub_base + pub_novel)))
    assert hm.left_out == {"CuPL": "9 of 10 cells"}


def test_the_ece_of_a_table_that_reports_it_is_the_tables_own_with_the_papers_beside_it():
    # every row with GFLOPs on every set; ImageNet-Sketch missing, so the ECE point is worked out, not printed
    table = _table("tta-ood", lambda c: _record(c, 50.0, ece=ECE[c.row][DATASETS.index(c.dataset)], gflops=40.0),
                   missing=("imagenet_sketch",))
    ece = [p for p in cost_panels(table) if p.measure == "ece"][0]
    assert ece.datasets == ("imagenet_a", "imagenet_v2", "imagenet_r")
    # C-TPT's published ECE over A, V2, R: (8.16 + 6.23 + 1.54) / 3
    assert _points(ece)["C-TPT (acc / ECE)"] == pytest.approx((40.0, 1.0, (8.16 + 6.23 + 1.54) / 3))
    assert _points(ece)["TDA"] == (40.0, 2.0, None)  # the paper printed no ECE for TDA


def test_a_point_is_the_printed_average_and_the_cells_mean_only_where_none_is_printed():
    table = _table("tta-ood", _ood)
    zero = table["rows"][0]["averages"]["avg (OOD 4)"]["top1"]
    zero["ours"] = 12.34  # a payload edited by hand: the point follows what TABLE.md prints
    assert _points(cost_panels(table)[0])["ZERO"][1] == 12.34
    zero["ours"] = None
    assert _points(cost_panels(table)[0])["ZERO"][1] == pytest.approx(59.0)  # (60 + 62 + 64 + 50) / 4


def test_a_row_without_positive_gflops_has_no_point_on_the_log_axis():
    gflops = {"ZERO": 0.0, "ZERO + Ensemble": 0.5, "TDA": 35.0, "C-TPT (acc / ECE)": -1.0}
    table = _table("tta-ood", lambda c: _record(c, 50.0, gflops=gflops[c.row]))
    top1 = cost_panels(table)[0]
    assert {row: point[:2] for row, point in _points(top1).items()} == {"ZERO + Ensemble": (0.5, 50.0), "TDA": (35.0, 50.0)}
    why = "GFLOPs per image not positive (no point on a log axis)"
    assert top1.left_out == {"ZERO": why, "C-TPT (acc / ECE)": why}
