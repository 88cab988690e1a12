"""The whole pipeline on a small built-in example: descriptions -> train -> eval with and without TPT.

The example is twelve real photos that ship with scikit-image (astronaut, cat, coffee, rocket, …),
one class each. Every stage runs through its own CLI, exactly as a user would call it, and the
results of the four methods are printed side by side:

    python -m protext.quickstart                       # real ViT-B/16 weights (needs internet once)
    python -m protext.quickstart --pretrained random   # offline smoke run, a few minutes on a CPU
    python -m protext.quickstart --pretrained /data/ViT-B-16.pt

With random weights the accuracies are chance-level: the run shows that every stage works, not
what the prompts are worth. Descriptions come from the offline template backend unless
``--llm-model`` names a model on an OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

EXAMPLE_PHOTOS: dict[str, str] = {
    # class name -> skimage.data function; one real photograph per class
    "astronaut": "astronaut",
    "cat": "chelsea",
    "cup_of_coffee": "coffee",
    "rocket": "rocket",
    "brick_wall": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "clock": "clock",
    "coins": "coins",
    "moon": "moon",
    "galaxy": "hubble_deep_field",
    "horse": "horse",
}


@dataclass
class QuickstartConfig:
    """Settings of the example run (see ``--help``)."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    workdir: Path = Path("quickstart")
    device: str = "auto"
    epochs: int = 10
    depth: Optional[int] = None
    tpt_views: int = 64
    llm_model: Optional[str] = None
    llm_base_url: Optional[str] = None
    seed: int = 0


def write_example_images(root: Path) -> list[str]:
    """Save the example photos as ``root/<class>/<function>.png``; returns the class names."""
    try:
        import numpy as np
        import skimage.data
        from PIL import Image
    except ImportError:
        raise SystemExit(
            "quickstart: the example photos come from scikit-image: pip install scikit-image "
            "(it is in protext's 'dev' and 'example' extras)."
        ) from None
    for classname, function in EXAMPLE_PHOTOS.items():
        folder = root / classname
        target = folder / f"{function}.png"
        if target.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pixels = getattr(skimage.data, function)()
        if pixels.dtype == bool:  # the horse is a binary silhouette
            pixels = np.where(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(target)
    return list(EXAMPLE_PHOTOS)


def _run(stage: str, main, argv: list[str]) -> None:
    print(f"\n$ python -m protext.{stage} {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"quickstart: stage '{stage}' failed with exit code {code}; its message is above.")


def run(cfg: QuickstartConfig) -> list[dict]:
    """Run every stage; returns one summary row per evaluated method."""
    from . import eval as eval_cli
    from . import gen_descriptions, train

    work = cfg.workdir
    images = work / "images"
    names = write_example_images(images)
    classes_file = work / "classes.txt"
    classes_file.write_text("\n".join(names) + "\n")
    descriptions = work / "llm_data" / "example.jsonl"
    checkpoint = work / "checkpoints" / "example.safetensors"
    results = work / "results"
    depth = cfg.depth if cfg.depth is not None else (2 if cfg.model == "tiny-clip" else 9)

    gen = ["--classes", str(classes_file), "--out", str(descriptions), "--no-progress"]
    if cfg.llm_model:
        gen += ["--model", cfg.llm_model] + (["--base-url", cfg.llm_base_url] if cfg.llm_base_url else [])
    else:
        gen += ["--backend", "templates"]
    _run("gen_descriptions", gen_descriptions.main, gen)

    model = ["--model", cfg.model, "--pretrained", cfg.pretrained, "--device", cfg.device]
    _run("train", train.main, [
        "--descriptions", str(descriptions), *model, "--preset", "cross_dataset", "--depth", str(depth),
        "--epochs", str(cfg.epochs), "--warmup-epochs", "1", "--batch-size", "32", "--keep-last-batch",
        "--seed", str(cfg.seed), "--out", str(checkpoint), "--overwrite",
    ])

    common = ["--dataset", "folder", "--root", str(images), *model, "--seed", str(cfg.seed), "--workers", "0"]
    runs = [
        ("clip", ["--method", "clip"]),
        ("cupl", ["--method", "cupl", "--descriptions", str(descriptions)]),
        ("prompts", ["--method", "prompts", "--prompts", str(checkpoint)]),
        ("prompts+tpt", ["--method", "prompts", "--prompts", str(checkpoint), "--tpt",
                         "--tpt-views", str(cfg.tpt_views)]),
    ]
    rows = []
    for label, extra in runs:
        out = results / f"{label}.json"
        _run("eval", eval_cli.main, [*common, *extra, "--out", str(out)])
        result = json.loads(out.read_text())
        metrics, timing = result["metrics"], result["timing"]
        rows.append({
            "method": label,
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "n_images": metrics["n_images"],
            "images_per_second": timing["images_per_second"],
        })
    (results / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The summary as a markdown table."""
    lines = ["| method | top-1 (%) | top-5 (%) | images | images/s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['n_images']} | {r['images_per_second']:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.quickstart",
        description="Run descriptions -> train -> eval (CLIP, CuPL, learned prompts, prompts + TPT) "
        "on twelve example photos, and print the results side by side.",
    )
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (default: %(default)s)")
    parser.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag (downloaded once), a local weights file, or 'random' for an offline smoke run "
        "(default: %(default)s)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("quickstart"),
                        help="where images, descriptions, checkpoint and results go (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs, 1 of warm-up (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=None,
                        help="prompt depth (default: 9, or 2 for the two-block tiny-clip)")
    parser.add_argument("--tpt-views", type=int, default=64, help="TPT views per image (default: %(default)s)")
    parser.add_argument("--llm-model", default=None,
                        help="describe the classes with this LLM instead of the offline templates "
                        "(key from $OPENAI_API_KEY)")
    parser.add_argument("--llm-base-url", default=None, help="OpenAI-compatible server for --llm-model")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and TPT views (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = QuickstartConfig(**vars(args))
    start = time.perf_counter()
    rows = run(cfg)
    print(f"\nquickstart: {cfg.model} ({cfg.pretrained}), {len(EXAMPLE_PHOTOS)} photos, "
          f"{time.perf_counter() - start:.0f} s; results in {cfg.workdir / 'results'}\n")
    print(format_table(rows))
    if cfg.pretrained == "random":
        print("\n(random weights: accuracies are chance-level; the run shows that every stage works)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
