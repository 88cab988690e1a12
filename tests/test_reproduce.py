"""``reproduce``: planning, resuming, comparing and bad input, first with a fake cell runner, then end
to end on tiny-clip over synthetic dataset trees (random weights: no accuracy is asserted).

Expected averages, harmonic means and differences are computed by hand in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protext.errors import UserError
from protext.protocols import get_protocol
from protext.reproduction import Cell, ReproduceConfig, plan_cells, render_markdown, reproduce

from synthetic_datasets import make_tree

REPO = Path(__file__).resolve().parents[1]
CUPL = REPO.parent / "shared" / "cupl"
IMAGENET_FAMILY = ["imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"]


class FakeRunner:
    """Records what it is asked; top-1 comes from ``values`` or a hash of the cell's settings."""

    def __init__(self, values=None, fail_after=None):
        self.values = values or {}
        self.fail_after = fail_after
        self.evaluated: list[str] = []
        self.trained: list[str] = []

    def environment(self):
        return {"device": "fake", "torch": "x", "open_clip": "y", "protext": "z"}

    def check_prompts(self, path: Path) -> None:
        if Path(path).read_text() != "prompts":
            raise UserError(f"{path}: prompts of other weights")

    def train(self, job):
        self.trained.append(job.preset)
        Path(job.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        Path(job.checkpoint).write_text("prompts")
        return {"cost": {"seconds": 2.0}, "epochs": job.overrides.get("epochs"), "classes": len(job.classes)}

    def evaluate(self, request):
        if self.fail_after is not None and len(self.evaluated) >= self.fail_after:
            raise KeyboardInterrupt  # a crash mid-table
        cell: Cell = request.cell
        self.evaluated.append(cell.key)
        top1 = self.values.get((cell.row, cell.dataset, cell.split))
        if top1 is None:
            top1 = int(hashlib.sha256(repr(cell.computation()).encode()).hexdigest(), 16) % 10000 / 100
        return {"metrics": {"top1": top1, "n_images": 3, "n_classes": cell.n_classes}, "seconds": 0.25, "template": cell.template}


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("imagenet-family")
    make_tree(root, IMAGENET_FAMILY, classes_per_dataset=2, shared=shared_dir)
    return root


@pytest.fixture(scope="module")
def full_root(tmp_path_factory, shared_dir):
    """Every dataset of every table, two classes with images each."""
    root = tmp_path_factory.mktemp("all-datasets")
    names = [n for n in get_protocol("protext-tpt").datasets]
    make_tree(root, names, classes_per_dataset=2, shared=shared_dir)
    return root


def without_cost(path: Path, out_dir: Path | None = None):
    """A table file with its wall times and memory (the ``cost`` entries) and its own folder name taken out."""
    out_dir = out_dir or path.parent

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "cost"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(out_dir), "OUT") if isinstance(value, str) else value

    return strip(json.loads(path.read_text()))


def _config(table, root, out, **kw):
    return ReproduceConfig(table, str(root), out=str(out), descriptions=str(CUPL), progress=False, **kw)


def test_dg_differences_and_averages_by_hand(imagenet_root, tmp_path):
    values = {("CLIP", d, "all"): v for d, v in zip(["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"], [60, 50, 40, 30, 20])}
    run = reproduce(_config("protext-dg", imagenet_root, tmp_path / "dg"), FakeRunner(values), say=lambda m: None)
    clip = next(r for r in run.table["rows"] if r["name"] == "CLIP")
    assert clip["cells"]["imagenet"]["top1"] == {"ours": 60, "published": 66.72, "difference": -6.72}
    assert clip["cells"]["imagenet_a"]["top1"]["difference"] == pytest.approx(30 - 47.77)
    avg = clip["averages"]["avg (4)"]["top1"]
    # variants only: (50 + 40 + 30 + 20) / 4 = 35; the paper printed 57.18
    assert avg["ours"] == 35.0 and avg["published"] == 57.18 and avg["difference"] == pytest.approx(35 - 57.18)
    assert avg["mean_of_published_cells"] == pytest.approx((60.83 + 46.15 + 47.77 + 73.96) / 4, abs=1e-4)
    # one training (text_only/imagenet) shared by the five ProText cells
    assert run.table["prompts"].keys() == {"text_only/imagenet"}
    md = run.markdown_path.read_text()
    assert "| CLIP | 60.00 (66.72, -6.72) |" in md and "35.00 (57.18, -22.18)" in md


def test_base2novel_harmonic_means_by_hand(full_root, tmp_path):
    p = get_protocol("protext-base2novel")
    values = {}
    for d in p.datasets:
        base, novel = (70, 40) if d == "imagenet" else (80, 60)
        values.update({("ProText", d, "base"): base, ("ProText", d, "novel"): novel})
    runner = FakeRunner(values)
    run = reproduce(_config("protext-base2novel", full_root, tmp_path / "b2n"), runner, say=lambda m: None)
    row = next(r for r in run.table["rows"] if r["name"] == "ProText")
    assert row["cells"]["imagenet"]["hm"]["ours"] == pytest.approx(2 * 70 * 40 / 110, abs=1e-4)
    assert row["cells"]["dtd"]["hm"]["ours"] == pytest.approx(2 * 80 * 60 / 140, abs=1e-4)
    assert row["cells"]["dtd"]["hm"]["published"] == 62.33
    avg = row["averages"]["average"]
    assert avg["base"]["ours"] == pytest.approx(870 / 11, abs=1e-4)
    assert avg["novel"]["ours"] == pytest.approx(640 / 11, abs=1e-4)
    # HM of the averages (CoOp's rule), not the mean of the per-dataset HMs
    assert avg["hm"]["ours"] == pytest.approx(2 * 870 * 640 / (11 * 1510), abs=1e-4)
    assert avg["hm"]["published"] == 74.91
    # CuPL's novel cells are CLIP's: never evaluated twice, marked as the same
    cupl = next(r for r in run.table["rows"] if r["name"] == "CuPL")
    clip = next(r for r in run.table["rows"] if r["name"] == "CLIP")
    assert all(cupl["cells"][d]["novel"]["ours"] == clip["cells"][d]["novel"]["ours"] for d in p.datasets)
    assert sum(k.startswith("cupl__") and k.endswith("__novel") for k in runner.evaluated) == 0
    assert sorted(set(runner.trained)) == sorted(runner.trained) == sorted(f"base2novel/{d}" for d in p.datasets)


