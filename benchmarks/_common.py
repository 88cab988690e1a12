"""What the TPT and TTA benchmarks share: the class lists they time, test images, peak memory."""

from __future__ import annotations

import resource

#: the two class counts every per-image benchmark measures, and their real class lists in ../shared
CLASS_FILES = {47: "dtd.json", 1000: "imagenet.json"}


def peak_gib(device: str) -> float:
    """Peak memory of this process: CUDA's max allocated, or the CPU's peak RSS."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synthetic_images(n: int):
    """Photo-sized test images with some structure (noise plus blocks), the same in every process."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, 300), rng.integers(0, 420)
            pixels[y : y + 75, x : x + 80] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def random_vit_and_classes(device: str, threads: int, n_classes: int, shared):
    """A random-weight ViT-B/16 (speed does not depend on the weights) and the real class list of
    ``n_classes`` from ``shared/classnames``; ``threads`` > 0 sets torch's thread count first."""
    import json
    import warnings

    import torch

    from protext.models import load_clip

    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("ViT-B-16", "random", device=device)
    return clip, json.loads((shared / "classnames" / CLASS_FILES[n_classes]).read_text())


def machine_line(device: str = "cpu") -> str:
    """The line every benchmark prints beside its figures: which CPU (name, cores, PyTorch's kernel
    level, native bf16 or not) and, on CUDA, which GPU. The same command's seconds differ by up to
    ~70x between a CPU with native bf16 and one without, so a figure without this line means little."""
    import torch  # noqa: F401  (imported so that the capability names PyTorch's kernel level)

    from protext.hardware import describe_cpu

    line = f"machine: {describe_cpu()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return line


def machine_record() -> dict:
    """:func:`protext.hardware.cpu_capability` for a benchmark's JSON output."""
    import torch  # noqa: F401

    from protext.hardware import cpu_capability

    return cpu_capability()


def warn_emulated_bf16(precision: str) -> None:
    """One line on stderr when a bf16 figure is measured on a CPU that only emulates bf16."""
    import sys

    from protext.hardware import has_native_bf16

    if precision == "bf16" and not has_native_bf16():
        print("[bench] note: this CPU has no native bf16 (no avx512_bf16/AMX): bf16 runs emulated, "
              "far slower than fp32; the bf16 figures here show that, not a bf16 CPU's speed", file=sys.stderr, flush=True)
