"""``reproduce`` under torchrun: real ``python -m torch.distributed.run`` jobs of 2 and 3 gloo ranks
on the CPU, tiny-clip with random weights over synthetic dataset trees.

A job's table must equal one process's (labels exactly, floats within conftest's tolerance: the
ranks sum in another order), and a job that loses a rank to SIGKILL must, when rerun, end with the
same table without computing any cell twice. The only label allowed to differ is the one that says
how a cell ran: each cell's ``evaluation.runtime.world_size`` (the ranks that shared its images:
the job's size, or 1 for TDA's cells, which one rank runs whole).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protext.reproduction import LibraryRunner, ReproduceConfig, reproduce

from conftest import SHARED, TEST_TIMEOUT, assert_same_results, reap
from synthetic_datasets import make_tree

REPO = Path(__file__).resolve().parents[1]
LIMIT = 3  # images per cell: with 3 ranks, one each
TINY = ["--model", "tiny-clip", "--pretrained", "random", "--limit", str(LIMIT), "--epochs", "1", "--depth", "2",
        "--tta-views", "2", "--workers", "0", "--no-progress"]

pytestmark = pytest.mark.filterwarnings("ignore:--epochs 1 is not more than")


@pytest.fixture(scope="module")
def small_cupl(tmp_path_factory) -> Path:
    """CuPL's release folder with each class's first description only (tiny training and CuPL cells)."""
    folder = tmp_path_factory.mktemp("cupl")
    for path in (SHARED / "cupl").glob("*.json"):
        data = json.loads(path.read_text())
        (folder / path.name).write_text(json.dumps({k: v[:1] for k, v in data.items()}))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_dir) -> Path:
    """DTD and EuroSAT (47 and 10 classes), two classes with images each; every other dataset missing."""
    root = tmp_path_factory.mktemp("data")
    make_tree(root, ["dtd", "eurosat"], classes_per_dataset=2, shared=shared_dir)
    return root


def one_process_table(table: str, root: Path, out: Path, cupl: Path) -> dict:
    """The table one process writes with the command's flags (run here, in the test's process), in
    ``out``, which is then removed for the job: the same folder, so that every recorded path and the
    checkpoints' bytes (which name their files) are the same."""
    config = ReproduceConfig(table, str(root), out=str(out), model="tiny-clip", pretrained="random", descriptions=str(cupl),
                             limit=LIMIT, epochs=1, depth=2, tta_views=2, workers=0, progress=False)
    run = reproduce(config, LibraryRunner(config), say=lambda m: None)
    table = comparable(run.json_path, out)
    shutil.rmtree(out)
    return table


def comparable(path: Path, out: Path) -> dict:
    """A table file without its wall times and memory (``cost``), its folder name, or each cell's world size."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "cost" and k != "world_size"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(out), "OUT") if isinstance(value, str) else value

    return strip(json.loads(path.read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, table: str, root: Path, out: Path, cupl: Path) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node RANKS -m protext.reproduce TABLE`` on a free port (gloo, the CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "protext.reproduce", table, "--root", str(root), "--out", str(out),
               "--descriptions", str(cupl), "--device", "cpu", *TINY]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a job; its exit status and everything it printed."""
    try:
        stdout, stderr = proc.communicate(timeout=TEST_TIMEOUT)
    finally:
        reap(proc)
    return proc.returncode, stdout + stderr


