"""``reproduce``: planning, resuming, comparing and bad input, first with a fake cell runner, then end
to end on tiny-clip over synthetic dataset trees (random weights: no accuracy is asserted).

Expected averages, harmonic means and differences are computed by hand in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protext.errors import UserError
from protext.protocols import get_protocol
from protext.reproduction import STOP_AFTER_ENV, Cell, ReproduceConfig, plan_cells, render_markdown, reproduce

from conftest import SHARED, TEST_TIMEOUT
from synthetic_datasets import make_tree

REPO = Path(__file__).resolve().parents[1]
CUPL = SHARED / "cupl"
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
        metrics = {"top1": top1, "ece": top1 / 10, "n_images": 3, "n_classes": cell.n_classes}
        if cell.runs is not None:  # a protocol table's cell: its runs' tail and spread too
            metrics.update(eta=top1 - 1, spread=0.5, runs=cell.runs.get("stream_runs") or cell.runs.get("tasks") or 1)
        return {"metrics": metrics, "seconds": 0.25, "template": cell.template}


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


RELEASE = {"folder": CUPL}


@pytest.fixture(scope="module", autouse=True)
def _small_release(small_cupl):
    """Every test of this file reads the one-description-per-class release (the real keys and file names)."""
    RELEASE["folder"] = small_cupl


def _config(table, root, out, **kw):
    return ReproduceConfig(table, str(root), out=str(out), descriptions=str(RELEASE["folder"]), progress=False, **kw)


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
    done = sorted(p.name for p in (tmp_path / "b" / "tpt-ood" / "cells").iterdir())
    assert len(done) == 4
    again = FakeRunner()
    rerun = reproduce(_config("tpt-ood", imagenet_root, tmp_path / "b"), again, say=lambda m: None)
    assert not set(again.evaluated) & {n[:-5] for n in done}
    assert len(again.evaluated) + 4 == len(whole.computed)
    third = FakeRunner()
    reproduce(_config("tpt-ood", imagenet_root, tmp_path / "b"), third, say=lambda m: None)
    assert third.evaluated == [] and third.trained == []
    a, b = tmp_path / "a" / "tpt-ood" / "tpt-ood.json", tmp_path / "b" / "tpt-ood" / "tpt-ood.json"
    assert without_cost(a, tmp_path / "a") == without_cost(b, tmp_path / "b")
    assert b.with_suffix(".md").read_text() == render_markdown(json.loads(b.read_text()))
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
    # two classes with one test image each, against CoOp's test splits (DTD 1,692 images, EuroSAT 8,100)
    found = run.table["datasets_found"]
    assert (found["dtd"]["test_images"], found["dtd"]["published_test_images"]) == (2, 1692)
    assert (found["eurosat"]["test_images"], found["eurosat"]["published_test_images"]) == (2, 8100)
    assert "| dtd | coop | 2 (not the published test set: numbers are not comparable) | 1692 |" in run.markdown_path.read_text()


# --------------------------------------------------------------------------------------------------
# bad input: one line, nothing written lost


def test_root_with_none_of_the_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds none of tpt-xd's 10 datasets"):
        reproduce(_config("tpt-xd", tmp_path / "empty", tmp_path / "out"), FakeRunner(), say=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing created before the pre-flight passed


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
    (ckpt,) = (out / "prompts").glob("*/text-only-imagenet.safetensors")
    ckpt.write_text("other weights")
    for cell in (out / "protext-dg" / "cells").glob("protext__*"):
        cell.unlink()
    with pytest.raises(UserError, match="prompts of other weights"):
        reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    assert ckpt.read_text() == "other weights"


def test_half_written_or_foreign_results_folder(imagenet_root, tmp_path):
    out = tmp_path / "dg"
    reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    cell = out / "protext-dg" / "cells" / "clip__imagenet_a__all.json"
    cell.write_text(cell.read_text()[:40])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"clip__imagenet_a__all.json is damaged or half-written.*delete that file"):
        reproduce(_config("protext-dg", imagenet_root, out), FakeRunner(), say=lambda m: None)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds another run .*limit None there, 3 now"):
        reproduce(_config("protext-dg", imagenet_root, out, limit=3), FakeRunner(), say=lambda m: None)
    foreign = tmp_path / "foreign"
    (foreign / "protext-dg").mkdir(parents=True)
    (foreign / "protext-dg" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a protext reproduce folder"):
        reproduce(_config("protext-dg", imagenet_root, foreign), FakeRunner(), say=lambda m: None)
    assert (foreign / "protext-dg" / "notes.txt").read_text() == "mine"


def test_every_table_every_row_and_column(full_root, tmp_path):
    """With every dataset present, each table has all its rows, columns, averages and cells."""
    from protext.protocols import PROTOCOLS

    for name, p in PROTOCOLS.items():
        run = reproduce(_config(name, full_root, tmp_path / name), FakeRunner(), say=lambda m: None)
        t = run.table
        assert [r["name"] for r in t["rows"]] == [r.name for r in p.rows]
        assert t["datasets"] == list(p.datasets) and not t["missing_datasets"]
        external = {r.name for r in p.rows if r.external}
        for row in t["rows"]:
            for d in p.datasets:
                for measure, entry in row["cells"][d].items():
                    assert (entry["ours"] is None) == (row["name"] in external), (name, row["name"], d, measure)
            assert set(row["averages"]) == {a.name for a in p.averages}
        keys = {c["key"] for c in t["cells"]}
        assert len(keys) == len(p.rows) * len(p.datasets) * len(p.splits) - len(t["cells_not_run"])
        md = run.markdown_path.read_text()
        assert all(f"| {r.name} |" in md for r in p.rows)
        heads = [line for line in md.splitlines() if line.startswith("| method |")]
        assert len(heads) == len(p.measures()) and all(f" {d} |" in h for h in heads for d in p.datasets)


# --------------------------------------------------------------------------------------------------
# end to end on tiny-clip (random weights), through the real training and evaluation

TINY = ["--model", "tiny-clip", "--pretrained", "random", "--limit", "1", "--epochs", "1", "--depth", "2",
        "--tta-views", "2", "--workers", "0", "--no-progress"]
# per table: a few datasets (the 1000-class ImageNet sets cost ~1 s per cell on tiny-clip; A and R have 200)
E2E_DATASETS = {
    "protext-text-only": ["dtd", "eurosat"],
    "protext-base2novel": ["dtd", "eurosat"],
    "protext-cross-dataset": ["dtd", "eurosat"],
    "protext-dg": ["imagenet_a", "imagenet_r"],
    "tpt-ood": ["imagenet_a"],
    "tpt-xd": ["dtd", "eurosat"],
    "protext-tpt": ["eurosat", "imagenet_r"],
    "tta-ood": ["imagenet_a"],
    "tta-xd": ["dtd"],
}


@pytest.fixture(scope="module")
def small_cupl(tmp_path_factory):
    """CuPL's release folder with each class's first description only (tiny training and CuPL cells)."""
    folder = tmp_path_factory.mktemp("cupl")
    for path in CUPL.glob("*.json"):
        data = json.loads(path.read_text())
        (folder / path.name).write_text(json.dumps({k: v[:1] for k, v in data.items()}))
    return folder


@pytest.fixture(scope="module")
def e2e_roots(tmp_path_factory, shared_dir):
    """Per table, a tree holding only its E2E_DATASETS (the others are reported missing)."""
    roots = {}
    for table, names in E2E_DATASETS.items():
        roots[table] = tmp_path_factory.mktemp(f"e2e-{table}")
        make_tree(roots[table], names, classes_per_dataset=2, shared=shared_dir)
    return roots


@pytest.fixture(scope="module")
def e2e_out(tmp_path_factory):
    """One output root for every table: prompts trained for one table serve the next."""
    return tmp_path_factory.mktemp("reproduction")


@pytest.fixture(scope="module")
def library_runner():
    from protext.reproduction import LibraryRunner

    return LibraryRunner(ReproduceConfig("tpt-xd", ".", model="tiny-clip", pretrained="random", workers=0, progress=False))


def _tiny_config(table, root, out, cupl):
    return ReproduceConfig(table, str(root), out=str(out), model="tiny-clip", pretrained="random", descriptions=str(cupl),
                           limit=1, epochs=1, depth=2, tta_views=2, workers=0, progress=False)


@pytest.mark.filterwarnings("ignore:--epochs 1 is not more than")
@pytest.mark.parametrize("table", list(E2E_DATASETS))
def test_table_end_to_end_on_tiny_clip(table, e2e_roots, small_cupl, library_runner, e2e_out):
    p = get_protocol(table)
    library_runner.config = _tiny_config(table, e2e_roots[table], e2e_out, small_cupl)
    run = reproduce(library_runner.config, library_runner, say=lambda m: None)
    present = E2E_DATASETS[table]
    assert sorted(run.table["missing_datasets"]) == sorted(set(p.datasets) - set(present))
    by_key = {c["key"]: c for c in run.table["cells"]}
    in_domain: list[str] = []
    for row in p.rows:
        for d in present:
            for split in p.splits:
                key = f"{'-'.join(''.join(ch.lower() if ch.isalnum() else ' ' for ch in row.name).split())}__{d}__{split}"
                if row.external:
                    assert key not in by_key and row.name in run.table["rows_not_run"]
                    continue
                cell = by_key[key]
                s, m = cell["settings"], cell["metrics"]
                assert 0.0 <= m["top1"] <= 100.0 and m["n_images"] == 1
                assert m["n_classes"] == s["n_classes"]  # the evaluation scored exactly the planned classes
                if s["features"] == "ensemble":  # ZERO's seven templates, whatever the row's rule
                    assert len(cell["evaluation"]["template"]["templates"]) == 7
                else:
                    assert cell["template_used"] == s["template"] == cell["evaluation"]["template"]["template"]
                    assert cell["evaluation"]["template"]["rule"] == row.template_rule
                if row.tta:
                    assert cell["evaluation"]["tta"]["method"] == row.tta.method
                    assert cell["evaluation"]["tta"]["settings"]["views"] == 2
                    if row.tta.init:
                        assert cell["evaluation"]["tta"].get("init") == row.tta.init
                if s["preset"]:
                    assert cell["evaluation"]["checkpoint"]["n_ctx"] == s["n_ctx"]
                if s["template_source"].startswith("training template"):
                    in_domain.append(cell["checkpoint"])
                assert cell["environment"]["model"] == "tiny-clip/random"
    for preset, record in run.table["prompts"].items():
        assert record["epochs"] == 1 and Path(record["checkpoint"]).is_file()
    _same_as_training_template(set(in_domain), library_runner)
    trains = any(r.preset for r in p.rows)  # --epochs is a departure only where prompts are trained
    assert ("--epochs 1:" in run.markdown_path.read_text()) == trains and bool(run.table["prompts"]) == trains


def _same_as_training_template(checkpoints, runner) -> None:
    """In-domain cells write the training template in full ("a photo of a {}."); with the context in
    place of its phrase that must give exactly the checkpoint's own training prompts ("X … X {}.")."""
    import torch

    from protext.checkpoint import class_encoder, load_prompts
    from protext.zeroshot import prompt_text_features

    clip = runner._load()
    for path in checkpoints:
        ckpt = load_prompts(path)
        names = ["banded", "red car", "a b_c"]
        ours = prompt_text_features(class_encoder(clip.model, clip.tokenizer, names, "a photo of a {}.", ckpt))
        own = prompt_text_features(class_encoder(clip.model, clip.tokenizer, names, None, ckpt))
        assert ckpt.meta["template"] == "{}." and torch.equal(ours, own), path


