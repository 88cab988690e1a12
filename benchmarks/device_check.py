"""One prepared GPU check: the CUDA-relevant tests, then every figure the README's Performance section lacks.

A GPU is lent to this project for minutes at a time, so this script is written to fit: every step is
its own subprocess with its own timeout (the whole run stays under ``--budget``, 8 minutes), prints
progress on stderr, and the JSON + markdown report is rewritten after every step, so a slow step, a
timed-out one or a killed run still leaves everything that finished. Steps:

* ``tests``: ``pytest -q -k "cuda or fp16 or precision"`` (the precision paths, on this machine);
* ``zeroshot``: image throughput (img/s) of ViT-B/16 (random weights), batch 256, fp16 and bf16,
  beside the physical bound: 35.13 GFLOPs per image against the GPU's dense fp16/bf16 peak;
* ``tta-47``, ``tta-1000``: seconds per image of every TTA method (``bench_tta.py``'s machinery);
* ``train``: one ProText epoch on ImageNet's CuPL descriptions (``bench_train.py``'s machinery);
* ``torchrun-1``, ``torchrun-all``: zero-shot ``protext.eval`` on a synthetic folder with 1 process,
  then one per GPU present;

with the peak memory of each (CUDA's max allocated; on a CPU the peak RSS).

    python benchmarks/device_check.py --out device_check            # on a machine with a GPU
    python benchmarks/device_check.py --allow-cpu --quick --out /tmp/dc  # the machinery, tiny sizes, on a CPU

Without a CUDA device it prints one line and exits 2 (``--allow-cpu`` runs it on the CPU anyway).
The children's measurements live in ``device_steps.py``; this script plans, bounds and reports.
Exit status: 0 every step finished, 1 a step failed or timed out (the report says which), 2 no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from device_steps import REPO, RESULT, Sizes, run_child

GFLOPS_PER_IMAGE = 35.13
"""ViT-B/16 forward at 224 px, in GFLOPs (multiply-adds counted as two)."""

DENSE_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
"""Dense fp16/bf16 tensor-core peaks (NVIDIA's datasheets); the first name contained in the GPU's wins."""

NO_GPU = ("device_check: no CUDA device here (torch.cuda.is_available() is False); it measures a GPU: run it on a "
          "machine with one, or add --allow-cpu --quick to test its machinery on this CPU.")


# -------------------------------------------------------------------------------------------------- the plan


@dataclass
class Step:
    """One bounded subprocess of the check."""

    name: str
    timeout: float
    what: str


def plan(gpus: int) -> list[Step]:
    """The steps in order, each with its own timeout in seconds (they sum to under 8 minutes)."""
    steps = [
        Step("tests", 120, "pytest -q -k 'cuda or fp16 or precision'"),
        Step("zeroshot", 45, "ViT-B/16 image throughput, fp16 and bf16, batch 256"),
        Step("tta-47", 75, "every TTA method, seconds per image, 47 classes"),
        Step("tta-1000", 90, "every TTA method, seconds per image, 1000 classes"),
        Step("train", 60, "one ProText epoch on ImageNet's CuPL descriptions"),
        Step("torchrun-1", 30, "zero-shot eval under torchrun, 1 process"),
    ]
    if gpus != 1:  # on one GPU "all" is the 1-process run; on a CPU (--allow-cpu) 2 gloo processes
        steps.append(Step("torchrun-all", 30, f"zero-shot eval under torchrun, {max(gpus, 2)} processes"))
    return steps


@dataclass
class StepRecord:
    """What one step left: ``status`` is ok, failed, timeout or skipped (the budget ran out)."""

    name: str
    what: str
    status: str
    seconds: float
    timeout: float
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


# -------------------------------------------------------------------------------------------------- running steps


def run_bounded(cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None) -> tuple[Optional[int], str, str]:
    """(exit status or None on timeout, stdout, stderr) of ``cmd``, killed with its whole process group
    at ``timeout`` (torchrun's workers included); the output printed until then is returned."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def parse_results(stdout: str) -> list[dict[str, Any]]:
    """The ``RESULT {json}`` lines a child printed (a torn last line, cut by a timeout, is dropped)."""
    found = []
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            try:
                found.append(json.loads(line[len(RESULT):]))
            except json.JSONDecodeError:
                pass
    return found


def step_command(step: Step, args: argparse.Namespace, scratch: Path) -> list[str]:
    """The subprocess of ``step``: pytest, torchrun, or this script's own ``--step NAME`` child."""
    sizes = Sizes.for_run(args.quick)
    if step.name == "tests":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sizes.tests]
    if step.name.startswith("torchrun"):
        procs = 1 if step.name == "torchrun-1" else max(args.gpus, 2)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                "-m", "protext.eval", "--dataset", "folder", "--root", str(scratch / "folder"), "--model", sizes.model,
                "--pretrained", "random", "--method", "clip", "--device", args.device, "--batch-size", str(sizes.batch),
                "--workers", "0" if args.quick else "4", "--no-progress", "--overwrite",
                "--out", str(scratch / f"{step.name}.json")]
    return [sys.executable, __file__, "--step", step.name, "--device", args.device] + (["--quick"] if args.quick else [])