def test_crash_mid_table_then_rerun_recomputes_nothing_and_ends_identical(imagenet_root, tmp_path):
    whole = reproduce(_config("tpt-ood", imagenet_root, tmp_path / "a"), FakeRunner(), say=lambda m: None)
    crashing = FakeRunner(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        reproduce(_config("tpt-ood", imagenet_root, tmp_path / "b"), crashing, say=lambda m: None)
    done = sorted(p.name for p in (tmp_path / "b" / "cells").iterdir())
    assert len(done) == 4
    again = FakeRunner()
    rerun = reproduce(_config("tpt-ood", imagenet_root, tmp_path / "b"), again, say=lambda m: None)
    assert not set(again.evaluated) & {n[:-5] for n in done}
    assert len(again.evaluated) + 4 == len(whole.computed)
    third = FakeRunner()
    reproduce(_config("tpt-ood", imagenet_root, tmp_path / "b"), third, say=lambda m: None)
    assert third.evaluated == [] and third.trained == []
    assert without_cost(tmp_path / "a" / "tpt-ood.json") == without_cost(tmp_path / "b" / "tpt-ood.json")
    assert (tmp_path / "b" / "tpt-ood.md").read_text() == render_markdown(json.loads((tmp_path / "b" / "tpt-ood.json").read_text()))
    assert rerun.table["rows_not_run"]["CoOp (16-shot)"].startswith("needs CoOp")


def test_missing_datasets_listed_and_the_rest_runs(tmp_path, shared_dir):
    root = tmp_path / "data"
    make_tree(root, ["dtd", "eurosat"], classes_per_dataset=2, shared=shared_dir)
    runner = FakeRunner()
    run = reproduce(_config("tpt-xd", root, tmp_path / "out"), runner, say=lambda m: None)
    assert set(run.table["missing_datasets"]) == set(get_protocol("tpt-xd").datasets) - {"dtd", "eurosat"}
    assert all(fix for fix in run.table["missing_datasets"].values())
    assert sorted(runner.evaluated) == sorted(f"{r}__{d}__all" for r in ("clip-a-photo-of-a", "tpt") for d in ("dtd", "eurosat"))
    avg = run.table["rows"][0]["averages"]["avg"]["top1"]
    assert avg["ours"] is None and avg["complete"] == 2 and avg["of"] == 10
    assert "## Missing datasets" in run.markdown_path.read_text()


# --------------------------------------------------------------------------------------------------
# bad input: one line, nothing written lost


def test_root_with_none_of_the_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds none of tpt-xd's 10 datasets"):
        reproduce(_config("tpt-xd", tmp_path / "empty", tmp_path / "out"), FakeRunner(), say=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_unknown_table(tmp_path):
    with pytest.raises(UserError, match="protext-base2novel"):
        reproduce(_config("protext-b2n", tmp_path, tmp_path / "out"), FakeRunner(), say=lambda m: None)


def test_descriptions_missing_for_classes(imagenet_root, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    data = json.loads((CUPL / "imagenet_prompts_base.json").read_text())
    del data["goldfish"], data["tench"]
    (release / "imagenet_prompts_base.json").write_text(json.dumps(data))
    config = ReproduceConfig("protext-dg", str(imagenet_root), out=str(tmp_path / "out"), descriptions=str(release))
    with pytest.raises(UserError, match=r"^--descriptions: .*release/imagenet_prompts_base.json: no descriptions for 2 of .*imagenet.*tench"):
        reproduce(config, FakeRunner(), say=lambda m: None)
    no_folder = ReproduceConfig("protext-dg", str(imagenet_root), out=str(tmp_path / "out2"))
    with pytest.raises(UserError, match="--descriptions DIR"):
        reproduce(no_folder, FakeRunner(), say=lambda m: None)


def test_checkpoint_of_other_weights_refused_and_kept(imagenet_root, tmp_path):
    out = tmp_path / "dg"
    reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    ckpt = out / "prompts" / "text-only-imagenet.safetensors"
    ckpt.write_text("other weights")
    for cell in (out / "cells").glob("protext__*"):
        cell.unlink()
    with pytest.raises(UserError, match="prompts of other weights"):
        reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    assert ckpt.read_text() == "other weights"


def test_half_written_or_foreign_results_folder(imagenet_root, tmp_path):
    out = tmp_path / "dg"
    reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    cell = out / "cells" / "clip__imagenet_a__all.json"
    cell.write_text(cell.read_text()[:40])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"clip__imagenet_a__all.json is damaged or half-written.*delete that file"):
        reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds another run .*limit None there, 3 now"):
        reproduce(_config("protext-dg", imagenet_root, out, limit=3), FakeRunner(), say=lambda m: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a protext reproduce folder"):
        reproduce(_config("protext-dg", imagenet_root, foreign), FakeRunner(), say=lambda m: None)
    assert (foreign / "notes.txt").read_text() == "mine"
