"""GFLOPs and seconds per test image of every method side by side (issue 17 item 3).

Random ViT-B-16 weights (FLOPs and speed do not depend on the values), DTD's 47 class names (or
ImageNet's 1000), each method's own published views for that dataset. Every method runs in its own
subprocess (its peak memory is its own) and twice:

* **counted**: a fresh adapter built under :class:`protext.evaluation.cost.CostMeter` (the class
  features or prompt encoder counted as once-per-run work) and its first image counted part by part
  on the real calls, exactly as ``eval`` counts them; the figures are the ``timing.flops`` block a
  result carries (:func:`protext.evaluation.cost.flops_record`);
* **timed**: another fresh adapter over ``--images`` images, without the counter (whose Python
  overhead on every operator would inflate the seconds); setup seconds apart.

GFLOPs per image here are the per-image work (the once-per-run work is a column of its own: divided
by a real dataset's size it is small). Ratios to zero-shot are printed, never asserted.

    python benchmarks/bench_cost.py                        # every method, 47 classes, 2 images
    python benchmarks/bench_cost.py --methods zero-shot tpt tda --images 1 --out cost.json
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
ZERO_SHOT = "zero-shot"
TEMPLATE = "a photo of a {}."


def available_methods() -> list[str]:
    """Zero-shot and every method whose module exists in ``protext/tta`` (dmn-oracle runs dmn's stream)."""
    from protext.tta import registry

    return [ZERO_SHOT] + [name for name in registry.names() if name != "dmn-oracle"]


def _build(method: str, clip, classnames: list[str], dataset: str, meter=None):
    """The callable that takes one image's views and returns its top-1 (zero-shot: one view), and the
    TTA config (None for zero-shot). With ``meter``, the setup is counted as once-per-run work."""
    import torch

    from protext.checkpoint import class_encoder
    from protext.tta import TTAConfig, build_adapter, registry
    from protext.zeroshot import ImageEncoder, clip_text_features, logit_scale, zeroshot_logits

    def once(fn, *args, **kwargs):
        return meter.once(fn, *args, **kwargs) if meter is not None else fn(*args, **kwargs)

    if method == ZERO_SHOT:
        text = once(clip_text_features, clip.model, clip.tokenizer, classnames, TEMPLATE)
        encoder, scale = ImageEncoder(clip.model), logit_scale(clip.model)

        def predict(views: torch.Tensor) -> list[int]:
            return zeroshot_logits(encoder(views[:1]), text, scale).argmax(-1).tolist()

        return predict, None
    config = TTAConfig(method=method)
    if registry.get(method).tunes_prompts:
        encoder = class_encoder(clip.model, clip.tokenizer, classnames, TEMPLATE)
        adapter = once(build_adapter, config, clip.model, dataset, encoder=encoder)
        if meter is None:  # timed: the initial text features are setup, as in bench_tta (counted: the first image's once)
            getattr(adapter, "tuner", adapter).initial_text_features()
    else:
        features = once(clip_text_features, clip.model, clip.tokenizer, classnames, TEMPLATE)
        adapter = once(build_adapter, config, clip.model, dataset, text_features=features)

    def predict(views: torch.Tensor) -> list[int]:
        return [int(adapter.adapt(views).logits.argmax())]

    return predict, config


def run_one(args: argparse.Namespace) -> dict:
    """One method, in this (child) process: counted on its first image, then timed."""
    import torch

    from protext.evaluation.cost import CostMeter, flops_record
    from protext.tta import view_maker
    from protext.tta.tpt import image_generator
    from protext.tta.views import model_preprocess_cfg

    clip, classnames = random_vit_and_classes(args.device, args.threads, args.n_classes, SHARED)
    dataset = DATASET[args.n_classes]
    images = synthetic_images(args.images)
    cuda = args.device.startswith("cuda")

    meter = CostMeter()
    counted, config = _build(args.method, clip, classnames, dataset, meter)
    if config is None:  # zero-shot reads the image itself: the model's own preprocessing
        all_views = [clip.preprocess(image)[None] for image in images]
    else:
        maker = view_maker(config, dataset, model_preprocess_cfg(clip.model))
        all_views = [maker(image, image_generator(0, i)) for i, image in enumerate(images)]
    all_views = [v.to(args.device) for v in all_views]
    meter.batch(counted, all_views[0])
    flops = flops_record([meter.sample], 1, clip.model, "ViT-B-16")

    start = time.perf_counter()
    timed, _ = _build(args.method, clip, classnames, dataset)
    if cuda:
        torch.cuda.synchronize()
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for views in all_views:
        timed(views)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(all_views)
    per_image = flops["per_image"]
    return {
        "method": args.method, "classes": args.n_classes, "dataset": dataset, "views": int(all_views[0].shape[0]),
        "gflops_per_image": sum(per_image.values()), "gflops_parts": per_image,
        "once_gflops": sum(flops["once_per_run"].values()), "seconds_per_image": seconds, "setup_seconds": setup,
        "images": len(all_views), "peak_gib": peak_gib(args.device), "threads": torch.get_num_threads(),
        "flops": flops,
    }


def _child(args: argparse.Namespace, method: str, n_classes: int) -> dict:
    cmd = [sys.executable, __file__, "--method", method, "--n-classes", str(n_classes), "--images", str(args.images),
           "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {method:9s} {n_classes:5d} classes ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} ({n_classes} classes) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench]   {result['gflops_per_image']:.1f} GFLOPs, {result['seconds_per_image']:.2f} s per image",
          file=sys.stderr, flush=True)
    return result


def _row(r: dict, reference: dict) -> str:
    parts = r["gflops_parts"]
    text = parts["text_forward"] + parts["text_backward"]
    arithmetic = parts["method"] + parts["method_backward"]
    cells = [
        str(r["classes"]), r["method"], str(r["views"]), f"{r['gflops_per_image']:.1f}", f"{parts['image_tower']:.1f}",
        f"{text:.1f}", f"{arithmetic:.4f}", f"{r['once_gflops']:.1f}", f"{r['seconds_per_image']:.2f}",
        f"{r['setup_seconds']:.1f}", f"{r['peak_gib']:.2f}",
        f"{r['gflops_per_image'] / reference['gflops_per_image']:.1f}",
        f"{r['seconds_per_image'] / reference['seconds_per_image']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def drive(args: argparse.Namespace) -> int:
    head = ["classes", "method", "views", "GFLOPs / image", "image tower", "text fwd+bwd", "method arithmetic",
            "once GFLOPs", "s / image", "setup s", "peak GiB", "GFLOPs × zero-shot", "s × zero-shot"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    results = []
    for n_classes in args.classes:
        rows = {m: _child(args, m, n_classes) for m in args.methods}
        reference = rows.get(ZERO_SHOT) or _child(args, ZERO_SHOT, n_classes)
        lines += [_row(rows[m], reference) for m in args.methods]
        results += list(rows.values())
    print("\n".join(lines))
    threads = results[0]["threads"] if results else "?"
    check = results[0]["flops"]["image_tower_check"] if results else {}
    print(f"\nViT-B-16 (random weights), device {args.device} (fp32), {threads} threads, {args.images} image(s) timed per row; "
          "GFLOPs counted on each method's first image (2 FLOPs per multiply-add); 'once' = class features / "
          "initial prompts, reused for every image.")
    if check:
        print(f"image tower, one view: {check['gflops_per_view']:.4f} GFLOPs counted, {check['published_gflops']} published "
              f"(open_clip profile), difference {100 * check['relative_difference']:+.3f} %")
    print(machine_line(args.device))
    print("command: python benchmarks/bench_cost.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"table": lines, "runs": results, "argv": sys.argv[1:],
                                              "machine": machine_record(), "machine_line": machine_line(args.device)},
                                             indent=1))
    return 0


def main(argv=None) -> int:
    methods = available_methods()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[47], choices=sorted(CLASS_FILES), help="Class counts to measure.")
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods, help="Methods to measure (zero-shot is always run as the reference).")
    parser.add_argument("--images", type=int, default=2, help="Test images timed per row.")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", default=None, help="Also write every run's figures (and each result-style flops block) to this JSON file.")
    parser.add_argument("--method", default=None, choices=methods, help=argparse.SUPPRESS)
    parser.add_argument("--n-classes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
