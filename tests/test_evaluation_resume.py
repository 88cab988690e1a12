"""Issue 9 for evaluation: pre-flight of outputs, finite or refuse, resume from the per-image log,
Ctrl-C, no hung ranks, and SIGKILLs at seeded random points during a TPT run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protext.evaluation.loop as loop
from conftest import TEST_TIMEOUT, assert_same_results
from protext.checkpoint import save_prompts
from protext.eval import main
from protext.evaluation import EvalConfig, evaluate
from protext.prompts import PromptedTextEncoder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-clip", "--pretrained", "random", "--workers", "0", "--no-progress"]
#: payload fields that legitimately differ between runs (clock, memory, the command line itself)
VOLATILE = ("timing", "command", "tta")


def _stable(payload: dict) -> dict:
    out = {k: v for k, v in payload.items() if k not in VOLATILE}
    out["settings"] = {k: v for k, v in payload["settings"].items() if k not in ("out", "overwrite")}
    if payload.get("tta"):
        out["tta"] = {k: v for k, v in payload["tta"].items() if "seconds" not in k}
    return out


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A folder of 4 classes x 6 small noise images: enough images to stop a run in the middle."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for name in ["ant", "bee", "cow", "doe"]:
        for i in range(6):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    return root


def fail(args: list[str], capsys) -> str:
    code = main([*args, *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".resume-" in p.name)


# --------------------------------------------------------------------------------------------------
# pre-flight (issue 9, items 1 and 3): before any model loads, nothing overwritten


def test_out_may_not_be_the_runs_own_input(tiny_clip, many, tmp_path, capsys, no_model):
    ckpt = tmp_path / "ck.safetensors"
    save_prompts(ckpt, PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=1))
    before = ckpt.read_bytes()
    err = fail(["--dataset", "folder", "--root", str(many), "--method", "prompts", "--prompts", str(ckpt), "--out", str(ckpt), "--overwrite"], capsys)
    assert "--prompts" in err and str(ckpt) in err
    assert ckpt.read_bytes() == before
    desc = tmp_path / "d.jsonl"
    desc.write_text(json.dumps({"classname": "ant", "description": "an ant."}) + "\n")
    err = fail(["--dataset", "folder", "--root", str(many), "--method", "cupl", "--descriptions", str(desc), "--out", str(desc)], capsys)
    assert "--descriptions" in err and desc.read_text().startswith("{")


def test_unwritable_or_folder_outputs_refused_before_the_model(many, tmp_path, capsys, no_model, read_only_dir):
    err = fail(["--dataset", "folder", "--root", str(many), "--out", str(tmp_path)], capsys)
    assert "is a directory" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = fail(["--dataset", "folder", "--root", str(many), "--out", str(blocker / "sub" / "r.json")], capsys)
    assert "is a file" in err
    ro = read_only_dir
    err = fail(["--dataset", "folder", "--root", str(many), "--out", str(ro / "r.json")], capsys)
    assert f"cannot write in {ro} (Permission denied)" in err and "--out" in err
    assert list(ro.iterdir()) == []


def test_existing_result_is_never_replaced_silently(tiny_clip, many, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = EvalConfig(dataset="folder", root=str(many), model="tiny-clip", pretrained="random", workers=0, progress=False, limit=2)
    first = evaluate(config, clip=tiny_clip)
    default = tmp_path / config.output_path()
    assert default.parent == tmp_path / "results" and default.name.startswith(f"folder_{many.name}-all-clip-tiny-clip-random-")
    assert json.loads(default.read_text())["metrics"] == first["metrics"]
    before = default.read_bytes()
    # other settings get another default name, so they never meet this result ...
    other = EvalConfig(**{**config.__dict__, "limit": 3}).output_path()
    assert other != config.output_path()
    # ... and an explicit --out that holds it is refused without --overwrite
    err = fail(["--dataset", "folder", "--root", str(many), "--limit", "3", "--out", str(default)], capsys)
    assert "already holds a result of other settings" in err and "--overwrite" in err
    assert default.read_bytes() == before
    # the same command again: its result stands, nothing is recomputed or rewritten
    monkeypatch.setattr(loop, "zeroshot_shard", lambda setup: pytest.fail("a finished run was recomputed"))
    assert main(["--dataset", "folder", "--root", str(many), "--limit", "2", *TINY]) == 0
    assert "already holds this run's result" in capsys.readouterr().err
    assert default.read_bytes() == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "folder", "--root", str(many), "--limit", "3", "--out", str(default), "--overwrite", *TINY]) == 0
    assert json.loads(default.read_text())["metrics"]["n_images"] == 3


# --------------------------------------------------------------------------------------------------
# finite or refuse (issue 9, item 2)


def test_nan_checkpoint_refused_naming_the_file(tiny_clip, many, tmp_path, capsys):
    ckpt = tmp_path / "ck.safetensors"
    save_prompts(ckpt, PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=1))
    data = bytearray(ckpt.read_bytes())
    data[-8:] = np.array([np.nan, np.nan], dtype=np.float32).tobytes()  # the last tensor values
    ckpt.write_bytes(bytes(data))
    err = fail(["--dataset", "folder", "--root", str(many), "--method", "prompts", "--prompts", str(ckpt), "--out", str(tmp_path / "r.json")], capsys)
    assert str(ckpt) in err and "non-finite" in err
    assert not (tmp_path / "r.json").exists()


def test_non_finite_logits_refused_naming_the_checkpoint(tiny_clip, many, tmp_path, monkeypatch):
    ckpt = tmp_path / "ck.safetensors"
    save_prompts(ckpt, PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=1))
    import protext.zeroshot

    monkeypatch.setattr(protext.zeroshot, "zeroshot_logits", lambda img, txt, scale: torch.full((img.shape[0], txt.shape[0]), float("nan")))
    config = EvalConfig(dataset="folder", root=str(many), method="prompts", prompts=str(ckpt), model="tiny-clip",
                        pretrained="random", workers=0, progress=False, out=str(tmp_path / "r.json"))
    from protext.errors import UserError

    with pytest.raises(UserError, match="not finite.*ck.safetensors"):
        evaluate(config, clip=tiny_clip)


# --------------------------------------------------------------------------------------------------
# resume (issue 9, item 4)


class _Stop(KeyboardInterrupt):
    pass


def _interrupt_after(monkeypatch, name: str, calls: int) -> list[int]:
    """Make ``loop.<name>`` raise Ctrl-C on call ``calls + 1``; returns the call counter."""
    real = getattr(loop, name)
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > calls >= 0:
            raise _Stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, name, wrapped)
    return count


@pytest.mark.parametrize("tta", [None, "tpt"])
def test_interrupted_run_resumes_to_identical_results(tiny_clip, many, tmp_path, monkeypatch, tta):
    extra = {"tta": "tpt", "tta_views": 4} if tta else {"batch_size": 5}
    base = dict(dataset="folder", root=str(many), model="tiny-clip", pretrained="random", workers=0, progress=False, save_logits=True, **extra)
    whole = evaluate(EvalConfig(**base, out=str(tmp_path / "whole.json")), clip=tiny_clip)
    out = tmp_path / "resumed.json"
    hook = "_adapt" if tta else "_zeroshot_batch"  # zero-shot: stop in the third batch of 5
    count = _interrupt_after(monkeypatch, hook, 7 if tta else 2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**base, out=str(out)), clip=tiny_clip)
    logs = sorted(tmp_path.glob("resumed.json.resume-*.rank0.jsonl"))
    assert len(logs) == 1 and not out.exists()
    assert len(logs[0].read_text().splitlines()) == 1 + (7 if tta else 10)  # header + finished images
    monkeypatch.undo()
    count = _interrupt_after(monkeypatch, hook, -1)  # count only
    resumed = evaluate(EvalConfig(**base, out=str(out)), clip=tiny_clip)
    assert count[0] == (24 - 7 if tta else 3)  # only the unfinished images (batches) were redone
    assert _stable(resumed) == _stable(whole)
    assert leftovers(tmp_path) == []


def test_changed_settings_do_not_reuse_the_log(tiny_clip, many, tmp_path, monkeypatch):
    base = dict(dataset="folder", root=str(many), model="tiny-clip", pretrained="random", workers=0, progress=False,
                tta="tpt", tta_views=4, out=str(tmp_path / "r.json"))
    _interrupt_after(monkeypatch, "_adapt", 5)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**base), clip=tiny_clip)
    monkeypatch.undo()
    count = _interrupt_after(monkeypatch, "_adapt", -1)
    evaluate(EvalConfig(**base, tta_steps=2), clip=tiny_clip)
    assert count[0] == 24  # nothing reused: another fingerprint
    assert len(list(tmp_path.glob("r.json.resume-*"))) == 1  # the first command's log is kept, not destroyed


def test_torn_last_line_is_cut_and_redone(tiny_clip, many, tmp_path, monkeypatch):
    base = dict(dataset="folder", root=str(many), model="tiny-clip", pretrained="random", workers=0, progress=False,
                tta="tpt", tta_views=4, save_logits=True)
    whole = evaluate(EvalConfig(**base, out=str(tmp_path / "whole.json")), clip=tiny_clip)
    _interrupt_after(monkeypatch, "_adapt", 4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**base, out=str(tmp_path / "r.json")), clip=tiny_clip)
    monkeypatch.undo()
    (log,) = tmp_path.glob("r.json.resume-*.rank0.jsonl")
    text = log.read_text()
    log.write_text(text[: len(text) - 25])  # a kill in the middle of writing the 4th image
    resumed = evaluate(EvalConfig(**base, out=str(tmp_path / "r.json")), clip=tiny_clip)
    assert _stable(resumed) == _stable(whole)


# --------------------------------------------------------------------------------------------------
# bad TTA values and Ctrl-C (issue 9, item 9)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--tpt", "--tpt-views", "0"], "--tta-views"),
        (["--tpt", "--tpt-selection", "0"], "--tta-selection"),
        (["--tpt", "--tpt-steps", "-1"], "--tta-steps"),
        (["--tta", "ctpt", "--ctpt-lambda", "-1"], "--ctpt-lambda"),
        (["--tta", "tda", "--tda-beta", "0"], "--tda-beta"),
        (["--tta", "tda", "--tda-alpha", "nan"], "--tda-alpha"),
        (["--tta", "zero", "--tta-steps", "2"], "--tta-steps"),
        (["--tta", "tda", "--tta-batch", "4"], "--tta-batch"),
        (["--tta", "mta", "--ctpt-lambda", "3"], "--ctpt-lambda"),
        (["--tta-views", "8"], "--tta-views"),
        (["--stream-seeds", "1,2"], "--stream-seeds"),
        (["--tta", "tda", "--stream-seeds", "1,1"], "--stream-seeds"),
    ],
)
def test_bad_tta_values_are_one_line_before_the_model(many, tmp_path, capsys, no_model, flags, named):
    err = fail(["--dataset", "folder", "--root", str(many), "--out", str(tmp_path / "r.json"), *flags], capsys)
    assert named in err.splitlines()[-1] and err.splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("flags", [["--tta", "nope"], ["--stream-seeds", "1,x"], ["--tta", "tda", "--stream-seeds", "a"]])
def test_malformed_tta_flags_exit_2(many, flags, capsys, no_model):
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "folder", "--root", str(many), *flags, *TINY])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ("--tta" in err or "--stream-seeds" in err) and "Traceback" not in err


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "protext.eval", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _records(folder: Path, pattern: str) -> int:
    """Image records in the logs matching ``pattern`` (lines after each header)."""
    return sum(max(0, len(p.read_bytes().split(b"\n")) - 2) for p in folder.glob(pattern))


def _wait_for_records(proc: subprocess.Popen, folder: Path, pattern: str, at_least: int, timeout: float = TEST_TIMEOUT) -> bool:
    """Poll until the logs matching ``pattern`` hold ``at_least`` image records; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _records(folder, pattern) >= at_least:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the run made no progress")


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigint_during_eval_one_line_exit_130_log_kept(many, tmp_path):
    # the last image is a named pipe nobody writes to: the run blocks there, so it is still running
    # when the signal comes however slow or fast the machine is (no race with the end of the run)
    root = tmp_path / "images"
    shutil.copytree(many, root)
    os.mkfifo(root / "doe" / "9.png")
    out = tmp_path / "r.json"
    proc = _start(["--dataset", "folder", "--root", str(root), "--tta", "tpt", "--tta-views", "32", "--tta-steps", "3",
                   "--out", str(out), *TINY])
    try:
        assert _wait_for_records(proc, tmp_path, "r.json.resume-*.jsonl", 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TEST_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "rerun" in lines[0]
    assert list(tmp_path.glob("r.json.resume-*.rank0.jsonl")) and not out.exists()


# --------------------------------------------------------------------------------------------------
# SIGKILL at seeded random points (issue 9's fault-injection test for eval with TTA)


def test_sigkill_at_random_points_then_rerun_gives_identical_results(many, tmp_path):
    args = ["--dataset", "folder", "--root", str(many), "--tta", "tpt", "--tta-views", "8", "--save-logits", *TINY]
    ref_out = tmp_path / "ref" / "r.json"
    assert _start([*args, "--out", str(ref_out)]).wait(timeout=TEST_TIMEOUT) == 0
    rng = random.Random(1234)
    out = tmp_path / "run" / "r.json"
    kills = 0
    points = []
    for _ in range(4):
        # kill after k more images (k = 0: during start-up, before any image)
        before = _records(out.parent, "r.json.resume-*.jsonl") if out.parent.exists() else 0
        k = rng.randrange(0, max(1, 24 - before - 1))
        points.append((before, k))
        proc = _start([*args, "--out", str(out)])
        try:
            reached = k == 0 or _wait_for_records(proc, out.parent, "r.json.resume-*.jsonl", before + k)
            if reached and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=TEST_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert _group_gone(proc.pid)
    assert kills >= 3, points
    final = _start([*args, "--out", str(out)])  # also when a kill came after the results were written
    assert final.wait(timeout=TEST_TIMEOUT) == 0, final.stderr.read()
    assert _stable(json.loads(out.read_text())) == _stable(json.loads(ref_out.read_text()))
    assert leftovers(out.parent) == []


# --------------------------------------------------------------------------------------------------
# no hung ranks (issue 9, item 8)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_exit_when_the_torchrun_agent_is_killed(many, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "r.json"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protext.eval", "--dataset", "folder", "--root", str(many),
           "--tta", "tpt", "--tta-views", "32", "--tta-steps", "30", "--out", str(out), *TINY]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for_records(agent, tmp_path, "r.json.resume-*.rank*.jsonl", 2, timeout=TEST_TIMEOUT)
        ranks = _children(agent.pid)
        assert len(ranks) == 2
        agent.send_signal(signal.SIGKILL)  # the agent alone: it cannot tell its workers
        agent.wait(timeout=TEST_TIMEOUT)
        deadline = time.monotonic() + TEST_TIMEOUT  # the watchdog polls every second; load only delays it
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(r) for r in ranks), "ranks outlived their torchrun agent"
        assert not out.exists()  # they stopped, rather than finishing their shards and merging
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_under_torchrun_then_rerun_gives_identical_results(many, tmp_path):
    """The same fault injection with 2 ranks: each rank's log resumes its shard; the merged result
    equals one uninterrupted process's."""
    args = ["--dataset", "folder", "--root", str(many), "--tta", "tpt", "--tta-views", "8", "--tta-steps", "3", "--save-logits", *TINY]
    ref_out = tmp_path / "ref" / "r.json"
    assert _start([*args, "--out", str(ref_out)]).wait(timeout=TEST_TIMEOUT) == 0
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "run" / "r.json"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protext.eval", *args, "--out", str(out)]
    rng = random.Random(99)
    kills = 0
    for _ in range(2):
        before = _records(out.parent, "r.json.resume-*.rank*.jsonl") if out.parent.exists() else 0
        k = rng.randrange(1, max(2, 24 - before - 2))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if _wait_for_records(proc, out.parent, "r.json.resume-*.rank*.jsonl", before + k, timeout=TEST_TIMEOUT) and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=TEST_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + TEST_TIMEOUT
        while not _group_gone(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_gone(proc.pid)
    assert kills == 2 and not out.exists()
    final = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = final.communicate(timeout=TEST_TIMEOUT)
    finally:
        if final.poll() is None:
            os.killpg(final.pid, signal.SIGKILL)
    assert final.returncode == 0, err[-2000:]
    two, one = json.loads(out.read_text()), json.loads(ref_out.read_text())
    assert two["runtime"]["world_size"] == 2
    # two ranks against one process: another process layout, so floats within the suite's tolerance,
    # everything exact (labels, order, top-k, counts) exactly
    assert_same_results({k: v for k, v in _stable(two).items() if k != "runtime"},
                        {k: v for k, v in _stable(one).items() if k != "runtime"})
    assert leftovers(out.parent) == []


def test_decompression_bomb_is_one_line_naming_the_image(many, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # our 32x40 images are then "bombs" (> 2x the limit)
    err = fail(["--dataset", "folder", "--root", str(many), "--limit", "1", "--out", str(tmp_path / "r.json")], capsys)
    assert "too large to decode safely" in err and "ant/0.png" in err
    assert not (tmp_path / "r.json").exists()
