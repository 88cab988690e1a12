"""``reproduce oga-runs`` and ``reproduce stata`` (issue 17 item 5): the table arithmetic with a fake runner,
then each table end to end through the command on tiny-clip (random weights) over synthetic trees, a few
orders or tasks per cell; bad flags and ``--plan`` without torch.

Means, tails and spreads are recomputed here from each cell's per-run accuracies, and the orders from
OGA's two lines written out with numpy, not read from protext.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protext.protocols import get_protocol
from protext.reproduce import main
from protext.reproduction import ReproduceConfig, reproduce

from conftest import TEST_TIMEOUT
from synthetic_datasets import make_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-clip", "--pretrained", "random", "--workers", "0", "--no-progress"]


class FakeRunner:
    """Every cell's mean, ETA and spread from ``values`` (by row and dataset); nothing is loaded."""

    def __init__(self, values):
        self.values = values

    def environment(self):
        return {"device": "fake"}

    def evaluate(self, request):
        cell = request.cell
        top1, eta, spread = self.values[(cell.row, cell.dataset)]
        metrics = {"top1": top1, "eta": eta, "spread": spread, "runs": 1, "n_images": 3, "n_classes": cell.n_classes}
        return {"metrics": metrics, "template": cell.template, "cost": {"gflops_per_image": 1.0}}


@pytest.fixture(scope="module")
def eleven_root(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("eleven")
    make_tree(root, get_protocol("oga-runs").datasets, classes_per_dataset=2, shared=shared_dir)
    return root


def test_averages_tails_and_pivot_by_hand(eleven_root, tmp_path):
    """11-set averages of the means, ETAs and spreads; the pivot's ours, published and difference; the
    published-only methods beside the table, not as rows."""
    p = get_protocol("stata")
    values = {}
    for i, row in enumerate(p.rows):
        for j, dataset in enumerate(p.datasets):
            values[(row.name, dataset)] = (50.0 + i + j, 40.0 + i, 0.25 * j)
    run = reproduce(ReproduceConfig("stata", str(eleven_root), out=str(tmp_path), progress=False), FakeRunner(values),
                    say=lambda m: None)
    rows = {r["name"]: r for r in run.table["rows"]}
    tda_low = rows["TDA (online-low)"]["averages"]["avg (11)"]
    i = [r.name for r in p.rows].index("TDA (online-low)")
    # by hand: mean over j = 0..10 of (50 + i + j) is 55 + i; ETA 40 + i; spread mean of 0.25 j is 1.25
    assert tda_low["top1"]["ours"] == pytest.approx(55.0 + i) and tda_low["top1"]["published"] == 67.7
    assert tda_low["top1"]["difference"] == pytest.approx(55.0 + i - 67.7, abs=1e-4)
    assert tda_low["eta"]["ours"] == pytest.approx(40.0 + i) and tda_low["eta"]["published"] is None
    assert tda_low["spread"]["ours"] == pytest.approx(1.25)
    pivot = run.table["pivot"]
    assert pivot["settings"] == ["very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all",
                                 "online-low", "online-medium", "online-high", "online-separate"]
    cell = next(c for c in pivot["cells"] if c["method"] == "TDA" and c["setting"] == "online-low")
    assert (cell["ours"], cell["published"], cell["eta"]) == (pytest.approx(55.0 + i), 67.7, pytest.approx(40.0 + i))
    clip = [c for c in pivot["cells"] if c["method"] == "CLIP zero-shot"]
    assert len(clip) == 11 and {c["ours"] for c in clip} == {55.0} and {c["published"] for c in clip} == {65.2}
    stata_cells = {c["setting"]: c for c in pivot["cells"] if c["method"] == "StatA"}
    assert len(stata_cells) == 11 and stata_cells["all"]["published"] == 69.9 and stata_cells["all"]["ours"] is None
    assert not stata_cells["all"]["implemented"] and run.table["published_only"] == []  # every one sits in the pivot
    md = run.markdown_path.read_text()
    assert "## avg (11) by method and setting" in md and "| StatA * |" in md and "| TransCLIP * |" in md
    assert "## ETA: mean top-1 of the worst 10 % of runs (%)" in md and "## spread: standard deviation" in md
    # oga-runs: OGA itself, and the custom-prompt numbers, beside the table
    values = {(r.name, d): (60.0, 59.0, 0.5) for r in get_protocol("oga-runs").rows for d in p.datasets}
    run = reproduce(ReproduceConfig("oga-runs", str(eleven_root), out=str(tmp_path), progress=False), FakeRunner(values),
                    say=lambda m: None)
    assert run.table["pivot"] is None and {"method": "OGA", "setting": "standard prompts, avg (11)", "published": 68.5} \
        in run.table["published_only"]
    md = run.markdown_path.read_text()
    assert "| OGA | standard prompts, avg (11) | 68.50 |" in md and "| OGA |" not in md.split("## Published numbers")[0]
    assert "| TDA | 60.00 (67.70, -7.70)" not in md  # the published number is an average, not a dataset's cell
    assert "60.00 (67.70, -7.70)" in md  # ... and stands under avg (11)


def _oga_orders(seed: int, runs: int, n: int) -> list[list[int]]:
    """OGA's runner.py:54-55 and 158-161, written out here."""
    seeds = np.random.default_rng(seed).choice(range(10000 * runs), size=runs, replace=False)
    return [list(np.random.default_rng(s).choice(range(n), n, replace=False)) for s in seeds]


def _cells(out: Path, table: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / table / "cells").glob("*.json")}


