"""The newcomer's first command, timed: ``python -m protext.quickstart --pretrained random`` end to end.

Each run is a fresh quickstart in its own work folder, in a subprocess, so it pays everything a user
pays (imports, model build, descriptions, training, every row: 3 zero-shot and one per adaptation
method). Besides the wall seconds it prints each row's seconds, the image encodings the run computed
and shared (the quickstart's own count), and the load average before and after each run: on a busy
machine the seconds mean little without it. Runs:

* ``auto``: the default; the precision the CPU's capability chooses (printed);
* ``fp32``: forced; on a CPU with native bf16 it stands in for an AVX2-only CPU;
* ``bf16``: forced, only where the CPU computes bf16 natively (``--emulated-bf16`` times it anyway:
  on an AVX2 CPU that is the 53-minute first impression this benchmark exists to prevent);
* ``reference``: ``auto`` with ``--no-shared-encodings`` (every row encodes its own images), in the
  same run, so the speed-up of sharing encodings is a printed ratio, and its top-1 and top-5 per row
  are compared with ``auto``'s (they must agree: the sharing is exact).

    python benchmarks/bench_quickstart.py                  # auto, fp32 (if auto is not fp32), reference
    python benchmarks/bench_quickstart.py --runs auto      # just the default
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = ("auto", "fp32", "bf16", "reference")
ROW_LINE = re.compile(r"^quickstart: row (\d+)/(\d+) (\S+): .*, (\d+) s$")
ENCODINGS_LINE = re.compile(r"^quickstart: (\d+) image encodings computed, (\d+) shared")


def load_average() -> float:
    """The 1-minute load average (NaN where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def read_log(stdout: str) -> dict:
    """Each row's wall seconds, in order, and the encodings computed and shared, from the quickstart's lines."""
    rows = [(m.group(3), int(m.group(4))) for m in map(ROW_LINE.match, stdout.splitlines()) if m]
    counts = next((m for m in map(ENCODINGS_LINE.match, stdout.splitlines()) if m), None)
    return {"row_seconds": rows, "encodings_computed": int(counts.group(1)) if counts else None,
            "encodings_shared": int(counts.group(2)) if counts else None}


def quickstart(kind: str, workdir: Path, args: argparse.Namespace) -> dict:
    """One fresh quickstart; returns its wall seconds and summary rows."""
    cmd = [sys.executable, "-m", "protext.quickstart", "--pretrained", "random", "--model", args.model,
           "--workdir", str(workdir), "--fresh", "--tta-views", str(args.tta_views)]
    if kind in ("fp32", "bf16"):
        cmd += ["--precision", kind]
    if kind == "reference":
        cmd += ["--no-shared-encodings"]
    print(f"[bench] {kind}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    load_before = load_average()
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - start
    load_after = load_average()
    if done.returncode != 0:
        raise SystemExit(f"[bench] {kind} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    precision = next((line.split("precision auto: ")[1].split(" ")[0] for line in done.stdout.splitlines()
                      if "precision auto: " in line), kind)
    rows = json.loads((workdir / "results" / "summary.json").read_text())
    print(f"[bench]   {seconds:.0f} s ({precision})", file=sys.stderr, flush=True)
    return {"kind": kind, "precision": precision, "seconds": seconds, "rows": rows, "load": [load_before, load_after],
            **read_log(done.stdout)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["auto", "fp32", "bf16", "reference"], choices=RUNS,
                        help="which quickstarts to time (fp32 is skipped when auto is fp32; bf16 where it is emulated)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--tta-views", type=int, default=8, help="the quickstart's --tta-views")
    parser.add_argument("--emulated-bf16", action="store_true", help="time forced bf16 even on a CPU without native bf16")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before one quickstart is given up")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from _common import machine_line, machine_record
    from protext.hardware import auto_precision, has_native_bf16

    auto = auto_precision("cpu")[0]
    runs = [k for k in args.runs if not (k == "fp32" and auto == "fp32")
            and not (k == "bf16" and (auto == "bf16" or (not has_native_bf16() and not args.emulated_bf16)))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in runs:
            results.append(quickstart(kind, Path(tmp) / kind, args))
    by_kind = {r["kind"]: r for r in results}
    print("| run | precision | wall s | under 2 min | top-1/top-5 = auto | encodings computed / shared | load avg before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        same = "—"
        if r["kind"] != "auto" and "auto" in by_kind and r["precision"] == by_kind["auto"]["precision"]:
            agree = sum((a["top1"], a["top5"]) == (b["top1"], b["top5"]) for a, b in zip(r["rows"], by_kind["auto"]["rows"]))
            same = f"{agree}/{len(r['rows'])} rows"
        encodings = "—" if r["encodings_computed"] is None else f"{r['encodings_computed']} / {r['encodings_shared']}"
        print(f"| {r['kind']} | {r['precision']} | {r['seconds']:.0f} | {'yes' if r['seconds'] < 120 else 'no'} | {same} "
              f"| {encodings} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    first = results[0] if results else None
    if first and first["row_seconds"]:
        views = {row["method"]: row.get("views") for row in first["rows"]}
        print(f"\nrows of {first['kind']} (wall seconds each, the encodings of the first row of a view recipe included):\n")
        print("| row | views | s |")
        print("| --- | --- | --- |")
        for label, row_seconds in first["row_seconds"]:
            shown = views.get(label)
            print(f"| {label} | {'—' if shown is None else shown} | {row_seconds} |")
    if "reference" in by_kind and "auto" in by_kind:
        print(f"\nshared encodings: {by_kind['reference']['seconds'] / by_kind['auto']['seconds']:.2f}x faster than every row encoding its own")
    print(f"\n{args.model} (random weights), --tta-views {args.tta_views}; {machine_line()}")
    print("command: python benchmarks/bench_quickstart.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": results, "machine": machine_record(), "argv": sys.argv[1:]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