def torchrun_result(step: Step, scratch: Path, seconds: float, images: int) -> list[dict[str, Any]]:
    """Wall time, and the evaluation's own images per second and peak memory, from the results file it wrote."""
    path = scratch / f"{step.name}.json"
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    runtime, timing = payload["runtime"], payload["timing"]
    return [{"processes": runtime["world_size"], "device": runtime["device_name"], "precision": runtime["precision"],
             "images": images, "wall_seconds": seconds, "images_per_second": timing["images_per_second"],
             "peak_memory": timing["peak_memory"]}]


def run_step(step: Step, args: argparse.Namespace, scratch: Path, remaining: float) -> StepRecord:
    """Run ``step`` within ``min(its timeout, remaining budget)``; never raises for the step's own failure."""
    timeout = min(args.step_timeouts.get(step.name, step.timeout), remaining)
    if timeout <= 0:
        return StepRecord(step.name, step.what, "skipped", 0.0, 0.0, error="the check's --budget ran out before this step")
    print(f"[device_check] {step.name}: {step.what} (timeout {timeout:.0f} s) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    code, out, err = run_bounded(step_command(step, args, scratch), timeout)
    seconds = time.perf_counter() - start
    if step.name.startswith("torchrun") and code == 0:
        results = torchrun_result(step, scratch, seconds, Sizes.for_run(args.quick).folder_images)
    else:
        results = parse_results(out)
    if step.name == "tests":
        results = [{"summary": (out.strip().splitlines() or [""])[-1], "exit_status": code}]
    status = "timeout" if code is None else ("ok" if code == 0 else "failed")
    error = "" if status == "ok" else (err or out)[-2000:]
    print(f"[device_check] {step.name}: {status} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return StepRecord(step.name, step.what, status, seconds, timeout, results, error)


# -------------------------------------------------------------------------------------------------- the report


def dense_peak_tflops(gpu: Optional[str]) -> Optional[float]:
    """The GPU's dense fp16/bf16 peak from :data:`DENSE_PEAK_TFLOPS`, or None (unknown, or a CPU)."""
    for name, tflops in DENSE_PEAK_TFLOPS:
        if gpu and name.lower() in gpu.lower():
            return tflops
    return None


def bound_fraction(images_per_second: float, peak_tflops: Optional[float]) -> Optional[float]:
    """The share of the physical bound reached: achieved FLOP/s over the dense peak (None if unknown)."""
    if not peak_tflops:
        return None
    return images_per_second * GFLOPS_PER_IMAGE * 1e9 / (peak_tflops * 1e12)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the machine, every step's status, then one table per kind of figure."""
    peak = report["dense_peak_tflops"]
    lines = [f"# Device check ({report['finished'] or 'partial: ' + report['updated']})", "",
             f"- device: {report['device']} ({report['gpu'] or 'no GPU'}), {report['gpus']} GPU(s); torch {report['torch']}",
             f"- machine: {report['machine']}",
             f"- dense fp16/bf16 peak: {f'{peak:.0f} TFLOPS' if peak else 'unknown for this device'}; "
             f"ViT-B/16 costs {GFLOPS_PER_IMAGE} GFLOPs per image"
             + (f" (bound {peak * 1e3 / GFLOPS_PER_IMAGE:,.0f} img/s)" if peak else ""),
             f"- command: `{report['command']}`", "", "| step | status | seconds | timeout s |", "| --- | --- | --- | --- |"]
    steps = {s["name"]: s for s in report["steps"]}
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['timeout']:.0f} |" for s in report["steps"]]
    if "tests" in steps and steps["tests"]["results"]:
        lines += ["", f"Tests: {steps['tests']['results'][0]['summary']}"]
    if "zeroshot" in steps and steps["zeroshot"]["results"]:
        lines += ["", "| precision | batch | img/s | fraction of the dense peak | peak MiB |", "| --- | --- | --- | --- | --- |"]
        for r in steps["zeroshot"]["results"]:
            frac = bound_fraction(r["images_per_second"], peak)
            lines.append(f"| {r['precision']} | {r['batch']} | {r['images_per_second']:,.1f} | "
                         f"{f'{frac:.1%}' if frac is not None else 'unknown'} | {r['peak_mib']:,.0f} |")
    tta = [r for name in ("tta-47", "tta-1000") if name in steps for r in steps[name]["results"]]
    if tta:
        lines += ["", "| classes | method | precision | views | s / image | image encoding s | rest s | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['classes']} | {r['method']} | {r['precision']} | {r['views']} | {r['seconds_per_image']:.3f} | "
                  f"{r['image_seconds_per_image']:.3f} | {r['rest_seconds_per_image']:.3f} | {r['peak_mib']:,.0f} |" for r in tta]
    if "train" in steps and steps["train"]["results"]:
        r = steps["train"]["results"][0]
        lines += ["", f"Training (`{r['preset']}`, {r['samples']} descriptions, {r['steps_per_epoch']} steps of 256): "
                  f"{r['epoch_seconds']:.1f} s per epoch ({r['steps_timed']} steps timed"
                  f"{', extrapolated' if r['extrapolated'] else ''}), targets once {r.get('target_seconds', 0):.1f} s, "
                  f"peak {r['peak_mib']:,.0f} MiB."]
    runs = [r for name in ("torchrun-1", "torchrun-all") if name in steps for r in steps[name]["results"]]
    if runs:
        lines += ["", "| torchrun processes | precision | images | img/s (evaluation) | wall s (model load included) | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['processes']} | {r['precision']} | {r['images']} | {r['images_per_second']:.1f} | {r['wall_seconds']:.1f} | "
                  f"{r['peak_memory']['mib']:,.0f} ({r['peak_memory']['kind']}) |" for r in runs]
    failed = [s for s in report["steps"] if s["status"] != "ok"]
    for s in failed:
        lines += ["", f"**{s['name']}: {s['status']}**" + (f" — {s['error'].strip().splitlines()[-1]}" if s["error"].strip() else "")]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """``device_check.json`` and ``device_check.md`` in ``out``, each replaced atomically."""
    sys.path.insert(0, str(REPO))
    from protext.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("device_check.json", json.dumps(report, indent=1)), ("device_check.md", markdown(report))):
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))