def _check_runs(cell: dict, n_runs: int) -> None:
    """mean, ETA (worst 10 %: ceil(0.1 n) runs) and population spread, from the per-run accuracies by hand."""
    per_run = cell["evaluation"]["runs"]["per_run_top1"]
    m = cell["metrics"]
    assert len(per_run) == n_runs == m["runs"]
    mean = sum(per_run) / n_runs
    tail = sorted(per_run)[: math.ceil(0.1 * n_runs)]
    assert m["top1"] == pytest.approx(mean)
    assert m["eta"] == pytest.approx(sum(tail) / len(tail))
    assert m["spread"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in per_run) / n_runs))
    assert cell["cost"]["gflops_per_image"] > 0


def test_oga_runs_end_to_end_on_tiny_clip(tmp_path, shared_dir, capsys):
    root = tmp_path / "data"
    make_tree(root, ["dtd", "eurosat"], classes_per_dataset=3, per_class=2, shared=shared_dir)
    out = tmp_path / "out"
    assert main(["oga-runs", "--root", str(root), "--out", str(out), "--stream-runs", "3", *TINY]) == 0
    assert "oga-runs: 8 cells computed" in capsys.readouterr().out
    cells = _cells(out, "oga-runs")
    assert len(cells) == 8  # 4 rows x 2 datasets
    for dataset in ("dtd", "eurosat"):
        zero = cells[f"zero-shot-clip__{dataset}__all"]
        assert zero["metrics"]["runs"] == 1 and zero["metrics"]["eta"] == zero["metrics"]["top1"]
        assert zero["metrics"]["spread"] == 0.0 and "runs" not in zero["settings"]["tta"] if zero["settings"]["tta"] else True
        n = zero["metrics"]["n_images"]
        seeds = None
        for row in ("tda", "dmn-zs", "dpe"):
            cell = cells[f"{row}__{dataset}__all"]
            _check_runs(cell, 3)
            runs = cell["evaluation"]["runs"]
            assert runs["kind"] == "orders" and runs["master_seed"] == 42
            assert seeds is None or runs["seeds"] == seeds  # the same orders for every method
            seeds = runs["seeds"]
            assert cell["evaluation"]["tta"]["settings"]["views"] == 1
        orders = _oga_orders(42, 3, n)
        assert seeds == [int(s) for s in np.random.default_rng(42).choice(range(30000), size=3, replace=False)]
        per_run = cells[f"tda__{dataset}__all"]["evaluation"]["runs"]["per_run"]
        assert [r["first_indices"] for r in per_run] == [[int(i) for i in order[:10]] for order in orders]
        assert [r["images"] for r in per_run] == [n] * 3 and [r["batches"] for r in per_run] == [math.ceil(n / 32)] * 3
        tda = cells[f"tda__{dataset}__all"]["evaluation"]["tta"]["settings"]
        assert (tda["tda_alpha"], tda["tda_beta"]) == (2.0, 5.0)
        assert (tda["tda_positive_shots"], tda["tda_negative_shots"], tda["stream_update"]) == (5, 3, "batch")
        dmn = cells[f"dmn-zs__{dataset}__all"]["evaluation"]["tta"]["settings"]
        assert (dmn["dmn_memory"], dmn["dmn_beta2"], dmn["stream_update"]) == (8, 1.0, "batch")
        # OGA's batch rule for TDA and DMN-ZS, recorded with the runs; DPE image by image
        assert [cells[f"{row}__{dataset}__all"]["evaluation"]["runs"]["update"] for row in ("tda", "dmn-zs", "dpe")] \
            == ["batch", "batch", "image"]
    table = json.loads((out / "oga-runs" / "oga-runs.json").read_text())
    assert table["measures"] == ["top1", "eta", "spread"]
    assert any(d.startswith("--stream-runs 3:") for d in table["departures"])
    md = (out / "oga-runs" / "oga-runs.md").read_text()
    for head in ("## mean top-1 over the runs (%)", "## ETA: mean top-1 of the worst 10 % of runs (%)",
                 "## spread: standard deviation of the per-run top-1 (points)", "| cell | template (rule) | TTA | runs |"):
        assert head in md
    assert "— (2/11 cells) (65.30)" in md  # the published 11-set average beside our incomplete one
    for kind in ("cost", "runs"):  # the pictures beside the markdown, linked from it
        png = out / "oga-runs" / f"oga-runs.{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{kind}](oga-runs.{kind}.png)" in md


