"""Issue 18, item 4: ``benchmarks/bench_throughput.py`` measures the image tower against the CPU's own bound.

``--quick`` (tiny model, small batches, one small matmul) checks the machinery only: the JSON and the
printed report carry every figure the full run reports, and no figure is a timing assertion. The
nominal bound's arithmetic is checked on fake ``/proc/cpuinfo`` text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_TIMEOUT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "bench_throughput.py"


def test_quick_run_reports_throughput_and_both_bounds(tmp_path):
    out = tmp_path / "throughput.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    for key in ("model", "threads", "gflops_per_image", "bounds", "runs", "table", "machine_line", "machine",
                "loadavg", "loadavg_start", "loadavg_end", "bf16_note", "argv"):
        assert key in report, key
    assert report["model"] == "tiny-clip"
    flops = report["gflops_per_image"]
    assert flops["real_call"] > 0 and flops["image_tower_gflops"] > 0
    assert report["loadavg"] is None or len(report["loadavg"]) == 3

    precisions = ["fp32", "bf16"] if report["machine"]["native_bf16"] else ["fp32"]
    assert list(report["bounds"]) == precisions
    for bound in report["bounds"].values():
        assert bound["measured_matmul"]["gflops"] > 0
        assert bound["nominal"]["gflops"] is None or bound["nominal"]["gflops"] > 0
        assert bound["nominal"]["gflops"] is not None or bound["nominal"]["why"]
    assert [(r["precision"], r["batch"]) for r in report["runs"]] == [(p, b) for p in precisions for b in (1, 4)]
    for r in report["runs"]:
        assert r["images_per_second"] > 0 and r["gflops_per_second"] > 0 and r["fraction_of_measured"] > 0
        assert r["gflops_per_second"] == pytest.approx(r["images_per_second"] * flops["real_call"])
    assert len(report["table"]) == 2 + len(report["runs"]) and "of measured" in report["table"][0]
    if not report["machine"]["native_bf16"]:
        assert "bf16 skipped" in report["bf16_note"]

    assert report["machine_line"].startswith("machine: ") and report["machine_line"] in done.stdout
    assert "load average" in done.stdout and report["table"][2] in done.stdout


CPUINFO = """processor\t: {i}
model name\t: Fake CPU
cpu MHz\t\t: 2000.000
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse2 avx {flags}
"""


def _fake(flags: str, cores: list[int], mhz: bool = True) -> str:
    text = "\n".join(CPUINFO.format(i=i, core=c, flags=flags) for i, c in enumerate(cores))
    return text if mhz else text.replace("cpu MHz\t\t: 2000.000\n", "")


@pytest.fixture()
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_throughput

        yield bench_throughput
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_nominal_bound_reads_cores_clock_and_vector_width(bench):
    avx2 = bench.nominal_fp32(4, _fake("avx2 fma", [0, 1]), max_freq_khz="")
    assert (avx2["cores"], avx2["ghz"], avx2["flops_per_cycle"]) == (2, 2.0, 32)  # 2 cores, not 4 threads
    assert avx2["gflops"] == pytest.approx(128.0)
    smt = bench.nominal_fp32(2, _fake("avx2 fma avx512f", [0, 0]), max_freq_khz="3000000\n")
    assert (smt["cores"], smt["ghz"], smt["flops_per_cycle"]) == (1, 3.0, 64)  # SMT siblings share a core
    assert "cpuinfo_max_freq" in smt["clock_source"]
    assert bench.nominal_fp32(2, _fake("avx2", [0, 1]), max_freq_khz="")["gflops"] is None  # no FMA: unknown
    no_clock = bench.nominal_fp32(2, _fake("avx2 fma", [0, 1], mhz=False), max_freq_khz="")
    assert no_clock["gflops"] is None and "clock" in no_clock["why"]
