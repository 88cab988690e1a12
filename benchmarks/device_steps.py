"""The measuring half of ``device_check.py``: what each step's child process runs and prints.

``device_check.py`` plans the steps, runs each as a bounded subprocess and writes the report; a
child it starts (``device_check.py --step NAME``) lands in :func:`run_child` here, measures, and
prints one ``RESULT {json}`` line per figure, flushed at once so a timeout loses nothing printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

RESULT = "RESULT "
"""Prefix of the lines a step's child prints, one JSON object each, flushed: kept even if it times out."""


@dataclass
class Sizes:
    """What a step measures: the published sizes on a GPU, tiny ones with ``--quick``."""

    model: str
    batch: int
    batches: int
    images: int
    train_steps: int  # 0: a whole epoch
    folder_images: int
    tests: list[str]

    @staticmethod
    def for_run(quick: bool) -> "Sizes":
        if quick:
            return Sizes("tiny-clip", 2, 1, 2, 1, 4, ["tests/test_precision_cpu.py", "-k", "every_precision and fp32"])
        return Sizes("ViT-B-16", 256, 8, 3, 0, 2048, ["-k", "cuda or fp16 or precision"])


def emit(record: dict[str, Any]) -> None:
    """Print one result line at once, so that a later timeout cannot lose it."""
    print(RESULT + json.dumps(record), flush=True)


def peak_memory_mib(device: str) -> float:
    """Peak memory since the last reset: CUDA's max allocated, or this process's peak RSS on a CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def load_model(name: str, device: str):
    import warnings

    from protext.models import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(name, "random", device=device)


def child_zeroshot(device: str, sizes: Sizes) -> None:
    """img/s of the image tower at batch ``sizes.batch``, fp16 (autocast) and bf16 (a bf16 copy), as evaluation runs it."""
    import torch

    from protext.zeroshot import ImageEncoder

    clip = load_model(sizes.model, device)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(sizes.batch, 3, size, size, device=device)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        encoder = ImageEncoder(clip.model, dtype)
        encoder(images)  # warm-up: kernels, allocator, the bf16 copy
        reset_peak(device)
        start = time.perf_counter()
        for _ in range(sizes.batches):
            encoder(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        emit({"precision": name, "batch": sizes.batch, "images": sizes.batch * sizes.batches, "seconds": seconds,
              "images_per_second": sizes.batch * sizes.batches / seconds, "peak_mib": peak_memory_mib(device)})


def child_tta(device: str, sizes: Sizes, n_classes: int) -> None:
    """``bench_tta.run_one`` for every method at ``n_classes``, fp16 on CUDA (published), one line each."""
    import bench_tta

    if sizes.model != "ViT-B-16":  # --quick: the same machinery on the tiny model
        bench_tta.random_vit_and_classes = lambda dev, threads, n, shared: (
            load_model(sizes.model, dev), json.loads((shared / "classnames" / bench_tta.CLASS_FILES[n]).read_text()))
        import protext.tta

        real = protext.tta.TTAConfig  # bench_tta imports it at call time: 8 views (MTA needs at least 5), not 64
        protext.tta.TTAConfig = lambda **kw: real(**{**kw, "views": min(kw.get("views") or 8, 8)})
    precision = "fp16" if device.startswith("cuda") else "fp32"
    # every method the registry declares on the real model; --quick (a smoke run of the machinery on
    # the tiny model, in the tests) keeps to the first six so it stays within its step timeout
    methods = bench_tta.ALL_METHODS if sizes.model == "ViT-B-16" else bench_tta.METHODS
    for method in methods:
        reset_peak(device)
        args = argparse.Namespace(method=method, n_classes=n_classes, batch=1, images=sizes.images, device=device,
                                  precision=precision, threads=0)
        row = bench_tta.run_one(args)
        emit({**row, "precision": precision, "peak_mib": peak_memory_mib(device)})


def child_train(device: str, sizes: Sizes) -> None:
    """``bench_train.run_phase``: one fast-path epoch of the ``cross_dataset`` preset on ImageNet's CuPL descriptions."""
    import bench_train

    if sizes.model != "ViT-B-16":  # --quick: the tiny model has 2 text blocks, so depth 2 and one step
        import dataclasses

        real = bench_train.get_preset
        bench_train.get_preset = lambda name: dataclasses.replace(real(name), depth=2)
        bench_train.load_clip = lambda name, pretrained, device: load_model(sizes.model, device)
    args = argparse.Namespace(device=device, dataset="imagenet", preset="cross_dataset", steps=sizes.train_steps,
                              naive=False, cache_dir=None, no_shared_prefix=False)
    emit({**bench_train.run_phase(args), "peak_mib": peak_memory_mib(device)})


def run_child(name: str, device: str, quick: bool) -> None:
    sys.path.insert(0, str(BENCH))  # bench_tta / bench_train / _common, as those scripts import them
    sys.path.insert(0, str(REPO))
    sizes = Sizes.for_run(quick)
    if name == "zeroshot":
        child_zeroshot(device, sizes)
    elif name.startswith("tta-"):
        child_tta(device, sizes, int(name.split("-")[1]))
    elif name == "train":
        child_train(device, sizes)
    else:
        raise SystemExit(f"unknown step {name}")
