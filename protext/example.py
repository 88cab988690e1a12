"""The built-in example: twelve real photos, and the whole pipeline run on them with one loaded model.

The photos ship with scikit-image (astronaut, cat, coffee, rocket, …), one class each. :func:`run`
goes stage by stage: class descriptions (offline templates, or an LLM), ProText prompts trained on
them, then zero-shot classification with CLIP's template, the CuPL ensemble and the learned prompts,
and every test-time adaptation method (TPT, C-TPT, ZERO, TDA, MTA) on the learned prompts. Every stage
is a library call; the equivalent command line of each is printed before it runs. The command line
is ``python -m protext.quickstart``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

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

#: the adaptation methods shown, each on the learned prompts
TTA_SHOWN = ("tpt", "ctpt", "zero", "tda", "mta")


@dataclass
class QuickstartConfig:
    """Settings of the example run (see ``--help``)."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    workdir: Path = Path("quickstart")
    device: str = "auto"
    precision: str = "auto"
    epochs: int = 10
    depth: Optional[int] = None
    tta_views: int = 16
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
        from .errors import UserError

        raise UserError(
            "the example photos come from scikit-image: pip install scikit-image "
            "(it is in protext's 'dev' and 'example' extras)"
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


def _say(command: str, argv: Sequence[Any]) -> None:
    print(f"\n$ {command} {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)


def describe(cfg: QuickstartConfig, classes: list[str], out: Path) -> None:
    """Stage 1: class descriptions (offline templates unless an LLM is named)."""
    from .descriptions import GenConfig, generate

    backend = ["--model", cfg.llm_model] if cfg.llm_model else ["--backend", "templates"]
    base_url = ["--base-url", cfg.llm_base_url] if cfg.llm_base_url else []
    _say("python -m protext.gen_descriptions", ["--classes", "CLASSES.txt", *backend, *base_url, "--out", out])
    gen = GenConfig(
        classes=classes,
        out=out,
        backend="openai" if cfg.llm_model else "templates",
        model=cfg.llm_model,
        base_url=cfg.llm_base_url,
        progress=False,
    )
    report = generate(gen)
    if report.failed:
        from .errors import UserError

        raise UserError(f"description generation failed for {len(report.failed)} classes; see the messages above")


def train_prompts(cfg: QuickstartConfig, clip, descriptions: Path, out: Path) -> None:
    """Stage 2: ProText prompts from the descriptions alone (the cross-dataset preset, shortened)."""
    from .training import TrainJob, run_training

    depth = cfg.depth if cfg.depth is not None else (2 if cfg.model == "tiny-clip" else 9)
    overrides = {"depth": depth, "epochs": cfg.epochs, "warmup_epochs": 1, "batch_size": 32}
    _say("python -m protext.train", [
        "--descriptions", descriptions, "--preset", "cross_dataset", "--depth", depth, "--epochs", cfg.epochs,
        "--warmup-epochs", 1, "--batch-size", 32, "--keep-last-batch", "--out", out, "--overwrite",
    ])
    job = TrainJob(
        descriptions=descriptions, preset="cross_dataset", overrides=overrides, out=out, overwrite=True,
        model=cfg.model, pretrained=cfg.pretrained, device=cfg.device, seed=cfg.seed, keep_last_batch=True,
    )
    run_training(job, clip=clip, progress=False)


def evaluate_all(cfg: QuickstartConfig, clip, images: Path, descriptions: Path, checkpoint: Path, results: Path) -> list[dict]:
    """Stage 3: every class-feature method, then every adaptation method on the learned prompts."""
    from .evaluation import EvalConfig, evaluate

    precision = cfg.precision
    if precision == "auto" and next(clip.model.parameters()).device.type == "cpu":
        precision = "bf16"  # a bfloat16 image tower: ~3x faster on a CPU, so the example stays short
    base = EvalConfig(
        dataset="folder", root=str(images), model=cfg.model, pretrained=cfg.pretrained, device=cfg.device,
        precision=precision, seed=cfg.seed, workers=0, overwrite=True, progress=False,
    )
    runs: list[tuple[str, EvalConfig]] = [
        ("clip", replace(base, method="clip")),
        ("cupl", replace(base, method="cupl", descriptions=str(descriptions))),
        ("prompts", replace(base, method="prompts", prompts=str(checkpoint))),
    ]
    for method in TTA_SHOWN:
        config = replace(base, method="prompts", prompts=str(checkpoint), tta=method)
        if method == "tda":  # one view on a plain folder; a folder has no published (alpha, beta): ImageNet's
            config = replace(config, tda_alpha=2.0, tda_beta=5.0)
        else:
            config = replace(config, tta_views=cfg.tta_views)
        runs.append((f"prompts+{method}", config))
    rows = []
    for label, config in runs:
        config.out = str(results / f"{label}.json")
        flags = ["--method", config.method] + (["--tta", config.tta] if config.tta else [])
        _say("python -m protext.eval", ["--dataset", "folder", "--root", images, *flags, "--out", config.out])
        payload = evaluate(config, clip=clip, progress=False)
        metrics, timing = payload["metrics"], payload["timing"]
        rows.append({
            "method": label,
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "ece": metrics["ece"],
            "n_images": metrics["n_images"],
            "seconds_per_image": timing["seconds_per_image"],
        })
    return rows


def run(cfg: QuickstartConfig) -> list[dict]:
    """Run every stage; returns one summary row per evaluated method (also in ``results/summary.json``)."""
    import json

    from .atomic import atomic_write
    from .models import load_clip

    work = cfg.workdir
    images = work / "images"
    names = write_example_images(images)
    descriptions = work / "llm_data" / "example.jsonl"
    checkpoint = work / "checkpoints" / "example.safetensors"
    results = work / "results"
    if descriptions.exists():
        descriptions.unlink()  # the example starts from scratch each time
    describe(cfg, names, descriptions)

    device = cfg.device if cfg.device != "auto" else ("cuda" if _cuda() else "cpu")
    print(f"\nloading {cfg.model} ({cfg.pretrained}) once for every stage", flush=True)
    clip = load_clip(cfg.model, cfg.pretrained, device=device, seed=cfg.seed)
    train_prompts(cfg, clip, descriptions, checkpoint)
    rows = evaluate_all(cfg, clip, images, descriptions, checkpoint, results)

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(rows, indent=2) + "\n")

    atomic_write(results / "summary.json", write)
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def format_table(rows: Sequence[dict]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| method | top-1 (%) | top-5 (%) | ECE (%) | images | s / image |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['ece']:.2f} | {r['n_images']} "
            f"| {r['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines)