def make_folder(root: Path, n: int) -> None:
    """A plain image folder of ``n`` small noise images over two classes, for the torchrun steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"class_{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def drive(args: argparse.Namespace, now: Callable[[], float] = time.monotonic) -> int:
    """Every step within the budget, the report rewritten after each; the exit status of the check."""
    import torch

    sys.path.insert(0, str(REPO))
    from protext.hardware import describe_cpu

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    report: dict[str, Any] = {
        "device": args.device, "gpu": gpu, "gpus": args.gpus, "dense_peak_tflops": dense_peak_tflops(gpu),
        "gflops_per_image": GFLOPS_PER_IMAGE, "machine": describe_cpu(), "torch": torch.__version__, "quick": args.quick,
        "budget_seconds": args.budget, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None, "steps": [],
    }
    deadline = now() + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        make_folder(scratch / "folder", Sizes.for_run(args.quick).folder_images)
        for step in plan(args.gpus):
            record = run_step(step, args, scratch, deadline - now())
            report["steps"].append(asdict(record))
            report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_report(report, args.out)
    report["finished"] = report["updated"]
    write_report(report, args.out)
    print(f"[device_check] report: {args.out / 'device_check.md'}", file=sys.stderr, flush=True)
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


def parse_timeouts(items: list[str]) -> dict[str, float]:
    """``NAME=SECONDS`` overrides of step timeouts (hidden: the tests force a timeout with them)."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device_check"), help="Folder of device_check.json and .md.")
    parser.add_argument("--budget", type=float, default=480.0, help="Seconds for the whole check; steps past it are skipped.")
    parser.add_argument("--allow-cpu", action="store_true", help="Run on the CPU when there is no GPU (tests the machinery).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: tiny-clip, 2 images, one training step.")
    parser.add_argument("--list", action="store_true", help="Print the steps and their timeouts, run nothing.")
    parser.add_argument("--step-timeout", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        run_child(args.step, args.device, args.quick)
        return 0
    import torch

    args.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.list or not args.gpus:
        for step in plan(args.gpus or 1):
            print(f"{step.name:13s} {step.timeout:4.0f} s  {step.what}")
    if args.list:
        return 0
    if not args.gpus and not args.allow_cpu:
        print(NO_GPU, file=sys.stderr)
        return 2
    args.device = "cuda" if args.gpus else "cpu"
    args.step_timeouts = parse_timeouts(args.step_timeout)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
