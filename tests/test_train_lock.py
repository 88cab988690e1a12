"""One training run per ``--out`` (issue 15, item 2), and a resumed run checks its inputs.

A second ``train`` on an ``--out`` that another run is writing stops at once -- one error line
naming the lock file, exit 2, before torch is even imported -- and a run killed by SIGKILL never
blocks the next one (the lock is ``flock``, released by the kernel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_TIMEOUT
from protext.locks import output_lock_path

REPO = Path(__file__).resolve().parents[1]

# Runs ``train`` in a fresh interpreter and reports, after it returns, whether torch was imported.
TRAIN = """
import sys
from protext.train import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""

# Takes the run lock of --out the way ``train`` does, says so, then waits to be killed.
HOLDER = """
import sys
from protext.locks import output_lock
with output_lock(sys.argv[1], flag="--out", writer="training run"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRAIN, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TEST_TIMEOUT)


def _args(desc: Path, out: Path, *extra: str) -> list[str]:
    return ["--descriptions", str(desc), "--model", "tiny-clip", "--pretrained", "random", "--depth", "2",
            "--n-ctx", "2", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--device", "cpu",
            "--out", str(out), "--cache-dir", str(out.parent / "cache"), "--quiet", *extra]


@pytest.fixture
def desc(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    rows = [("dog", f"A dog with trait {i}.") for i in range(4)] + [("cat", f"A cat with trait {i}.") for i in range(4)]
    path.write_text("".join(json.dumps({"classname": c, "description": d}) + "\n" for c, d in rows))
    return path


@pytest.fixture
def holder(tmp_path: Path):
    """A process holding the run lock of ``tmp_path/run/x.safetensors``; the test kills it."""
    out = tmp_path / "run" / "x.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"  # blocks until the lock is taken: no sleep
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TEST_TIMEOUT)


def test_second_run_on_the_same_out_stops_before_torch_naming_the_lock(desc: Path, holder) -> None:
    proc, out = holder
    done = _train(*_args(desc, out))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and str(output_lock_path(out)) in lines[0], done.stderr
    assert "another training run" in lines[0]
    assert "torch imported: False" in done.stdout  # refused before any model could load
    assert not out.exists() and not (out.parent / "x.resume.pt").exists()


def test_library_run_is_refused_too(desc: Path, holder) -> None:
    """run_training (reproduce and Python callers) takes the same lock."""
    from protext.training import TrainJob, TrainLockError, run_training

    proc, out = holder
    job = TrainJob(descriptions=desc, out=out, model="tiny-clip", pretrained="random", device="cpu",
                   depth=2, n_ctx=2, epochs=1, warmup_epochs=0, cache_dir=out.parent / "cache")
    with pytest.raises(TrainLockError, match="another training run"):
        run_training(job, progress=False, report=lambda _: None)
    assert not out.exists()


def test_lock_of_a_sigkilled_run_does_not_block_the_next(desc: Path, holder) -> None:
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TEST_TIMEOUT)
    assert output_lock_path(out).exists()  # the killed run's lock file is left behind...
    done = _train(*_args(desc, out))
    assert done.returncode == 0, done.stderr  # ...and does not stop the next run
    assert out.is_file()
    assert not output_lock_path(out).exists()  # a finished run removes its lock file


def test_resume_with_other_descriptions_or_classes_is_refused_before_the_model(desc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "x.safetensors"
    first = _train(*_args(desc, out, "--epochs", "2"))
    assert first.returncode == 0, first.stderr
    checkpoint = out.read_bytes()

    changed = tmp_path / "changed.jsonl"
    changed.write_text(desc.read_text().replace("trait 0", "trait zero"))
    done = _train(*_args(changed, out, "--epochs", "2", "--resume"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: --descriptions ") and str(changed) in lines[0], done.stderr

    classes = tmp_path / "classes.txt"
    classes.write_text("dog\n")
    done = _train(*_args(desc, out, "--epochs", "2", "--resume", "--classes", str(classes)))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --resume: --classes/--split select other classes") and "'cat'" in lines[-1], done.stderr
    assert out.read_bytes() == checkpoint  # nothing written by the refused runs
