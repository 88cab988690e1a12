"""Zero-shot image throughput on the CPU, against the CPU's own bound.

Random ViT-B/16 weights (speed does not depend on their values), the image tower as evaluation runs
it (``protext.zeroshot.ImageEncoder``: fp32 as it is, bf16 as a bfloat16 copy of the tower), at a few
batch sizes. Each row reports img/s and the GFLOP/s it achieves (img/s × GFLOPs per image, counted
on the real call with ``protext.flops`` and checked against open_clip's published 35.13), beside two
bounds, and the fraction of each reached:

* **measured**: the best GFLOP/s of a large square matmul of the same dtype, in the same process
  with the same thread count: what this CPU's BLAS actually delivers right now (under load too);
* **nominal**: cores × clock × FLOPs per cycle, read from ``/proc/cpuinfo``. fp32 FLOPs per cycle
  per core assume two FMA units of the widest vector the flags name: AVX-512 64, AVX2+FMA 32
  (2 units × 8 lanes × 2 FLOPs per multiply-add). Cores are the physical cores the threads can use
  (SMT siblings share the FMA units). The clock is ``cpuinfo_max_freq`` where the kernel exposes
  it, else ``cpu MHz`` (the current or, in a VM, the reported clock: boost clocks may be higher, so
  the fraction may then be overstated). Where a figure cannot be read, the nominal bound is omitted
  with the reason.

bf16 is measured only where ``protext.hardware.has_native_bf16()`` says the CPU computes it natively
(elsewhere it is emulated, tens of times slower than fp32); ``--force-bf16`` measures it anyway.
Ratios are printed, never asserted. The load average is recorded at the start and end, as other
jobs on the machine lower every figure.

    python benchmarks/bench_throughput.py                          # batch 1, 16, 64 (minutes on 2 cores)
    python benchmarks/bench_throughput.py --batches 64 --repeats 2
    python benchmarks/bench_throughput.py --quick --out /tmp/t.json  # tiny model: the machinery, not the speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from _common import machine_line, machine_record, warn_emulated_bf16

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "ViT-B-16"
QUICK_MODEL = "tiny-clip"
#: fp32 FLOPs per cycle per core, two FMA units of the widest vector named by the flags
FP32_FLOPS_PER_CYCLE = (("avx512f", 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2"),
                        ("avx2+fma", 32, "AVX2+FMA: 2 FMA units x 8 fp32 lanes x 2"))


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _processors(text: str) -> list[dict[str, str]]:
    """Every processor block of ``/proc/cpuinfo`` text as a dict of its fields."""
    blocks, fields = [], {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                blocks.append(fields)
            fields = {}
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if fields:
        blocks.append(fields)
    return blocks


def nominal_fp32(threads: int, cpuinfo: Optional[str] = None, max_freq_khz: Optional[str] = None) -> dict[str, Any]:
    """The nominal fp32 bound (GFLOP/s) with the figures it is made of, or ``gflops: None`` and why."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"gflops": None, "why": "no /proc/cpuinfo on this system"}
    procs = _processors(cpuinfo)
    if not procs:
        return {"gflops": None, "why": "/proc/cpuinfo lists no processor"}
    flags = set((procs[0].get("flags") or "").split())
    per_cycle = None
    for name, flops, note in FP32_FLOPS_PER_CYCLE:
        if all(f in flags for f in name.split("+")):
            per_cycle, assumption = flops, note
            break
    if per_cycle is None:
        return {"gflops": None, "why": "the flags name neither AVX-512 nor AVX2+FMA (FLOPs per cycle unknown)"}
    physical = {(p.get("physical id", "0"), p.get("core id", p.get("processor"))) for p in procs}
    cores = min(threads, len(physical))
    if max_freq_khz is None:
        try:
            max_freq_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        except OSError:
            max_freq_khz = None
    if max_freq_khz and max_freq_khz.strip().isdigit():
        ghz, clock_source = int(max_freq_khz) / 1e6, "cpufreq cpuinfo_max_freq"
    elif procs[0].get("cpu MHz"):
        ghz, clock_source = float(procs[0]["cpu MHz"]) / 1e3, "/proc/cpuinfo 'cpu MHz' (boost may be higher)"
    else:
        return {"gflops": None, "why": "the clock cannot be read (no cpufreq and no 'cpu MHz' in /proc/cpuinfo)"}
    return {"gflops": cores * ghz * per_cycle, "cores": cores, "ghz": round(ghz, 4), "flops_per_cycle": per_cycle,
            "assumption": assumption, "clock_source": clock_source}


