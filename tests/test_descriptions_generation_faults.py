"""Fault injection for ``gen_descriptions``: SIGKILL the generating process at seeded random points.

The fake server stops answering at an exact request (no timing involved), the test SIGKILLs the
process itself (no shell in between), and sometimes appends the torn unit a kill inside ``write``
would leave. After every kill: nothing written is lost, nothing is duplicated, no process of the
run is left, no temporary file exists; the final rerun ends with the very bytes of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

from protext.descriptions import Description, read_cache
from protext.descriptions.cache import encode_unit
from protext.gen_descriptions import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TEST_TIMEOUT, reap, sigkill  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"class {i:02d}" for i in range(8)]
UNITS = len(CLASSES) * 5  # the built-in query set has five queries
LINES_PER_UNIT = 3  # with 5 samples, the fake's answers leave three descriptions
KILLS = 5
SEED = 20261125


def args(server: FakeOpenAIServer, classes: Path, out: Path) -> list[str]:
    # One request at a time, so units land in plan order and the file is comparable byte for byte;
    # a client timeout no answer comes near on a loaded machine (a timeout would change nothing
    # written, but the run must not depend on one).
    return ["--classes", str(classes), "--out", str(out), "--base-url", server.url, "--model", "fake-model",
            "--n-per-query", "5", "--seed", "0", "--concurrency", "1", "--timeout", str(TEST_TIMEOUT), "--no-progress"]


def processes_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (the killed run and anything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_random_sigkills_then_rerun_equal_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fault-test")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    rng = random.Random(SEED)
    kill_points = sorted(rng.sample(range(UNITS), KILLS))  # units on disk when each kill lands
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    work = tmp_path / "work"
    work.mkdir()
    whole, killed = tmp_path / "whole.jsonl", work / "killed.jsonl"
    with FakeOpenAIServer() as server:
        assert main(args(server, classes, whole)) == 0
        for k in kill_points:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the torn tail appended below is reported; expected
                done = read_cache(killed).samples // LINES_PER_UNIT if killed.exists() else 0
            server.hold_from(len(server.log) + (k - done))  # answer k - done units, then go silent
            proc = subprocess.Popen([sys.executable, "-m", "protext.gen_descriptions", *args(server, classes, killed)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                if not server.wait_held(timeout=TEST_TIMEOUT):
                    proc.kill()
                    raise AssertionError(f"the run never reached unit {k}: {proc.communicate()[1]!r}")
                sigkill(proc)
            finally:
                reap(proc)
                proc.stderr.close()
            assert processes_in_group(proc.pid) == []
            # Nothing lost, nothing duplicated: exactly the first k units of the uninterrupted run.
            unit_bytes = b"".join(whole.read_bytes().splitlines(keepends=True)[: k * LINES_PER_UNIT])
            assert killed.read_bytes() == unit_bytes
            assert sorted(p.name for p in work.iterdir()) == (["killed.jsonl"] if k or killed.exists() else [])
            if rng.random() < 0.6:  # a kill inside write(): a cut-off unit at the tail
                torn = encode_unit([Description("class 99", f"Torn text {i}.", "q", "fake-model") for i in range(3)])
                with open(killed, "ab") as fh:
                    fh.write(torn[: rng.randrange(1, len(torn) - 1)])
        server.release()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the repair of a torn tail warns; that is tested elsewhere
            assert main(args(server, classes, killed)) == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["killed.jsonl"]
    contents = read_cache(killed)
    assert contents.rewritten_units == 0 and contents.samples == UNITS * LINES_PER_UNIT


def test_import_overwrite_refuses_while_a_generation_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 9, item 6: before, ``import --overwrite`` replaced the file under a running generation."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fault-test")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "d.jsonl"
    src = tmp_path / "cupl.json"
    src.write_text('{"owl": ["An owl."]}')
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with FakeOpenAIServer() as server:
        server.hold_from(3)  # three units written, then the generation waits for an answer
        proc = subprocess.Popen([sys.executable, "-m", "protext.gen_descriptions", *args(server, classes, out)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert server.wait_held(timeout=TEST_TIMEOUT)
            before = out.read_bytes()
            assert main(["import", str(src), "--out", str(out), "--overwrite"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --out: {out} is being written by another gen_descriptions run")
            assert out.read_bytes() == before and len(before.splitlines()) == 3 * LINES_PER_UNIT
        finally:
            proc.kill()
            proc.wait()
    assert main(["import", str(src), "--out", str(out), "--overwrite"]) == 0  # the writer is gone
    assert read_cache(out).descriptions == {"owl": ["An owl."]}
