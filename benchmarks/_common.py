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