def _md_without_cost(text: str) -> str:
    """TABLE.md with the seconds columns and line blanked (wall times differ between runs)."""
    text = re.sub(r"\| [0-9.]+ \| (cpu|cuda[:0-9]*) \|$", r"| S | \1 |", text, flags=re.M)
    text = re.sub(r"^(\| [a-z_0-9/]+ \| \d+ \| )([0-9.?]+)( \|)", r"\1S\3", text, flags=re.M)
    return re.sub(r"^- seconds: .*$", "- seconds: S", text, flags=re.M)


@pytest.mark.filterwarnings("ignore:--epochs 1 is not more than")
def test_sigkill_mid_table_then_rerun_recomputes_nothing(e2e_roots, small_cupl, library_runner, tmp_path):
    """Killed (SIGKILL) after 5 of 6 cells, rerun: only the 6th cell and its prompts are computed,
    and the table equals an uninterrupted run's (wall times aside)."""
    table, out = "protext-text-only", tmp_path / "out"
    library_runner.config = _tiny_config(table, e2e_roots[table], out, small_cupl)
    reproduce(library_runner.config, library_runner, say=lambda m: None)
    final = out / table / f"{table}.json"
    uninterrupted = without_cost(final, out)
    uninterrupted_md = _md_without_cost(final.with_suffix(".md").read_text().replace(str(out), "OUT"))
    shutil.rmtree(out)

    command = [sys.executable, "-m", "protext.reproduce", table, "--root", str(e2e_roots[table]), "--out", str(out),
               "--descriptions", str(small_cupl), *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO), STOP_AFTER_ENV: "5"}
    killed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cells = sorted((out / table / "cells").iterdir())
    assert [c.name for c in cells][-1] == "protext__dtd__all.json" and len(cells) == 5 and not final.exists()
    kept = {p: p.stat().st_mtime_ns for p in [*cells, *(out / "prompts").glob("*/text-only-*.safetensors")]}
    assert len(kept) == 6

    del env[STOP_AFTER_ENV]
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr
    said = rerun.stdout + rerun.stderr
    assert "1 cells computed, 5 reused" in said
    assert "training text_only/eurosat" in said and "training text_only/dtd" not in said
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing finished was rewritten
    assert without_cost(final, out) == uninterrupted
    assert _md_without_cost(final.with_suffix(".md").read_text().replace(str(out), "OUT")) == uninterrupted_md


