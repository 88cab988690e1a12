"""Prompted text encoder: forward+backward with the tower cut at the longest EOT vs the full 77 tokens.

Random ViT-B/16 weights (speed does not depend on their values), ProText's depth-9 prompts, class
names of DTD (47) and ImageNet (1000) from ../shared/classnames. Prints a markdown table.

    python benchmarks/bench_text_encoder.py [--repeats 5] [--device cpu] [--skip-imagenet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from _common import machine_line
from protext.models import load_clip
from protext.prompts import PromptedTextEncoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def time_step(encoder: PromptedTextEncoder, truncate: bool, repeats: int, device: str, chunk: int) -> float:
    """Median seconds of one forward+backward over all classes, ``chunk`` classes at a time.

    Both paths accumulate gradients over the same chunks: 1000 full-length prompts at once need more
    than 24 GiB of activations, which is the memory problem the cut avoids, not the one timed here.
    """
    times = []
    n = len(encoder.classnames)
    for _ in range(repeats + 1):  # the first run warms allocator and kernels up
        encoder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for lo in range(0, n, chunk):
            idx = torch.arange(lo, min(n, lo + chunk), device=encoder.tokens.device)
            encoder(idx, truncate=truncate, normalize=True).square().sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip architecture (random weights)")
    parser.add_argument("--depth", type=int, default=9, help="prompt depth (ProText uses 9)")
    parser.add_argument("--chunk", type=int, default=200, help="classes per forward+backward (gradients accumulate)")
    parser.add_argument("--skip-imagenet", action="store_true", help="only the 47 DTD classes")
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip(args.model, "random", device=args.device)
    sets = [("dtd", 47)] + ([] if args.skip_imagenet else [("imagenet", 1000)])
    print(f"model {args.model} (random weights), depth {args.depth}, n_ctx 4, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, {args.chunk} classes per pass\n")
    print("| classes | longest prompt (tokens) | full 77 tokens (s) | cut at EOT (s) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for name, expected in sets:
        names = json.loads((SHARED / "classnames" / f"{name}.json").read_text())
        assert len(names) == expected, f"{name}.json has {len(names)} names"
        encoder = PromptedTextEncoder(clip.model, clip.tokenizer, names, n_ctx=4, depth=args.depth).to(args.device)
        full = time_step(encoder, False, args.repeats, args.device, args.chunk)
        cut = time_step(encoder, True, args.repeats, args.device, args.chunk)
        print(f"| {len(names)} ({name}) | {int(encoder.eot.max()) + 1} | {full:.3f} | {cut:.3f} | {full / cut:.1f}× |",
              flush=True)
    print(f"\n{machine_line(args.device)}")


if __name__ == "__main__":
    main()