def best_rate(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[float, float, int]:
    """(best seconds, median seconds, calls) of ``fn`` after one untimed warm-up call: ``repeats``
    timed calls, fewer once ``budget_s`` has passed (at least one)."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - started < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), len(times)


def matmul_bound(dtype_name: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    """The best GFLOP/s of an ``n × n`` by ``n × n`` matmul of ``dtype_name`` over ``sizes``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best: dict[str, Any] = {"gflops": 0.0}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        seconds, _, calls = best_rate(lambda: torch.mm(a, b, out=out), repeats, budget_s=10.0)
        rate = 2 * n**3 / seconds / 1e9
        if rate > best["gflops"]:
            best = {"gflops": rate, "n": n, "calls": calls}
    return best


def gflops_per_image(clip, encoder, size: int, model: str) -> dict[str, Any]:
    """GFLOPs per image: counted on the real call (the encoder, batch 1), by ``image_tower_gflops`` on
    the model, and open_clip's published figure."""
    import torch

    from protext.flops import PUBLISHED_GFLOPS, count_flops, image_tower_gflops

    real = count_flops(encoder, torch.randn(1, 3, size, size)) / 1e9
    return {"real_call": real, "image_tower_gflops": image_tower_gflops(clip.model, size),
            "published": PUBLISHED_GFLOPS.get(model, {}).get("image")}


def _fraction(a: float, b: Optional[float]) -> Optional[float]:
    return a / b if b else None


def _pct(x: Optional[float]) -> str:
    return f"{100 * x:.0f} %" if x is not None else "-"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    from protext.hardware import has_native_bf16, native_bf16_flags
    from protext.models import load_clip
    from protext.zeroshot import ImageEncoder

    load_start = loadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(args.model, "random", device="cpu")
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    precisions = ["fp32"]
    bf16_note = None
    if has_native_bf16() or args.force_bf16:
        precisions.append("bf16")
        if not has_native_bf16():
            warn_emulated_bf16("bf16")
            bf16_note = "bf16 measured with --force-bf16 on a CPU that emulates it (no avx512_bf16/AMX)"
    else:
        bf16_note = ("bf16 skipped: this CPU has no native bf16 (no avx512_bf16/AMX), where it is emulated "
                     "and far slower than fp32; --force-bf16 measures it anyway")
        print(f"[bench] {bf16_note}", file=sys.stderr, flush=True)

    nominal = nominal_fp32(threads)
    bounds: dict[str, dict[str, Any]] = {}
    for p in precisions:
        print(f"[bench] {p} matmul bound, n in {args.matmul_sizes} ...", file=sys.stderr, flush=True)
        measured = matmul_bound(p, args.matmul_sizes, args.matmul_repeats)
        if p == "fp32":
            nom = nominal
        elif nominal["gflops"] and "avx512_bf16" in native_bf16_flags() and "amx_bf16" not in native_bf16_flags():
            nom = {**nominal, "gflops": 2 * nominal["gflops"], "flops_per_cycle": 2 * nominal["flops_per_cycle"],
                   "assumption": "avx512_bf16: twice the fp32 rate"}
        else:
            nom = {"gflops": None, "why": "no bf16 FLOPs per cycle known for this CPU (AMX, emulated, or no fp32 figure)"}
        bounds[p] = {"measured_matmul": measured, "nominal": nom}

    rows = []
    flops = None
    for p in precisions:
        encoder = ImageEncoder(clip.model, torch.bfloat16 if p == "bf16" else None)
        if flops is None:
            flops = gflops_per_image(clip, encoder, size, args.model)
        for batch in args.batches:
            print(f"[bench] {p} batch {batch} ...", file=sys.stderr, flush=True)
            images = torch.randn(batch, 3, size, size)
            best, median, calls = best_rate(lambda: encoder(images), args.repeats, args.budget)
            ips = batch / best
            achieved = ips * flops["real_call"]
            row = {"precision": p, "batch": batch, "calls": calls, "best_seconds": best, "median_seconds": median,
                   "images_per_second": ips, "images_per_second_median": batch / median, "gflops_per_second": achieved,
                   "fraction_of_measured": _fraction(achieved, bounds[p]["measured_matmul"]["gflops"]),
                   "fraction_of_nominal": _fraction(achieved, bounds[p]["nominal"]["gflops"])}
            print(f"[bench]   {ips:.2f} img/s, {achieved:.1f} GFLOP/s", file=sys.stderr, flush=True)
            rows.append(row)
    return {"model": args.model, "threads": threads, "gflops_per_image": flops, "bounds": bounds, "runs": rows,
            "bf16_note": bf16_note, "loadavg_start": load_start, "loadavg_end": loadavg()}


def table(result: dict[str, Any]) -> list[str]:
    head = ["precision", "batch", "img/s (best)", "img/s (median)", "GFLOP/s", "measured bound GFLOP/s",
            "of measured", "nominal bound GFLOP/s", "of nominal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        b = result["bounds"][r["precision"]]
        nominal = b["nominal"]["gflops"]
        cells = [r["precision"], str(r["batch"]), f"{r['images_per_second']:.2f}", f"{r['images_per_second_median']:.2f}",
                 f"{r['gflops_per_second']:.1f}", f"{b['measured_matmul']['gflops']:.1f}", _pct(r["fraction_of_measured"]),
                 f"{nominal:.1f}" if nominal else "-", _pct(r["fraction_of_nominal"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    flops = result["gflops_per_image"]
    out = ["\n".join(table(result)), ""]
    published = flops["published"]
    check = (f"; published {published:.2f} (counted / published = {flops['real_call'] / published:.4f})"
             if published else "; no published figure for this model")
    out.append(f"{args.model} (random weights), CPU, {result['threads']} threads; GFLOPs per image counted on the "
               f"real call {flops['real_call']:.2f}, image_tower_gflops {flops['image_tower_gflops']:.2f}{check}.")
    for p, b in result["bounds"].items():
        m, n = b["measured_matmul"], b["nominal"]
        line = f"{p} bounds: measured = best {p} matmul {m['n']}x{m['n']} in this process, {m['gflops']:.1f} GFLOP/s; "
        if n["gflops"]:
            line += (f"nominal = {n['cores']} cores x {n['ghz']:.3f} GHz ({n['clock_source']}) x {n['flops_per_cycle']}"
                     f" FLOP/cycle ({n['assumption']}) = {n['gflops']:.1f} GFLOP/s.")
        else:
            line += f"nominal omitted: {n['why']}."
        out.append(line)
    if result["bf16_note"]:
        out.append(result["bf16_note"] + ".")
    if args.quick:
        out.append(f"--quick: {QUICK_MODEL} checks the machinery; its figures say nothing about ViT-B/16.")
    fmt = lambda la: "/".join(f"{x:.2f}" for x in la) if la else "unknown"  # noqa: E731
    out.append(machine_line("cpu"))
    out.append(f"load average (1/5/15 min): {fmt(result['loadavg_start'])} at the start, "
               f"{fmt(result['loadavg_end'])} at the end")
    out.append("command: python benchmarks/bench_throughput.py " + " ".join(sys.argv[1:]))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="Batch sizes (default 1 16 64; 1 4 with --quick).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per batch size after one warm-up (fewer once --budget has passed).")
    parser.add_argument("--budget", type=float, default=60.0, help="Seconds of timed calls per batch size after which no further call starts.")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=None, help="Square matmul sizes for the measured bound (default 2048 3072; 512 with --quick).")
    parser.add_argument("--matmul-repeats", type=int, default=8, help="Timed matmuls per size.")
    parser.add_argument("--force-bf16", action="store_true", help="Measure bf16 even where the CPU only emulates it (slow).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MODEL}, batches 1 and 4, a 512 matmul, one repeat: seconds; the machinery, not the speed.")
    parser.add_argument("--out", default=None, help="Also write the figures, the bounds, the machine and the load average to this JSON file.")
    args = parser.parse_args(argv)
    args.model = QUICK_MODEL if args.quick else MODEL
    if args.quick:
        args.repeats, args.matmul_repeats = 1, 4
    args.batches = args.batches or ([1, 4] if args.quick else [1, 16, 64])
    args.matmul_sizes = args.matmul_sizes or ([512] if args.quick else [2048, 3072])

    result = run(args)
    text = report(args, result)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**result, "table": table(result), "argv": sys.argv[1:],
                                              "machine_line": machine_line("cpu"), "machine": machine_record(),
                                              "loadavg": result["loadavg_end"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
