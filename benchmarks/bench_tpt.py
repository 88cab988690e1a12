"""TPT cost per test image: the fast path against the naive (published-style) path, in one run.

Random ViT-B-16 weights (speed and memory do not depend on the values), 47 classes (DTD) and
1000 classes (ImageNet), 64 views per image. Every phase runs in its own subprocess so that its
peak memory (``ru_maxrss``, or ``torch.cuda.max_memory_allocated`` on CUDA) is its own.

    python benchmarks/bench_tpt.py                      # fp32, 47 and 1000 classes
    python benchmarks/bench_tpt.py --precision bf16     # adds bf16 image encoding: speed-up, top-1 agreement

What differs between the paths (ALGORITHMS.md §5 is the same):

* fast: views encoded once without gradient, view 0's feature reused for the prediction; class
  prompts batched by length, each batch cut at its longest end-of-text token, the shared prompt
  prefix run once; the first step's text features are the cached features at the initialisation;
  the gradient is taken one batch of classes at a time (bounded memory);
* naive: views re-encoded at every step and view 0 again at prediction; all 77 token positions;
  all classes in one autograd graph. At 1000 classes that graph needs ~26 GB on the CPU, so above
  ``--naive-class-chunk`` classes the naive path takes its gradient in two passes (an extra text
  forward without gradient, then the graph one chunk at a time). The table's speed-up is computed
  against the naive time *without* that extra pass — the time a one-graph run would take — which
  favours the naive path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import CLASS_FILES, machine_line, machine_record, peak_gib, random_vit_and_classes, synthetic_images, warn_emulated_bf16

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

VIEW_STYLE = {47: "dtd", 1000: "imagenet"}  # AugMix for the fine-grained set, crops only for ImageNet


# --------------------------------------------------------------------------------------------------
# one phase, in a child process


def run_phase(args: argparse.Namespace) -> dict:
    import torch

    from protext.checkpoint import class_encoder
    from protext.tta.tpt import image_generator
    from tests.reference.tpt_reference import PromptTuner, TPTConfig  # fast (production) or naive (reference)
    from protext.tta.views import view_transform_for

    clip, classnames = random_vit_and_classes(args.device, args.threads, args.n_classes, SHARED)
    encoder = class_encoder(clip.model, clip.tokenizer, classnames, "a photo of a {}.")
    naive = args.phase == "naive"
    chunk = args.naive_class_chunk if naive and args.n_classes > args.naive_class_chunk else None
    config = TPTConfig(
        n_views=args.views,
        naive=naive,
        naive_class_chunk=chunk,
        image_dtype=torch.bfloat16 if args.phase == "fast-bf16" else None,
        amp=args.device.startswith("cuda") and args.phase != "fast-bf16",
    )
    tuner = PromptTuner(clip.model, encoder, config)
    rss_loaded = peak_gib(args.device)

    views = view_transform_for(VIEW_STYLE[args.n_classes], n_views=args.views, resolution=224)
    start = time.perf_counter()
    batches = [views(image, generator=image_generator(0, i)) for i, image in enumerate(synthetic_images(args.images))]
    view_seconds = (time.perf_counter() - start) / args.images

    setup = 0.0
    if not naive:  # one-time: the class features at the initialisation, shared by every image
        start = time.perf_counter()
        tuner.initial_text_features()
        setup = time.perf_counter() - start

    seconds, extra, top1, logits = [], [], [], []
    phases: dict[str, float] = {}
    for batch in batches:
        start = time.perf_counter()
        out = tuner.adapt(batch)
        seconds.append(time.perf_counter() - start)
        for name, value in out.timings.items():
            phases[name] = phases.get(name, 0.0) + value / len(batches)
        extra.append(out.timings.get("text", 0.0) if chunk else 0.0)  # the naive path's extra pass
        top1.append(int(out.logits.argmax()))
        logits.append(out.logits.tolist())
    return {
        "phase": args.phase,
        "classes": args.n_classes,
        "images": args.images,
        "views": args.views,
        "seconds_per_image": sum(seconds) / len(seconds),
        "seconds": seconds,
        "phase_seconds_per_image": phases,
        "extra_pass_seconds_per_image": sum(extra) / len(extra),
        "setup_seconds": setup,
        "view_seconds_per_image": view_seconds,
        "naive_class_chunk": chunk,
        "peak_gib": peak_gib(args.device),
        "loaded_gib": rss_loaded,
        "top1": top1,
        "logits": logits,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# the driver


def _child(args: argparse.Namespace, phase: str, n_classes: int, images: int) -> dict:
    cmd = [
        sys.executable, __file__, "--phase", phase, "--n-classes", str(n_classes), "--images", str(images),
        "--views", str(args.views), "--device", args.device, "--naive-class-chunk", str(args.naive_class_chunk),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {phase:9s} {n_classes:5d} classes, {images} image(s) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} ({n_classes} classes) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench]   {result['seconds_per_image']:.1f} s/image, peak {result['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return result


def _table(rows: list[dict]) -> str:
    head = ["classes", "path", "s / image", "image encoding s", "text s", "one-time setup s", "peak GiB", "speed-up vs naive", "top-1 = fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(h, "")) for h in head) + " |")
    return "\n".join(lines)


def _split(result: dict) -> dict:
    """Per-image seconds in image encoding and in the text tower (tuning step + prediction)."""
    t = result["phase_seconds_per_image"]
    # the naive path's memory-saving extra pass is left out, as in the speed-up
    text = t.get("text", 0.0) + t.get("step", 0.0) + t.get("predict", 0.0) - result["extra_pass_seconds_per_image"]
    images = t.get("images", 0.0)
    if result["phase"] == "naive":  # its prediction re-encodes view 0; count it as image time
        view0 = images / max(1, result["views"])
        images, text = images + view0, text - view0
    return {"image encoding s": f"{images:.1f}", "text s": f"{text:.1f}"}


def drive(args: argparse.Namespace) -> int:
    warn_emulated_bf16(args.precision if args.device == "cpu" else "fp32")
    results: list[dict] = []
    rows: list[dict] = []
    for n_classes in args.classes:
        fast = _child(args, "fast", n_classes, args.images)
        naive = _child(args, "naive", n_classes, args.naive_images)
        naive_one_graph = naive["seconds_per_image"] - naive["extra_pass_seconds_per_image"]
        ratio = naive_one_graph / fast["seconds_per_image"]
        results += [fast, naive]
        rows.append({
            "classes": n_classes, "path": "fast (fp32)", "s / image": f"{fast['seconds_per_image']:.1f}", **_split(fast),
            "one-time setup s": f"{fast['setup_seconds']:.1f}",
            "peak GiB": f"{fast['peak_gib']:.2f}", "speed-up vs naive": f"**{ratio:.1f}×**",
        })
        label = "naive (fp32)" if naive["naive_class_chunk"] is None else f"naive (fp32, {naive['naive_class_chunk']}-class graphs)"
        timing = f"{naive['seconds_per_image']:.1f}"
        if naive["naive_class_chunk"] is not None:
            timing += f" ({naive_one_graph:.1f} without the extra pass)"
        rows.append({
            "classes": n_classes, "path": label, "s / image": timing, **_split(naive), "one-time setup s": "0",
            "peak GiB": f"{naive['peak_gib']:.2f}",
            "speed-up vs naive": "1×",
        })
        print(f"[bench] {n_classes} classes: fast {fast['seconds_per_image']:.1f} s, naive {naive_one_graph:.1f} s -> {ratio:.1f}x", file=sys.stderr)
        if args.precision == "bf16":
            bf16 = _child(args, "fast-bf16", n_classes, args.images)
            results.append(bf16)
            agree = sum(a == b for a, b in zip(bf16["top1"], fast["top1"]))
            drift = max(abs(x - y) for r, q in zip(bf16["logits"], fast["logits"]) for x, y in zip(r, q))
            rows.append({
                "classes": n_classes, "path": "fast, bf16 image encoding", "s / image": f"{bf16['seconds_per_image']:.1f}",
                **_split(bf16), "one-time setup s": f"{bf16['setup_seconds']:.1f}",
                "peak GiB": f"{bf16['peak_gib']:.2f}",
                "speed-up vs naive": f"{naive_one_graph / bf16['seconds_per_image']:.1f}× ({fast['seconds_per_image'] / bf16['seconds_per_image']:.2f}× vs fp32 fast)",
                "top-1 = fp32": f"{agree}/{len(fast['top1'])} (max |Δlogit| {drift:.3f})",
            })
    print(_table(rows))
    device = results[0] if results else {}
    print(f"\nViT-B-16 (random weights), {args.views} views, 1 step, device {args.device}, "
          f"{device.get('threads', '?')} threads; fast over {args.images} image(s), naive over {args.naive_images}.")
    print(machine_line(args.device))
    print("command: python benchmarks/bench_tpt.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "phases": results, "argv": sys.argv[1:],
                                              "machine": machine_record()}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[47, 1000], choices=sorted(CLASS_FILES), help="Class counts to measure.")
    parser.add_argument("--images", type=int, default=3, help="Test images timed on the fast path (and bf16).")
    parser.add_argument("--naive-images", type=int, default=2, help="Test images timed on the naive path.")
    parser.add_argument("--views", type=int, default=64, help="Views per image.")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: also time the fast path with bf16 image encoding and compare its top-1 with fp32.")
    parser.add_argument("--naive-class-chunk", type=int, default=250, help="Above this many classes the naive path splits its autograd graph (memory); the extra pass is reported and left out of the speed-up.")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", default=None, help="Also write every phase's figures to this JSON file.")
    parser.add_argument("--phase", default=None, choices=["fast", "naive", "fast-bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--n-classes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
