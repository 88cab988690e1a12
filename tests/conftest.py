"""Fixtures shared by every test module: a tiny random CLIP and the shared real data."""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path

import pytest

# A background job of a shell without job control starts with SIGINT ignored, and every process it
# starts inherits that: the tests that Ctrl-C a command would then wait for a signal nobody acts on.
# A handler of our own (Python's usual one) is reset to the default by exec, so every command a test
# starts gets the default SIGINT disposition, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
# PROTEXT_SHARED lets a copy of the tree (mutmut runs the tests from mutants/) find the same data
SHARED = Path(os.environ.get("PROTEXT_SHARED", REPO.parent / "shared"))

# Every fixed limit on a wait in the suite (a subprocess's timeout, a wait for a run to reach a state)
# is TEST_TIMEOUT. It is a safety net against a hung run, never a measure of speed, so it is generous:
# a whole command on a loaded 2-core machine stays far below it. A slower machine raises it with
# PROTEXT_TEST_TIMEOUT_SCALE (e.g. 3); nothing in a test may depend on how fast anything ran.
TIMEOUT_SCALE = float(os.environ.get("PROTEXT_TEST_TIMEOUT_SCALE", "1"))
TEST_TIMEOUT = 600.0 * TIMEOUT_SCALE

# Floats are not bitwise equal across thread counts, process layouts (torchrun ranks against one
# process) or CPUs: a reduction split another way (OpenMP threads, another SIMD width, another
# batch composition) sums in another order and moves the last bits (seen: 1.2e-7 relative on a
# confidence between 2 gloo ranks x 1 thread and 1 process x 2 threads on AVX2). Results compared
# across such runs match floats within these tolerances, and everything else exactly. Runs in the
# same layout with the same thread count are compared bit for bit wherever the product promises it.
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 1e-6


def assert_same_results(got, want, *, rtol: float = FLOAT_RTOL, atol: float = FLOAT_ATOL, where: str = "result") -> None:
    """``got`` equals ``want`` (parsed JSON): keys, list lengths and order, ints (labels, predictions,
    top-k, image indices, counts), strings and bools exactly; any number where either side is a float
    within ``rtol``/``atol`` (NaN only matches NaN). Fails naming the first difference's place."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (got, want))
    if numbers and (isinstance(got, float) or isinstance(want, float)):
        if math.isnan(want) or math.isnan(got):
            assert math.isnan(want) and math.isnan(got), f"{where}: {got!r} != {want!r}"
        else:
            assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), f"{where}: {got!r} != {want!r} (rtol {rtol}, atol {atol})"
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} {got!r} != {type(want).__name__} {want!r}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_results(got[key], want[key], rtol=rtol, atol=atol, where=f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_results(a, b, rtol=rtol, atol=atol, where=f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repo: real CuPL descriptions and class-name lists (never copied in)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests need the shared data folder beside the repository.")
    return SHARED


@pytest.fixture(scope="session")
def tiny_clip():
    """The registered ``tiny-clip`` with seed-0 random weights (same weights in every process)."""
    from protext.models import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip("tiny-clip", "random")


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch) -> Path:
    """An empty folder where the pre-flight's probe file cannot be created, as on a read-only file
    system: tests run as root here, for whom chmod cannot make a folder read-only."""
    import errno
    import tempfile

    import protext.preflight as preflight

    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", mkstemp)
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the checks must come first."""
    import protext.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(protext.models, "load_clip", refuse)


def sigkill(proc) -> None:
    """SIGKILL the process itself (not a shell around it) and check that this, not anything else, ended it."""
    import signal

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=TEST_TIMEOUT) == -signal.SIGKILL


def reap(proc) -> None:
    """Kill a process a failed test left running, and wait for it (no zombie, no stray writer)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def eval_cli_errors(tmp_path: Path, cases: list[list[str]]) -> list[tuple[int, str, bool]]:
    """``python -m protext.eval --dataset folder --root EMPTY ARGS`` for each case, in one fresh
    interpreter: (exit code, stderr, whether torch was imported) per case."""
    import json
    import subprocess
    import sys

    script = (
        "import io, json, sys, contextlib\n"
        "from protext import eval as cli\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = cli.main(['--dataset', 'folder', '--root', sys.argv[2], '--no-progress', *args])\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    out.append([code, err.getvalue(), 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    root = tmp_path / "no-images"
    root.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases), str(root)],
                          capture_output=True, text=True, timeout=TEST_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [tuple(case) for case in json.loads(proc.stdout)]


def assert_one_error_line_before_torch(tmp_path: Path, bad: list[tuple[list[str], str]]) -> None:
    """Each ``(args, text)``: exit 2, one ``error:`` line holding ``text``, and torch never imported."""
    for (args, text), (code, err, torch_loaded) in zip(bad, eval_cli_errors(tmp_path, [a for a, _ in bad])):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (args, err)
        assert not torch_loaded, args