def _stata_rows(monkeypatch, keep: set[str]) -> None:
    """``stata`` cut to the rows ``keep`` (the whole table encodes the test set once per row: 24 times)."""
    from dataclasses import replace

    import protext.protocols as protocols

    full = get_protocol("stata")
    small = replace(full, rows=tuple(r for r in full.rows if r.name in keep),
                    published_averages={k: v for k, v in full.published_averages.items() if k[0] in keep},
                    pivot=tuple(e for e in full.pivot if e[0] in keep))
    monkeypatch.setitem(protocols.PROTOCOLS, "stata", small)


def _check_scenario(cell: dict, n_tasks: int) -> dict:
    _check_runs(cell, n_tasks)
    runs, settings = cell["evaluation"]["runs"], cell["settings"]["runs"]
    assert runs["kind"] == settings["kind"] and runs["scenario"] == settings["scenario"] and runs["seed"] == 1
    assert cell["evaluation"]["tta"]["settings"]["views"] == 1
    return runs


def test_stata_end_to_end_on_tiny_clip(tmp_path, shared_dir, capsys, monkeypatch):
    """A row of each kind but the online one (next test): zero-shot, episodic, two batch scenarios, through the
    command on two sets; the whole table's 24 rows are covered by the fake-runner test above."""
    _stata_rows(monkeypatch, {"CLIP zero-shot", "MTA", "TDA (very_low)", "DMN-ZS (all)"})
    root = tmp_path / "data"
    make_tree(root, ["dtd", "eurosat"], classes_per_dataset=3, per_class=2, shared=shared_dir)
    out = tmp_path / "out"
    # --tta-views 1: MTA on one view (tiny synthetic images give identical crops, where MTA's bandwidth is 0)
    assert main(["stata", "--root", str(root), "--out", str(out), "--tasks", "2", "--tta-views", "1", *TINY]) == 0
    cells = _cells(out, "stata")
    assert len(cells) == 8
    for dataset in ("dtd", "eurosat"):
        zero, mta = cells[f"clip-zero-shot__{dataset}__all"], cells[f"mta__{dataset}__all"]
        assert zero["metrics"]["runs"] == mta["metrics"]["runs"] == 1 and mta["metrics"]["eta"] == mta["metrics"]["top1"]
        assert mta["evaluation"]["tta"]["method"] == "mta"
        very_low = _check_scenario(cells[f"tda-very-low__{dataset}__all"], 2)
        assert (very_low["k_min"], very_low["k_max"], very_low["batch_size"]) == (1, 4, 64)
        assert all(r["batches"] == 1 and r["images"] <= 6 for r in very_low["per_run"])  # a task: one batch
        everything = _check_scenario(cells[f"dmn-zs-all__{dataset}__all"], 2)
        n = zero["metrics"]["n_images"]
        assert [r["images"] for r in everything["per_run"]] == [n, n]  # "all": the whole set, reshuffled per task
    md = (out / "stata" / "stata.md").read_text()
    assert "## avg (11) by method and setting" in md and "| StatA * |" in md
    assert "--tasks 2: 2 tasks or streams per scenario cell" in md


