"""The whole pipeline on a small built-in example, every method side by side.

The example is twelve real photos that ship with scikit-image (astronaut, cat, coffee, rocket, …),
one class each. Stage by stage: class descriptions (offline templates, or an LLM), ProText prompts
trained on them, then zero-shot classification with CLIP's template, the CuPL ensemble and the
learned prompts, and every test-time adaptation method (TPT, C-TPT, O-TPT, ZERO, TDA, MTA, DMN-ZS, DPE,
BoostAdapter, TPS) on the learned prompts. The model is loaded once and every stage is a library call (``protext.example.run``); the
equivalent command line of each stage is printed before it runs::

    python -m protext.quickstart                       # real ViT-B/16 weights (needs internet once)
    python -m protext.quickstart --pretrained random   # offline smoke run, under 2 minutes on 2 CPU cores
    python -m protext.quickstart --pretrained /data/ViT-B-16.pt

With random weights the accuracies are chance-level: the run shows that every stage works, not
what the prompts are worth. The adaptation methods use 8 views per image here (published: 64), so
that the example stays under 2 minutes on a 2-core CPU; ``--tta-views 64 --precision fp32`` gives the
published setting. TDA and DPE take one view (their published setting outside the ImageNet family),
DMN-ZS one view too (as OGA runs it: its own crops would be encoded for it alone), BoostAdapter
boosts with its most confident view (below 10 views its published share of 0.1 is none), and what a
folder has no published value for is ImageNet's; each row's printed command shows its settings. ``--precision auto`` is the machine's choice (:func:`protext.hardware.auto_precision`):
fp16 on CUDA, a bfloat16 image tower on a CPU that computes bf16 natively, fp32 on any other CPU.
Rows share image encodings where their pixels are the same (exact), and a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.quickstart",
        description="Run descriptions -> train -> eval on twelve example photos and print every method "
        "side by side: CLIP, CuPL, learned prompts, and the learned prompts with TPT, C-TPT, O-TPT, ZERO, TDA, MTA, "
        "DMN-ZS, DPE, BoostAdapter and TPS.",
    )
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture [ViT-B-16]")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag (downloaded once), a local weights file, or 'random' for an "
                        "offline smoke run [openai]")
    parser.add_argument("--workdir", type=Path, default=Path("quickstart"),
                        help="where images, descriptions, checkpoint and results go [quickstart]")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [auto]")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="image-encoding precision of evaluation: auto is fp16 on CUDA, a bfloat16 image tower on "
                        "a CPU that computes bf16 natively (avx512_bf16, AMX), fp32 on any other CPU (where bf16 "
                        "is emulated and far slower) [auto]")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs, 1 of them warm-up [10]")
    parser.add_argument("--depth", type=int, default=None,
                        help="prompt depth [the preset's 9; on a shallower text tower its block count, said in "
                        "one line, as train does: 2 for tiny-clip]")
    parser.add_argument("--tta-views", type=int, default=8,
                        help="views per image for TPT, C-TPT, O-TPT, ZERO, MTA, BoostAdapter and TPS (TDA, DMN-ZS and "
                        "DPE take one): 1, or 5 and more (MTA's bandwidth needs other views); published: 64 [8]")
    parser.add_argument("--llm-model", default=None,
                        help="describe the classes with this LLM instead of the offline templates "
                        "(key from $OPENAI_API_KEY)")
    parser.add_argument("--llm-base-url", default=None, help="OpenAI-compatible server for --llm-model")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the adaptation views [0]")
    parser.add_argument("--fresh", action="store_true",
                        help="start afresh; by default a rerun with the same settings in the same --workdir resumes, "
                        "keeping finished stages and rows")
    parser.add_argument("--no-shared-encodings", dest="share_encodings", action="store_false",
                        help="encode every row's images in that row (slower, same results): by default a batch of "
                        "pixels that an earlier row already encoded, such as the views TPT, C-TPT, O-TPT and TPS share, is not "
                        "encoded again")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import run_command

    args = build_parser().parse_args(argv)
    from .example import EXAMPLE_PHOTOS, QuickstartConfig, format_table, run

    cfg = QuickstartConfig(**vars(args))

    def body() -> int:
        start = time.perf_counter()
        rows = run(cfg)
        print(f"\nquickstart: {cfg.model} ({cfg.pretrained}), {len(EXAMPLE_PHOTOS)} photos, "
              f"{time.perf_counter() - start:.0f} s; results in {cfg.workdir / 'results'}\n")
        print(format_table(rows))
        if cfg.pretrained == "random":
            print("\n(random weights: accuracies are chance-level; the run shows that every stage works)")
        return 0

    return run_command(body, resume_hint="rerun the same command; finished stages and rows are kept")


if __name__ == "__main__":
    sys.exit(main())
