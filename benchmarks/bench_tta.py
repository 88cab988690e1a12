"""Cost per test image of every TTA method, with fast TPT as the reference, in one run.

Random ViT-B-16 weights (speed and memory do not depend on the values), 47 classes (DTD's names)
and 1000 classes (ImageNet's), each method's own views for that dataset as the registry resolves
them for ``dtd`` and ``imagenet`` (64; DMN-ZS 32; TDA 1, plus a ``tda-64`` row with the
natural-shift setting; DPE and BoostAdapter 1 or 64, with their published per-dataset settings).
Every (method, classes, batch) runs in its own subprocess so that its peak memory (``ru_maxrss``;
``max_memory_allocated`` on CUDA) is its own. Seconds per image are split into image encoding and
the rest: for the methods that read view features (ZERO, TDA, MTA, DMN-ZS, DPE, BoostAdapter, TPS)
the rest is ``adapt_features`` on the encoded views, for the prompt tuners (TPT, C-TPT, O-TPT) their
whole step less its ``images`` timing; ``rest × TPT`` compares that rest with TPT's. Class features
and TPT's initial text features are a one-time setup, reported apart. ``--batch B`` adds
``--tta-batch B`` throughput for the episodic methods.

The multi-method pass (``eval --tta zero,tda,mta,dmn,boost``) is timed against running those
methods one after another, on the same images in the same subprocess: shared, each image's views
are encoded once per distinct view recipe and every method is fed those features; one by one,
each method encodes its own views. The views themselves are made before either is timed.

    python benchmarks/bench_tta.py                               # the full table (slow on a CPU)
    python benchmarks/bench_tta.py --images 2 --classes 47 --batch 2
    python benchmarks/bench_tta.py --quick --out /tmp/tta.json   # CI-sized: the machinery, not the speed
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
"""The first five methods (and TDA's 64-view setting)."""
NEWER = ("otpt", "dmn", "dmn-oracle", "dpe", "boost", "tps")
"""Issue 19's methods: O-TPT, DMN-ZS (fixed β₂, and the oracle variant), DPE, BoostAdapter, TPS."""
ALL_METHODS = METHODS + NEWER
"""Every method; ``benchmarks/device_check.py`` times these."""
EPISODIC = ("tpt", "ctpt", "otpt", "zero", "mta", "tps")
SHARED_PASS = ("zero", "tda", "mta", "dmn", "boost")
"""The backprop-free methods the multi-method pass feeds from one encoding of each image's views."""
QUICK_MODEL, QUICK_VIEWS = "tiny-clip", 8
"""``--quick``: protext's tiny test model and at most 8 views (MTA needs 1 or at least 5)."""


def _config(row: str, n_classes: int, batch: int, fp16: bool, max_views: int = 0):
    """The TTA config of a table row (``tda-64`` is TDA with 64 views), views capped at ``max_views``."""
    from protext.tta import TTAConfig

    method = "tda" if row == "tda-64" else row
    views = 64 if row == "tda-64" else None
    if max_views:
        published = TTAConfig(method=method, views=views).settings(DATASET[n_classes]).views
        views = min(published, max_views)
    return TTAConfig(method=method, views=views, batch=batch, fp16=fp16)


def _model_and_classes(args):
    """The random-weight model (ViT-B-16 unless ``--model``) and the real class list of ``n_classes``."""
    model = getattr(args, "model", "ViT-B-16")
    if model == "ViT-B-16":
        return random_vit_and_classes(args.device, args.threads, args.n_classes, SHARED)
    import warnings

    import torch

    from protext.models import load_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(model, "random", device=args.device)
    return clip, json.loads((SHARED / "classnames" / CLASS_FILES[args.n_classes]).read_text())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _adapter(args, clip, classnames):
    """(TTA config, adapter, one-time setup seconds) for ``args.method``."""
    from protext.checkpoint import class_encoder
    from protext.tta import build_adapter, registry
    from protext.zeroshot import clip_text_features

    fp16 = args.precision == "fp16"  # on a CPU the same (emulated) path as on CUDA, said once by drive()
    config = _config(args.method, args.n_classes, args.batch, fp16, getattr(args, "max_views", 0))
    dataset = DATASET[args.n_classes]
    start = time.perf_counter()
    if registry.get(config.method).tunes_prompts:
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

    from protext.tta import FeatureAdapter, view_maker
    from protext.tta.tpt import image_generator
    from protext.tta.views import model_preprocess_cfg

    clip, classnames = _model_and_classes(args)
    config, adapter, setup = _adapter(args, clip, classnames)
    maker = view_maker(config, DATASET[args.n_classes], model_preprocess_cfg(clip.model))
    views = [maker(image, image_generator(0, i)) for i, image in enumerate(synthetic_images(args.images))]
    _sync(args.device)
    encode, rest = 0.0, 0.0
    groups = [views[i : i + args.batch] for i in range(0, len(views), args.batch)]
    top1 = []
    for group in groups:
        if args.batch == 1 and isinstance(adapter, FeatureAdapter):
            # what the method costs beyond its image encoding: adapt_features on the encoded views
            start = time.perf_counter()
            features = adapter.image_encoder(group[0])
            _sync(args.device)
            encoded = time.perf_counter()
            results = [adapter.adapt_features(features)]
            _sync(args.device)
            encode += encoded - start
            rest += time.perf_counter() - encoded
        else:
            start = time.perf_counter()
            results = adapter.adapt_batch(group) if args.batch > 1 else [adapter.adapt(group[0])]
            _sync(args.device)
            images = sum(r.timings.get("images", 0.0) for r in results)
            encode += images
            rest += time.perf_counter() - start - images
        top1 += [int(r.logits.argmax()) for r in results]
    n = len(views)
    return {
        "method": args.method, "classes": args.n_classes, "batch": args.batch, "views": maker.n_views,
        "images": n, "seconds_per_image": (encode + rest) / n, "image_seconds_per_image": encode / n,
        "rest_seconds_per_image": rest / n, "setup_seconds": setup,
        "peak_gib": peak_gib(args.device), "top1": top1, "threads": torch.get_num_threads(),
    }


def run_shared(args: argparse.Namespace) -> dict:
    """The multi-method pass against the same methods one by one, on the same images, in this (child) process.

    One by one, each method of :data:`SHARED_PASS` adapts to every image from its own views
    (``adapt``: it encodes them). Shared, each image's views are encoded once per distinct view recipe
    and every method with that recipe is fed the features (``adapt_features``), as ``eval --tta
    zero,tda,mta,dmn,boost`` does. Each pass starts from fresh adapters (TDA, DMN-ZS and BoostAdapter
    carry state along the stream), so both do the same adaptation work; the predictions are compared.
    """
    import torch

    from protext.tta import build_adapter, registry
    from protext.tta.api import views_for_recipe
    from protext.tta.tpt import image_generator
    from protext.tta.views import model_preprocess_cfg
    from protext.zeroshot import clip_text_features

    clip, classnames = _model_and_classes(args)
    dataset = DATASET[args.n_classes]
    fp16 = args.precision == "fp16"
    configs = {m: _config(m, args.n_classes, 1, fp16, getattr(args, "max_views", 0)) for m in SHARED_PASS}
    recipes = {m: registry.get(m).views(configs[m].settings(dataset)) for m in SHARED_PASS}
    distinct = list(dict.fromkeys(recipes.values()))
    start = time.perf_counter()
    text = clip_text_features(clip.model, clip.tokenizer, classnames, "a photo of a {}.")
    setup = time.perf_counter() - start
    images = synthetic_images(args.images)
    preprocess = model_preprocess_cfg(clip.model)
    views = {r: [views_for_recipe(r, preprocess)(image, image_generator(0, i)) for i, image in enumerate(images)]
             for r in distinct}

    def fresh() -> dict:
        return {m: build_adapter(configs[m], clip.model, dataset, text_features=text) for m in SHARED_PASS}

    alone, shared = fresh(), fresh()
    encoder = shared[SHARED_PASS[0]].image_encoder  # every adapter's encoder: the same model and dtype
    for recipe in distinct:  # warm-up, untimed, so that neither pass pays a first call at these sizes
        encoder(views[recipe][0])
    _sync(args.device)

    logits_alone: dict[str, list] = {m: [] for m in SHARED_PASS}
    start = time.perf_counter()
    for m, adapter in alone.items():
        for image_views in views[recipes[m]]:
            logits_alone[m].append(adapter.adapt(image_views).logits)
    _sync(args.device)
    one_by_one = time.perf_counter() - start

    logits_shared: dict[str, list] = {m: [] for m in SHARED_PASS}
    start = time.perf_counter()
    for i in range(len(images)):
        for recipe in distinct:
            features = encoder(views[recipe][i])
            for m in (m for m in SHARED_PASS if recipes[m] == recipe):
                logits_shared[m].append(shared[m].adapt_features(features).logits)
    _sync(args.device)
    together = time.perf_counter() - start

    n = len(images)
    same = sum(torch.equal(a, b) for m in SHARED_PASS for a, b in zip(logits_alone[m], logits_shared[m]))
    return {
        "method": "shared", "classes": args.n_classes, "images": n, "methods": list(SHARED_PASS),
        "recipes": [{"views": r.views, "augmix": r.augmix, "crop_scale": list(r.crop_scale),
                     "methods": [m for m in SHARED_PASS if recipes[m] == r]} for r in distinct],
        "views_encoded_shared": sum(r.views for r in distinct),
        "views_encoded_one_by_one": sum(recipes[m].views for m in SHARED_PASS),
        "shared_seconds_per_image": together / n, "one_by_one_seconds_per_image": one_by_one / n,
        "one_by_one_over_shared": one_by_one / together, "same_logits": same, "compared": n * len(SHARED_PASS),
        "setup_seconds": setup, "peak_gib": peak_gib(args.device), "threads": torch.get_num_threads(),
    }


def _child(args: argparse.Namespace, method: str, n_classes: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--method", method, "--n-classes", str(n_classes), "--batch", str(batch),
           "--images", str(args.images), "--device", args.device, "--precision", args.precision,
           "--model", args.model, "--max-views", str(args.max_views)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {method:10s} {n_classes:5d} classes, batch {batch} ...", file=sys.stderr, flush=True)
    if args.quick:  # CI-sized: every row in this process (a row's peak memory is then the running peak)
        row = argparse.Namespace(**{**vars(args), "method": method, "n_classes": n_classes, "batch": batch})
        result = run_shared(row) if method == "shared" else run_one(row)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} ({n_classes} classes, batch {batch}) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    if method == "shared":
        print(f"[bench]   {result['shared_seconds_per_image']:.2f} s/image shared, "
              f"{result['one_by_one_seconds_per_image']:.2f} one by one", file=sys.stderr, flush=True)
    else:
        print(f"[bench]   {result['seconds_per_image']:.2f} s/image, peak {result['peak_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def _row(r: dict, reference: dict) -> str:
    cells = [
        str(r["classes"]), r["method"] + (f" (batch {r['batch']})" if r["batch"] > 1 else ""), str(r["views"]),
        f"{r['seconds_per_image']:.2f}", f"{r['image_seconds_per_image']:.2f}", f"{r['rest_seconds_per_image']:.3f}",
        _ratio(r["rest_seconds_per_image"], reference["rest_seconds_per_image"]),
        f"{r['setup_seconds']:.1f}", f"{r['peak_gib']:.2f}", _ratio(r["seconds_per_image"], reference["seconds_per_image"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _shared_row(r: dict) -> str:
    recipes = "; ".join(f"{'+'.join(x['methods'])}: {x['views']}" for x in r["recipes"])
    cells = [
        str(r["classes"]), recipes, f"{r['views_encoded_shared']} / {r['views_encoded_one_by_one']}",
        f"{r['shared_seconds_per_image']:.2f}", f"{r['one_by_one_seconds_per_image']:.2f}",
        f"{r['one_by_one_over_shared']:.2f}", f"{r['same_logits']}/{r['compared']}",
    ]
    return "| " + " | ".join(cells) + " |"


def drive(args: argparse.Namespace) -> int:
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        import torch

        from protext.amp import fp16_note

        print(f"[bench] note: {fp16_note(torch.device(args.device))}", file=sys.stderr, flush=True)
    head = ["classes", "method", "views", "s / image", "image encoding s", "rest s", "rest × TPT", "setup s",
            "peak GiB", "× TPT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shared_head = ["classes", "views per recipe", "views encoded: shared / one by one", "shared s / image",
                   "one by one s / image", "one by one ÷ shared", "same logits"]
    shared_lines = ["| " + " | ".join(shared_head) + " |", "|" + "---|" * len(shared_head)]
    results, shared = [], []
    for n_classes in args.classes:
        rows = {m: _child(args, m, n_classes, 1) for m in args.methods}
        reference = rows.get("tpt") or _child(args, "tpt", n_classes, 1)
        lines += [_row(rows[m], reference) for m in args.methods]
        results += list(rows.values())
        if args.batch > 1:
            for m in (m for m in args.methods if m in EPISODIC):
                if m in ("tpt", "ctpt", "otpt") and args.precision == "fp16":
                    continue  # --tta-batch with fp16 is refused for the prompt tuners
                batched = _child(args, m, n_classes, args.batch)
                same = sum(a == b for a, b in zip(batched["top1"], rows[m]["top1"]))
                lines.append(_row(batched, reference) + f" top-1 = batch 1: {same}/{len(batched['top1'])}")
                results.append(batched)
        if not args.no_shared_pass:
            shared.append(_child(args, "shared", n_classes, 1))
            shared_lines.append(_shared_row(shared[-1]))
    print("\n".join(lines))
    if shared:
        print(f"\nThe multi-method pass ({', '.join(SHARED_PASS)}): views encoded once per recipe, against each method "
              "encoding its own (same images, same run; views made beforehand):\n")
        print("\n".join(shared_lines))
    threads = (results or shared)[0]["threads"] if results or shared else "?"
    print(f"\n{args.model} (random weights), device {args.device} ({args.precision}), {threads} threads, "
          f"{args.images} image(s) per row.")
    if args.max_views:
        print(f"Views capped at {args.max_views}" + (" (--quick: the tiny model checks the machinery; its seconds "
                                                    "say nothing about ViT-B/16)." if args.quick else "."))
    machine = machine_line(args.device)
    print(machine)
    print("command: python benchmarks/bench_tta.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"table": lines, "shared_table": shared_lines, "runs": results,
                                              "shared": shared, "argv": sys.argv[1:], "machine_line": machine,
                                              "machine": machine_record()}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=None, choices=sorted(CLASS_FILES), help="Class counts to measure (default: 47 and 1000; 47 with --quick).")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS, help="Methods to time (TPT is always run as the reference).")
    parser.add_argument("--images", type=int, default=3, help="Test images timed per row.")
    parser.add_argument("--batch", type=int, default=4, help="--tta-batch size for the throughput rows of the episodic methods (1: skip them).")
    parser.add_argument("--no-shared-pass", action="store_true", help=f"Skip the multi-method pass ({', '.join(SHARED_PASS)}) against one by one.")
    parser.add_argument("--quick", action="store_true", help=f"CI-sized: {QUICK_MODEL} (random), at most {QUICK_VIEWS} views, 1 image, no batch rows, every row in this process; checks the machinery, not the speed.")
    parser.add_argument("--model", default="ViT-B-16", choices=["ViT-B-16", QUICK_MODEL], help="Random-weight architecture.")
    parser.add_argument("--max-views", type=int, default=0, help="Cap every method's views (0: the published counts).")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="fp16: autocast (and TPT's gradient scaler), as published on CUDA; on a CPU the same path runs emulated (slow: it checks the arithmetic, not speed).")
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--out", default=None, help="Also write every run's figures and the machine line to this JSON file.")
    parser.add_argument("--method", default=None, choices=ALL_METHODS + ("shared",), help=argparse.SUPPRESS)
    parser.add_argument("--n-classes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.max_views, args.images, args.batch = QUICK_MODEL, args.max_views or QUICK_VIEWS, 1, 1
    if args.classes is None:
        args.classes = [47] if args.quick else [47, 1000]
    if args.method:
        print(json.dumps(run_shared(args) if args.method == "shared" else run_one(args)))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