@pytest.mark.filterwarnings("ignore:--epochs 1 is not more than")
def test_killed_between_checkpoint_and_record_rerun_equals_uninterrupted(e2e_roots, small_cupl, library_runner, tmp_path):
    """A kill after a preset's last checkpoint but before its record and loss plot (found by
    tools/kill_campaign.py): the rerun writes both, and the table equals an uninterrupted run's."""
    table, out = "protext-text-only", tmp_path / "out"
    library_runner.config = _tiny_config(table, e2e_roots[table], out, small_cupl)
    reproduce(library_runner.config, library_runner, say=lambda m: None)
    final = out / table / f"{table}.json"
    uninterrupted = without_cost(final, out)
    (prompts,) = (out / "prompts").iterdir()
    record = prompts / "text-only-eurosat.json"
    uninterrupted_record = {k: v for k, v in json.loads(record.read_text()).items() if k != "cost"}
    # the state a kill during the loss plot leaves: checkpoint and state complete, no record, no plot
    for path in (record, prompts / "text-only-eurosat.loss.png", out / table / "cells" / "protext__eurosat__all.json", final):
        path.unlink()
    shutil.rmtree(out / table / "eval" / "protext__eurosat__all")
    reproduce(library_runner.config, library_runner, say=lambda m: None)
    assert (prompts / "text-only-eurosat.loss.png").is_file()
    assert {k: v for k, v in json.loads(record.read_text()).items() if k != "cost"} == uninterrupted_record
    assert without_cost(final, out) == uninterrupted


