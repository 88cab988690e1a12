"""Cost per test image of every TTA method, with fast TPT as the reference, in one run.

Random ViT-B-16 weights (speed and memory do not depend on the values), 47 classes (DTD's names)
and 1000 classes (ImageNet's), each method's own views for that dataset (64; TDA: 1 on DTD and
ImageNet, plus a ``tda-64`` row with the natural-shift setting). Every (method, classes, batch)
runs in its own subprocess so that its peak memory (``ru_maxrss``; ``max_memory_allocated`` on
CUDA) is its own. Seconds per image are split into image encoding (the ``images`` timing) and the
rest; class features of ZERO/TDA/MTA and TPT's initial text features are a one-time setup,
reported apart. ``--batch B`` adds ``--tta-batch B`` throughput for the episodic methods.

    python benchmarks/bench_tta.py                               # the full table (slow on a CPU)
    python benchmarks/bench_tta.py --images 2 --classes 47 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import CLASS_FILES, machine_line, machine_record, peak_gib, random_vit_and_classes, synthetic_images

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

DATASET = {47: "dtd", 1000: "imagenet"}
METHODS = ("tpt", "ctpt", "zero", "tda", "tda-64", "mta")
EPISODIC = ("tpt", "ctpt", "zero", "mta")


def _adapter(args, clip, classnames):
    """(TTA config, adapter, one-time setup seconds) for ``args.method``."""
    from protext.checkpoint import class_encoder
    from protext.tta import TTAConfig, build_adapter
    from protext.zeroshot import clip_text_features

    method = "tda" if args.method == "tda-64" else args.method
    fp16 = args.precision == "fp16"  # on a CPU the same (emulated) path as on CUDA, said once by drive()
    config = TTAConfig(method=method, views=64 if args.method == "tda-64" else None, batch=args.batch, fp16=fp16)
    dataset = DATASET[args.n_classes]
    start = time.perf_counter()
    if method in ("tpt", "ctpt"):
        encoder = class_encoder(clip.model, clip.tokenizer, classnames, "a photo of a {}.")
        adapter = build_adapter(config, clip.model, dataset, encoder=encoder)
        adapter.tuner.initial_text_features()  # once per dataset: the text features at the initialisation
    else:
        features = clip_text_features(clip.model, clip.tokenizer, classnames, "a photo of a {}.")
        adapter = build_adapter(config, clip.model, dataset, text_features=features)
    return config, adapter, time.perf_counter() - start


def run_one(args: argparse.Namespace) -> dict:
    """One method at one class count and batch size, in this (child) process."""
    import torch

    from protext.tta import view_maker
    from protext.tta.tpt import image_generator
    from protext.tta.views import model_preprocess_cfg

    clip, classnames = random_vit_and_classes(args.device, args.threads, args.n_classes, SHARED)
    config, adapter, setup = _adapter(args, clip, classnames)
    maker = view_maker(config, DATASET[args.n_classes], model_preprocess_cfg(clip.model))
    views = [maker(image, image_generator(0, i)) for i, image in enumerate(synthetic_images(args.images))]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    encode, total = 0.0, 0.0
    groups = [views[i : i + args.batch] for i in range(0, len(views), args.batch)]
    top1 = []
    for group in groups:
        start = time.perf_counter()
        results = adapter.adapt_batch(group) if args.batch > 1 else [adapter.adapt(group[0])]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total += time.perf_counter() - start
        encode += sum(r.timings.get("images", 0.0) for r in results)
        top1 += [int(r.logits.argmax()) for r in results]
    n = len(views)
    return {
        "method": args.method, "classes": args.n_classes, "batch": args.batch, "views": maker.n_views,
        "images": n, "seconds_per_image": total / n, "image_seconds_per_image": encode / n,
        "rest_seconds_per_image": (total - encode) / n, "setup_seconds": setup,
        "peak_gib": peak_gib(args.device), "top1": top1, "threads": torch.get_num_threads(),
    }


def _child(args: argparse.Namespace, method: str, n_classes: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--method", method, "--n-classes", str(n_classes), "--batch", str(batch),
           "--images", str(args.images), "--device", args.device, "--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {method:6s} {n_classes:5d} classes, batch {batch} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} ({n_classes} classes, batch {batch}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench]   {result['seconds_per_image']:.2f} s/image, peak {result['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return result


def _row(r: dict, reference: dict) -> str:
    cells = [
        str(r["classes"]), r["method"] + (f" (batch {r['batch']})" if r["batch"] > 1 else ""), str(r["views"]),
        f"{r['seconds_per_image']:.2f}", f"{r['image_seconds_per_image']:.2f}", f"{r['rest_seconds_per_image']:.2f}",
        f"{r['setup_seconds']:.1f}", f"{r['peak_gib']:.2f}", f"{r['seconds_per_image'] / reference['seconds_per_image']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def drive(args: argparse.Namespace) -> int:
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        import torch

        from protext.amp import fp16_note

        print(f"[bench] note: {fp16_note(torch.device(args.device))}", file=sys.stderr, flush=True)
    head = ["classes", "method", "views", "s / image", "image encoding s", "rest s", "setup s", "peak GiB", "× TPT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    results = []
    for n_classes in args.classes:
        rows = {m: _child(args, m, n_classes, 1) for m in args.methods}
        reference = rows.get("tpt") or _child(args, "tpt", n_classes, 1)
        lines += [_row(rows[m], reference) for m in args.methods]
        results += list(rows.values())
        if args.batch > 1:
            for m in (m for m in args.methods if m in EPISODIC):
                if m in ("tpt", "ctpt") and args.precision == "fp16":
                    continue  # --tta-batch with fp16 is refused for TPT/C-TPT
                batched = _child(args, m, n_classes, args.batch)
                same = sum(a == b for a, b in zip(batched["top1"], rows[m]["top1"]))
                lines.append(_row(batched, reference) + f" top-1 = batch 1: {same}/{len(batched['top1'])}")
                results.append(batched)
    print("\n".join(lines))
    threads = results[0]["threads"] if results else "?"
    print(f"\nViT-B-16 (random weights), device {args.device} ({args.precision}), {threads} threads, {args.images} image(s) per row.")
    print(machine_line(args.device))
    print("command: python benchmarks/bench_tta.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"table": lines, "runs": results, "argv": sys.argv[1:],
                                              "machine": machine_record()}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[47, 1000], choices=sorted(CLASS_FILES), help="Class counts to measure.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Methods to time (TPT is always run as the reference).")
    parser.add_argument("--images", type=int, default=3, help="Test images timed per row.")
    parser.add_argument("--batch", type=int, default=4, help="--tta-batch size for the throughput rows of the episodic methods (1: skip them).")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="fp16: autocast (and TPT's gradient scaler), as published on CUDA; on a CPU the same path runs emulated (slow: it checks the arithmetic, not speed).")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", default=None, help="Also write every run's figures to this JSON file.")
    parser.add_argument("--method", default=None, choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--n-classes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
