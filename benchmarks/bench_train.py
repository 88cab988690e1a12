"""ProText training: seconds per epoch, fast path vs the reference (``tests/reference/training_reference.py``), on real CuPL descriptions.

Random ViT-B/16 weights (speed does not depend on their values), the presets' prompt shapes
(depth 9), ``protext.training.train`` itself for every timing. Each phase runs in its own
subprocess so its peak resident memory (``ru_maxrss``) is its own.

* DTD (``../shared/cupl/texture_prompts_full.json``, 2,820 samples): the fast path trains one whole epoch; the naive
  path trains ``--naive-steps`` batches of 256 random samples (its cost per batch does not depend on
  which samples: always 256 prompts and 256 descriptions at 77 tokens) and is extrapolated to the
  epoch's step count.
* ImageNet (``../shared/cupl/imagenet_prompts_base.json``): both paths train a fixed number of steps
  on batches of 256 samples drawn uniformly from all ~30k descriptions (so the number of distinct
  classes per batch is that of a real epoch), and report seconds per step and per (extrapolated) epoch.

Target embeddings are computed once per description and cached on disk; that one-time cost is timed
separately and is not part of the per-epoch figures.

    python benchmarks/bench_train.py [--device cpu] [--naive-steps 1] [--imagenet-steps 20] [--skip-imagenet]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from _common import machine_line  # noqa: E402
from protext.descriptions.cupl import release_descriptions  # noqa: E402
from protext.models import load_clip  # noqa: E402
from protext.presets import get_preset  # noqa: E402
from protext.prompts import PromptedTextEncoder  # noqa: E402
from protext.targets import description_targets, tokenize_descriptions  # noqa: E402
from protext.training import TextPairs, TrainConfig, train  # noqa: E402
from tests.reference.training_reference import train_naive  # noqa: E402  (the reference lives beside the tests)



def maxrss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_pairs(dataset: str, folder: Path = SHARED / "cupl") -> TextPairs:
    """``dataset``'s CuPL descriptions from CuPL's release ``folder``, read as training reads them.

    Through :func:`protext.descriptions.cupl.release_descriptions`, as ``reproduce`` gathers them for
    training: label-ordered class names, every sample kept, repeats included (DTD: 2,820 samples,
    11 steps of 256; dropping repeats would time 2,745 samples in 10 steps that no run trains).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the release's extra keys are left out; the count is what matters here
        return TextPairs.from_descriptions(release_descriptions(folder, dataset))


def subset(pairs: TextPairs, n: int, seed: int) -> TextPairs:
    """``n`` samples drawn uniformly without replacement, regrouped by class."""
    rows = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    grouped: dict[str, list[str]] = {}
    for r in rows.tolist():
        grouped.setdefault(pairs.classnames[int(pairs.class_index[r])], []).append(pairs.texts[r])
    return TextPairs.from_descriptions(grouped)