# --------------------------------------------------------------------------------------------------
# the command line


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from protext.reproduce import main

    (tmp_path / "empty").mkdir()
    cases = [
        (["protext-text", "--root", str(tmp_path)], "unknown table 'protext-text'; the tables are: protext-text-only,"),
        (["tpt-xd"], "--root DATA is required"),
        (["tpt-xd", "--root", str(tmp_path / "nowhere")], "--root"),
        (["tpt-xd", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "holds none of tpt-xd's 10 datasets"),
        (["tpt-xd", "--root", str(tmp_path), "--limit", "0"], "--limit must be at least 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_plan_prints_every_cell_and_runs_nothing(tmp_path, capsys):
    from protext.reproduce import main

    assert main(["protext-base2novel", "--plan", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [ln for ln in lines if "__" in ln]
    assert len(cells) == 66 and not (tmp_path / "o").exists()
    assert "  protext__dtd__base: prompts, 24 classes, template 'a photo of a {}.' (training template" in "\n".join(cells)
    assert any(ln.startswith("  known departure: ") for ln in lines)


def test_cli_list_and_fast_help():
    listing = subprocess.run([sys.executable, "-m", "protext.reproduce", "--list"], cwd=REPO, capture_output=True, text=True)
    assert listing.returncode == 0
    from protext.protocols import table_names

    assert [line.split()[0] for line in listing.stdout.splitlines()] == table_names()
    probe = "import sys, protext.reproduce as r; r.build_parser().format_help(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore:--epochs 1 is not more than")
def test_prompts_of_other_weights_refused_by_the_cli(e2e_roots, small_cupl, tmp_path, capsys):
    """A trained checkpoint whose text-tower fingerprint is not the model's: one line, exit 2, kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from protext.reproduce import main

    table, out = "protext-text-only", tmp_path / "out"
    argv = [table, "--root", str(e2e_roots[table]), "--out", str(out), "--descriptions", str(small_cupl), *TINY]
    assert main(argv) == 0
    (ckpt,) = (out / "prompts").glob("*/text-only-dtd.safetensors")
    with safe_open(str(ckpt), "pt") as handle:
        meta = handle.metadata()
    meta["text_tower_fingerprint"] = json.dumps("0" * 32)  # as if trained on other weights
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta)
    (out / table / "cells" / "protext__dtd__all.json").unlink()
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: prompts were trained on other text-tower weights") and err.count("\n") == 1
    assert ckpt.read_bytes() == before


def test_missing_descriptions_leave_no_folder_behind(imagenet_root, tmp_path):
    config = ReproduceConfig("protext-dg", str(imagenet_root), out=str(tmp_path / "out"), descriptions=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere"):
        reproduce(config, FakeRunner(), say=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_coop_rows_run_from_a_coop_checkpoint(e2e_roots, small_cupl, library_runner, tmp_path):
    """tpt-ood's CoOp rows take CoOp's own .pth format; TPT + CoOp starts from it."""
    import torch

    coop = tmp_path / "coop_imagenet.pth"
    torch.save({"state_dict": {"ctx": torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.02}}, coop)
    config = _tiny_config("tpt-ood", e2e_roots["tpt-ood"], tmp_path / "out", small_cupl)
    config.coop = str(coop)
    library_runner.config = config
    run = reproduce(config, library_runner, say=lambda m: None)
    assert run.table["rows_not_run"] == {}
    cells = {c["key"]: c for c in run.table["cells"]}
    for key in ("coop-16-shot__imagenet_a__all", "tpt-coop__imagenet_a__all"):
        assert cells[key]["checkpoint"] == str(coop) and cells[key]["template_used"] == "a photo of a {}."
    assert cells["tpt-coop__imagenet_a__all"]["evaluation"]["tta"]["init"] == "coop"


def test_descriptions_from_cupls_release_with_its_original_keys(tmp_path, shared_dir):
    """--descriptions takes CuPL's folder as released (Cars' year-last keys, SUN's reworded ones):
    every class of the dataset gets its descriptions under its own name, repeats kept."""
    from protext.descriptions import read_descriptions

    release = tmp_path / "release"
    release.mkdir()
    for path in [*CUPL.glob("*.json"), *(CUPL / "original-keys").glob("*.json")]:  # original keys win
        shutil.copy(path, release / path.name)
    root = tmp_path / "data"
    make_tree(root, ["stanford_cars", "sun397"], classes_per_dataset=2, shared=shared_dir)
    config = ReproduceConfig("protext-text-only", str(root), out=str(tmp_path / "out"), descriptions=str(release))
    reproduce(config, FakeRunner(), say=lambda m: None)
    for dataset, names_file, cupl_file in (("stanford_cars", "cars.json", "cars_prompts_full.json"),
                                           ("sun397", "sun397.json", "sun_prompts_full.json")):
        written = read_descriptions(tmp_path / "out" / "protext-text-only" / "descriptions" / f"{dataset}.jsonl")
        names = json.loads((shared_dir / "classnames" / names_file).read_text())
        assert sorted(written) == sorted(names)
        original = json.loads((release / cupl_file).read_text())
        assert sum(map(len, written.values())) == sum(len([d for d in v if d.strip()]) for v in original.values())


def test_cli_bad_model_or_device_before_anything_is_written(e2e_roots, tmp_path, capsys):
    from protext.reproduce import main

    root = str(e2e_roots["tpt-xd"])
    cases = [
        (["--model", "no-such-model", "--pretrained", "random"], "--model no-such-model --pretrained random: "),
        (["--model", "tiny-clip", "--pretrained", str(tmp_path / "missing.pt")], "missing.pt"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--model", "tiny-clip", "--pretrained", "random", "--device", "cuda"], "--device cuda: CUDA is not available"))
    for extra, message in cases:
        assert main(["tpt-xd", "--root", root, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
