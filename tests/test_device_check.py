"""Issue 18, item 2: ``benchmarks/device_check.py`` without a GPU — its refusal, its step machinery on
the CPU with tiny sizes (a step forced to time out, the partial report kept), and its report writer on
fake timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(BENCH))
    import device_check as module

    return module


def run(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}  # no GPU, even on a machine with one
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_without_a_gpu_it_lists_its_steps_says_one_line_and_exits_2(tmp_path):
    start = time.monotonic()
    done = run("--out", str(tmp_path / "report"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "device_check: no CUDA device here (torch.cuda.is_available() is False); it measures a GPU: run it on a "
        "machine with one, or add --allow-cpu --quick to test its machinery on this CPU."
    ]
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["tests", "zeroshot", "tta-47", "tta-1000", "train", "torchrun-1"]
    assert not (tmp_path / "report").exists()  # nothing measured, nothing written
    assert time.monotonic() - start < 30  # immediately: torch's import, no model


def test_quick_cpu_run_keeps_what_finished_when_steps_time_out(tmp_path):
    """Three steps forced to time out (the nested pytest, 1000 classes, torchrun with 2 processes):
    they are recorded as timeouts, every other step's figures are in both reports, exit status 1."""
    out = tmp_path / "report"
    done = run("--allow-cpu", "--quick", "--out", str(out), "--step-timeout", "tests=0.001",
               "--step-timeout", "tta-1000=0.001", "--step-timeout", "torchrun-all=0.001")
    assert done.returncode == 1, done.stderr
    report = json.loads((out / "device_check.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"tests": "timeout", "zeroshot": "ok", "tta-47": "ok", "tta-1000": "timeout", "train": "ok",
                      "torchrun-1": "ok", "torchrun-all": "timeout"}
    assert report["finished"] and report["gpu"] is None and report["dense_peak_tflops"] is None
    steps = {s["name"]: s for s in report["steps"]}
    assert [r["precision"] for r in steps["zeroshot"]["results"]] == ["fp16", "bf16"]
    assert [r["method"] for r in steps["tta-47"]["results"]] == ["tpt", "ctpt", "zero", "tda", "tda-64", "mta"]
    assert all(r["seconds_per_image"] > 0 and r["peak_mib"] > 0 for r in steps["tta-47"]["results"])
    assert steps["train"]["results"][0]["epoch_seconds"] > 0
    assert steps["torchrun-1"]["results"][0]["processes"] == 1
    text = (out / "device_check.md").read_text()
    assert "| tta-1000 | timeout |" in text and "| 47 | mta | fp32 |" in text and "**torchrun-all: timeout**" in text
    assert "[device_check] tta-1000: timeout" in done.stderr  # progress on stderr


def test_report_on_fake_timings(device_check, tmp_path):
    """An H100 at 14,000 img/s bf16 reaches 14000 × 35.13 GFLOPs / 989 TFLOPS = 49.7 % of its dense peak."""
    assert device_check.dense_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_check.dense_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_check.dense_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert device_check.dense_peak_tflops("NVIDIA L4") is None
    assert device_check.bound_fraction(14000, 989.0) == pytest.approx(14000 * 35.13e9 / 989e12)
    steps = [
        {"name": "tests", "what": "", "status": "ok", "seconds": 50.0, "timeout": 120, "error": "",
         "results": [{"summary": "37 passed in 50s", "exit_status": 0}]},
        {"name": "zeroshot", "what": "", "status": "ok", "seconds": 20.0, "timeout": 45, "error": "",
         "results": [{"precision": "bf16", "batch": 256, "images_per_second": 14000.0, "peak_mib": 3000.0}]},
        {"name": "tta-47", "what": "", "status": "timeout", "seconds": 75.0, "timeout": 75, "error": "killed\n",
         "results": [{"classes": 47, "method": "tpt", "precision": "fp16", "views": 64, "seconds_per_image": 0.1234,
                      "image_seconds_per_image": 0.1, "rest_seconds_per_image": 0.0234, "peak_mib": 2500.0}]},
        {"name": "train", "what": "", "status": "skipped", "seconds": 0.0, "timeout": 0.0, "error": "budget", "results": []},
    ]
    report = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "dense_peak_tflops": 989.0, "machine": "x",
              "torch": "2", "command": "device_check.py", "updated": "t", "finished": None, "steps": steps}
    device_check.write_report(report, tmp_path)
    text = (tmp_path / "device_check.md").read_text()
    assert text.startswith("# Device check (partial: t)")
    assert "bound 28,153 img/s" in text  # 989e12 / 35.13e9
    assert "| bf16 | 256 | 14,000.0 | 49.7% | 3,000 |" in text
    assert "| 47 | tpt | fp16 | 64 | 0.123 | 0.100 | 0.023 | 2,500 |" in text
    assert "**tta-47: timeout** — killed" in text and "**train: skipped** — budget" in text
    assert json.loads((tmp_path / "device_check.json").read_text())["steps"][2]["status"] == "timeout"


def test_a_step_past_the_budget_is_skipped_not_run(device_check, tmp_path):
    step = device_check.Step("train", 60, "x")
    args = type("Args", (), {"step_timeouts": {}, "quick": True, "device": "cpu", "gpus": 0})()
    record = device_check.run_step(step, args, tmp_path, remaining=0.0)
    assert (record.status, record.seconds) == ("skipped", 0.0)


def test_a_killed_step_keeps_the_lines_it_printed(device_check):
    """The child prints a result, then hangs: at the timeout its process group is killed and the line kept."""
    code = "import time; print('RESULT {\"a\": 1}', flush=True); print('RESULT {\"b\"', flush=True); time.sleep(60)"
    start = time.monotonic()
    status, out, _ = device_check.run_bounded([sys.executable, "-c", code], timeout=3)
    assert status is None and time.monotonic() - start < 20
    assert device_check.parse_results(out) == [{"a": 1}]  # the torn line is dropped