@pytest.mark.slow
def test_stata_online_scenario_end_to_end_on_tiny_clip(tmp_path, shared_dir, monkeypatch):
    """An online scenario streams batches of 128: 130 images give one full batch per stream (2 dropped)."""
    _stata_rows(monkeypatch, {"DMN-ZS (online-separate)"})
    root = tmp_path / "data"
    make_tree(root, ["eurosat"], per_class=13, shared=shared_dir)
    out = tmp_path / "out"
    assert main(["stata", "--root", str(root), "--out", str(out), "--tasks", "2", *TINY]) == 0
    runs = _check_scenario(_cells(out, "stata")["dmn-zs-online-separate__eurosat__all"], 2)
    assert runs["gamma"] == -1 and [r["images"] for r in runs["per_run"]] == [128, 128]


RUN = """
import sys
from protext.reproduce import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("argv, message", [
    (["oga-runs", "--stream-runs", "0"], "--stream-runs must be between 1 and 10000, got 0."),
    (["stata", "--tasks", "0"], "--tasks must be between 1 and 10000, got 0."),
    (["stata", "--stream-runs", "5"], "--stream-runs applies to tables whose cells replay stream orders"),
    (["oga-runs", "--tasks", "5"], "--tasks applies to tables whose cells replay a StatA scenario"),
    (["tta-xd", "--stream-runs", "5"], "tta-xd has none"),
    (["oga-runs", "--stream-runs", "0", "--plan"], "--stream-runs must be between 1 and 10000"),
])
def test_bad_run_counts_are_one_line_before_torch(argv, message, tmp_path):
    (tmp_path / "data").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = argv + ["--root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", RUN, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TEST_TIMEOUT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "torch imported: False" in done.stdout and not (tmp_path / "out").exists()


def test_list_and_plan_name_every_cell(capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert " 44 cells  OGA" in listing and "264 cells  StatA" in listing
    for table, cells in (("oga-runs", 44), ("stata", 264)):
        assert main([table, "--plan"]) == 0
        lines = capsys.readouterr().out.splitlines()
        cell_lines = [ln for ln in lines if "__all:" in ln]
        assert len(cell_lines) == cells and all(" runs=[" in ln for ln in cell_lines)
        assert any(ln.startswith("  known departure: ") for ln in lines)
    assert main(["stata", "--plan", "--tasks", "7"]) == 0
    plan = capsys.readouterr().out
    assert "tda-online-separate__dtd__all" in plan and "streams:7 seed:1 batch:128 gamma:-1" in plan
    assert "scenario:very_high tasks:7 seed:1 batch:1000 K:50-100" in plan
    assert "  departs: --tasks 7: 7 tasks or streams per scenario cell" in plan