def ranks_of(agent: int) -> dict[int, int]:
    """The torchrun agent's worker processes: rank -> pid (read from /proc: their parent and RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != agent:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_three_ranks_equal_one_process_with_tda_cells_whole(data_root, small_cupl, tmp_path):
    """tta-xd on DTD and EuroSAT: ZERO, ZERO+Ensemble and C-TPT cells shared by 3 ranks, TDA's two
    cells each run whole by one rank; the table equals one process's, and is written by rank 0 alone."""
    table = "tta-xd"
    want = one_process_table(table, data_root, tmp_path / "job", small_cupl)
    status, said = finish(torchrun(3, table, data_root, tmp_path / "job", small_cupl))
    assert status == 0, said
    assert said.count(f"{table}: 8 cells computed, 0 reused") == 1, said  # one summary, from rank 0
    final = tmp_path / "job" / table / f"{table}.json"
    assert_same_results(comparable(final, tmp_path / "job"), want, where=table)
    ran = {c["key"]: c["evaluation"]["runtime"]["world_size"] for c in json.loads(final.read_text())["cells"]}
    assert {k: n for k, n in ran.items() if k.startswith("tda__")} == {"tda__dtd__all": 1, "tda__eurosat__all": 1}
    assert {n for k, n in ran.items() if not k.startswith("tda__")} == {3}
    assert sorted(p.name for p in final.parent.iterdir() if p.suffix in (".json", ".md")) == [
        "run.json", f"{table}.json", f"{table}.md"]


def test_rank_killed_mid_table_then_rerun_equals_one_process_and_computes_nothing_twice(data_root, small_cupl, tmp_path):
    """protext-text-only (6 cells, 2 presets trained by rank 0) on 2 ranks: rank 1 is SIGKILLed once the
    first cell file exists; torchrun stops the job. The rerun reuses every file the killed job finished
    (unchanged, still naming the killed run), computes the rest, and ends with one process's table."""
    table, out = "protext-text-only", tmp_path / "job"
    want = one_process_table(table, data_root, out, small_cupl)
    cells, final = out / table / "cells", out / table / f"{table}.json"

    job = torchrun(2, table, data_root, out, small_cupl)
    try:
        deadline = time.monotonic() + TEST_TIMEOUT
        while not (cells.is_dir() and any(cells.glob("*.json"))):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.02)
        os.kill(ranks_of(job.pid)[1], signal.SIGKILL)
        status, said = finish(job)
    finally:
        reap(job)
    assert status != 0 and not final.exists(), said

    def stamp(path: Path):
        return path.stat().st_mtime_ns, path.read_bytes()

    done = sorted(cells.glob("*.json"))
    killed_run = {json.loads(p.read_text())["cost"]["run"] for p in done}
    assert 1 <= len(done) < 6 and len(killed_run) == 1, said
    # every finished thing the killed job left: cell files, evaluations' results, trained prompts
    kept = {p: stamp(p) for p in [*done, *out.glob(f"{table}/eval/*/results.json"), *out.glob("prompts/*/*.json")]}

    status, said = finish(torchrun(2, table, data_root, out, small_cupl))
    assert status == 0, said
    assert f"{table}: {6 - len(done)} cells computed, {len(done)} reused" in said
    assert {p: stamp(p) for p in kept} == kept  # nothing finished was recomputed or rewritten
    runs = {p.name: json.loads(p.read_text())["cost"]["run"] for p in cells.glob("*.json")}
    assert len(runs) == 6 and len(set(runs.values()) - killed_run) == 1  # each cell written by one run
    assert_same_results(comparable(final, out), want, where=table)


def test_device_by_index_refused_under_torchrun_before_any_model(monkeypatch, tmp_path, capsys, no_model, data_root):
    """Every rank takes its LOCAL_RANK's GPU: ``--device cuda:1`` is one line from rank 0, exit 2, and
    a quiet exit 2 on the other ranks (which find the same); nothing is written."""
    from protext.reproduce import main

    argv = ["protext-text-only", "--root", str(data_root), "--out", str(tmp_path / "out"), "--device", "cuda:1", *TINY]
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines and all(line.startswith("error: --device cuda:1 under torchrun") for line in err)
    assert not (tmp_path / "out").exists()


def test_single_process_hides_the_job_only_inside(monkeypatch):
    """What a rank runs whole (a TDA cell) sees no torchrun job; the environment is restored after."""
    from protext.distributed import init_distributed, launched_world_size, single_process

    monkeypatch.setenv("WORLD_SIZE", "3")
    with single_process():
        assert launched_world_size() == 1 and not init_distributed(use_cuda=False).active
    assert os.environ["WORLD_SIZE"] == "3" and launched_world_size() == 3
