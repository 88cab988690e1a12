"""``python -m protext.reproduce TABLE --root DATA``: run a published table and compare with the paper.

Examples::

    # ProText's cross-dataset table on the real weights, CuPL's release folder for the descriptions
    python -m protext.reproduce protext-cross-dataset --root data --descriptions ../shared/cupl

    # OGA's 100 stream orders (mean, ETA, spread) and StatA's realistic batches and streams
    python -m protext.reproduce oga-runs --root data
    python -m protext.reproduce stata --root data

    # every table name, with what it reproduces
    python -m protext.reproduce --list

The library does the work (:mod:`protext.reproduction`, tables in :mod:`protext.protocols`); this
module parses flags, calls it and prints. Killed and rerun with the same flags, a table continues
where it stopped: finished cells and trained prompts are reused, never recomputed.

Under ``torchrun --nnodes N --nproc_per_node G -m protext.reproduce TABLE ...`` the ranks evaluate
every cell together (its images sharded as ``protext.eval`` shards them), rank 0 trains and writes
every file, and TDA's cells run whole, one per rank (:mod:`protext.reproduction.table_run`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.reproduce",
        description=(
            "Run one published table (PUBLISHED.md) end to end: train the prompts it needs with their "
            "presets, evaluate every cell with the table's own protocol (template rule, class split, TTA), "
            "and write TABLE.json and TABLE.md with ours beside the published numbers."
        ),
    )
    parser.add_argument("table", nargs="?", help="Table name (see --list), e.g. protext-base2novel.")
    parser.add_argument("--list", action="store_true", help="List the tables and what each reproduces, then exit.")
    parser.add_argument("--plan", action="store_true", help="Print every cell of TABLE with its settings (features, classes, template, preset, n_ctx, TTA) and the known departures, then exit; reads and runs nothing.")
    data = parser.add_argument_group("inputs")
    data.add_argument("--root", help="Folder holding the datasets (CoOp or TPT layout); missing ones are listed and skipped.")
    data.add_argument("--descriptions", metavar="DIR", help="CuPL's release folder (its own file names and keys), as released with CuPL (github.com/sarahpratt/CuPL); needed by CuPL rows and by every table that trains prompts.")
    data.add_argument("--coop", metavar="FILE", help="CoOp's 16-shot ImageNet prompts (.pth) for tpt-ood's CoOp rows; without it those rows are listed as not run.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip architecture; the papers use ViT-B-16. [ViT-B-16]")
    model.add_argument("--pretrained", default="openai", help="open_clip tag, a weights file, or 'random' (smoke tests only). [openai]")
    model.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N. [auto]")
    model.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="Evaluation precision (auto: fp16 on CUDA as published, fp32 on the CPU); prompts always train in fp32. [auto]")
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="Output folder; rerun with the same --out to continue. [reproduction/TABLE]")
    run.add_argument("--limit", type=int, metavar="N", help="Smoke test: only the first N test images of each cell (a departure, listed in TABLE.md).")
    run.add_argument("--epochs", type=int, metavar="N", help="Smoke test: train every preset for N epochs instead of its own (a departure).")
    run.add_argument("--tta-views", type=int, metavar="N", help="Smoke test: N views per image for test-time adaptation instead of 64 (a departure).")
    run.add_argument("--stream-runs", type=int, metavar="N", help="Smoke test: N stream orders per oga-runs cell instead of OGA's 100 (a departure).")
    run.add_argument("--tasks", type=int, metavar="N", help="Smoke test: N tasks or streams per stata scenario cell instead of StatA's 1000 / 100 (a departure).")
    run.add_argument("--depth", type=int, metavar="N", help="Prompt depth N instead of 9, for models whose text tower has fewer blocks (tiny-clip: 2); a departure.")
    run.add_argument("--seed", type=int, default=0, help="Seed of the views of every image (and of a --pretrained random model). [0]")
    run.add_argument("--batch-size", type=int, default=64, help="Images per batch for cells without test-time adaptation. [64]")
    run.add_argument("--workers", type=int, default=2, help="DataLoader worker processes. [2]")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show progress bars. [on]")
    return parser


def _list_tables() -> int:
    from .protocols import PROTOCOLS

    for protocol in PROTOCOLS.values():
        cells = len(protocol.rows) * len(protocol.datasets) * len(protocol.splits)
        print(f"{protocol.name:24s} {cells:3d} cells  {protocol.title}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if args.list:
        return _list_tables()

    def body() -> int:
        from .protocols import get_protocol
        from .reproduction import ReproduceConfig, ReproduceError, reproduce

        get_protocol(args.table or "")
        options = {k: v for k, v in vars(args).items() if k not in ("list", "plan")}
        if args.plan:
            from .reproduction import describe_plan

            print(describe_plan(ReproduceConfig(**{**options, "root": args.root or ""})))
            return 0
        if not args.root:
            raise ReproduceError("--root DATA is required: the folder holding the table's datasets.")
        from .reproduction.team import SharedError

        finished = False
        try:
            run = reproduce(ReproduceConfig(**options))
            finished = True
        except SharedError:
            return 2  # under torchrun every rank raised it, and rank 0 alone prints it
        finally:
            if "protext.distributed" in sys.modules:  # a job got that far: leave its process group, if any
                from .distributed import shutdown_all

                shutdown_all(meet=finished)
        if not run.main:
            return 0  # rank 0 prints the summary of the table it wrote
        done = len(run.computed) + len(run.reused)
        print(f"{args.table}: {len(run.computed)} cells computed, {len(run.reused)} reused ({done} of "
              f"{done + len(run.table['cells_not_run'])}); wrote {run.json_path} and {run.markdown_path}")
        return 0

    return run_command(body, resume_hint="rerun the same command: finished cells and trained prompts are kept")


if __name__ == "__main__":
    sys.exit(main())