def run_phase(args: argparse.Namespace) -> dict:
    """One timing in this process; returns what the parent prints."""
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("ViT-B-16", "random", device=args.device)
    rss_model = maxrss_mib()
    pairs_all = load_pairs(args.dataset)
    steps_per_epoch = len(pairs_all) // 256
    if args.steps:  # a fixed number of steps on uniformly drawn samples
        pairs = subset(pairs_all, args.steps * 256, seed=1)
    else:
        pairs = pairs_all
    encoder = PromptedTextEncoder(clip.model, clip.tokenizer, pairs.classnames, preset.n_ctx, preset.depth, preset.ctx_init)
    config = TrainConfig(
        lr=preset.lr, epochs=1, warmup_epochs=0, batch_size=256, seed=1, shared_prefix=not args.no_shared_prefix
    )
    out: dict = {"dataset": args.dataset, "preset": args.preset, "naive": args.naive, "samples": len(pairs_all),
                 "steps_per_epoch": steps_per_epoch, "longest_prompt": int(encoder.eot.max()) + 1}
    targets = tokens = None
    if args.naive:
        tokens = tokenize_descriptions(clip.tokenizer, pairs.texts, 77).tokens
    else:
        with tempfile.TemporaryDirectory() as scratch:
            began = time.perf_counter()
            targets, stats = description_targets(
                clip.model, clip.tokenizer, pairs.texts, cache_dir=args.cache_dir or scratch, progress=False
            )
            out["target_seconds"] = time.perf_counter() - began
            out["target_texts"] = stats.computed
        # warm-up step (allocator, kernels) on a few samples, not timed
        warm = TrainConfig(lr=preset.lr, epochs=1, warmup_epochs=0, batch_size=256, drop_last=False)
        few = TextPairs(pairs.classnames, pairs.class_index[:256], pairs.texts[:256])
        train(encoder, few, warm, targets=targets[:256], progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    if args.naive:
        result = train_naive(encoder, pairs, config, tokens, progress=False)
    else:
        result = train(encoder, pairs, config, targets=targets, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    seconds = time.perf_counter() - began
    steps = result.history[0].steps
    out.update(steps_timed=steps, seconds=seconds, seconds_per_step=seconds / steps,
               epoch_seconds=seconds / steps * steps_per_epoch, extrapolated=steps != steps_per_epoch,
               rss_model_mib=rss_model, rss_peak_mib=maxrss_mib(), loss=result.final_loss)
    if not args.naive:
        classes_per_batch = []
        gen = torch.Generator().manual_seed(1)
        for rows in torch.randperm(len(pairs), generator=gen)[: steps * 256].split(256):
            classes_per_batch.append(len(pairs.class_index[rows].unique()))
        out["distinct_classes_per_batch"] = sum(classes_per_batch) / len(classes_per_batch)
    return out


def target_cost(fast: dict) -> str:
    if not fast["target_texts"]:
        return "cached"
    return f"{fast['target_seconds'] / fast['target_texts'] * 1000:.0f} s per 1000 texts"


def spawn(args: argparse.Namespace, dataset: str, preset: str, naive: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", "--dataset", dataset, "--preset", preset, "--device", args.device,
           "--steps", str(steps)] + (["--naive"] if naive else [])
    cmd += (["--cache-dir", args.cache_dir] if args.cache_dir else []) + (["--no-shared-prefix"] if args.no_shared_prefix else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"phase {dataset}/{'naive' if naive else 'fast'} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtd-preset", default="text_only/dtd", help="preset giving DTD's n_ctx (16) and depth (9)")
    parser.add_argument("--imagenet-preset", default="cross_dataset", help="preset giving ImageNet's n_ctx and depth")
    parser.add_argument("--naive-steps", type=int, default=1, help="naive batches timed (then extrapolated)")
    parser.add_argument("--imagenet-steps", type=int, default=20, help="fast-path ImageNet steps timed")
    parser.add_argument("--skip-imagenet", action="store_true", help="DTD only")
    parser.add_argument(
        "--cache-dir", help="reuse target embeddings from this cache (default: a fresh temporary one, so the "
        "one-time target cost is measured)"
    )
    parser.add_argument("--no-shared-prefix", action="store_true", help="fast path without the shared-prefix computation")
    # internal: one phase per subprocess
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)), flush=True)
        return

    print(f"ViT-B-16 (random weights), depth 9, batch 256, device {args.device}, {torch.get_num_threads()} threads\n", flush=True)
    plan = [("dtd", args.dtd_preset, 0, args.naive_steps)]
    if not args.skip_imagenet:
        plan.append(("imagenet", args.imagenet_preset, args.imagenet_steps, args.naive_steps))
    rows = []
    for dataset, preset, fast_steps, naive_steps in plan:
        fast = spawn(args, dataset, preset, False, fast_steps)
        print(f"  {dataset} fast: {fast['steps_timed']} steps in {fast['seconds']:.1f}s", file=sys.stderr, flush=True)
        naive = spawn(args, dataset, preset, True, naive_steps)
        print(f"  {dataset} naive: {naive['steps_timed']} steps in {naive['seconds']:.1f}s", file=sys.stderr, flush=True)
        rows.append((fast, naive))

    print("| descriptions | preset (n_ctx) | steps/epoch | fast: steps timed | fast s/epoch | naive: steps timed | "
          "naive s/epoch | speed-up | peak RSS fast / naive (MiB) | targets once |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fast, naive in rows:
        n_ctx = get_preset(fast["preset"]).n_ctx
        ratio = naive["seconds_per_step"] / fast["seconds_per_step"]
        ext = lambda r: " (extrapolated)" if r["extrapolated"] else ""  # noqa: E731
        print(
            f"| {fast['dataset']} ({fast['samples']}) | {fast['preset']} ({n_ctx}) | {fast['steps_per_epoch']} | "
            f"{fast['steps_timed']} | {fast['epoch_seconds']:.1f}{ext(fast)} | {naive['steps_timed']} | "
            f"{naive['epoch_seconds']:.0f}{ext(naive)} | **{ratio:.1f}×** | "
            f"{fast['rss_peak_mib']:.0f} / {naive['rss_peak_mib']:.0f} | "
            f"{target_cost(fast)} |"
        )
    print()
    for fast, naive in rows:
        print(
            f"- {fast['dataset']}: fast {fast['seconds_per_step']:.2f} s/step ({fast['distinct_classes_per_batch']:.0f} distinct "
            f"classes per batch of 256, longest prompt {fast['longest_prompt']} tokens), naive "
            f"{naive['seconds_per_step']:.1f} s/step (256 prompts + 256 descriptions at 77 tokens); "
            f"RSS with the model loaded {fast['rss_model_mib']:.0f} MiB"
            + (f"; CUDA peak fast {fast['cuda_peak_mib']:.0f} / naive {naive['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in fast else "")
        )
    print("\nPer-epoch seconds are steps/epoch × measured seconds per step where marked extrapolated; "
          "speed-up = naive s/step ÷ fast s/step (the same ratio per epoch).")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()
