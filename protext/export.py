"""``python -m protext.export``: convert a protext checkpoint for other code bases.

    python -m protext.export --format coop checkpoints/NAME.safetensors NAME.pth

``coop`` writes ``{'state_dict': {'ctx': tensor (n_ctx, width)}}``, which the official CoOp and TPT
code ``--load``s as a learned context. CoOp and TPT have no deep prompts, so only the shallow context
is exported; a note says so when the checkpoint has deep prompts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import run_command

FORMATS = ("coop",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.export",
        description="Convert a protext prompt checkpoint (.safetensors) to another format.",
    )
    parser.add_argument(
        "--format", choices=FORMATS, required=True,
        help="coop: {'state_dict': {'ctx': tensor}} for the official CoOp/TPT --load (shallow context only)",
    )
    parser.add_argument("checkpoint", metavar="IN.safetensors", help="a checkpoint written by protext.train")
    parser.add_argument("output", metavar="OUT.pth", help="file to write (replaced atomically if it exists)")
    return parser


def _body(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import UserError
    from .preflight import check_output_file

    out = check_output_file(args.output, "output", [("checkpoint", args.checkpoint)])
    if not Path(args.checkpoint).is_file():  # found before torch is imported (the checkpoint module needs it)
        raise UserError(f"{args.checkpoint}: no such prompt checkpoint.")
    from .checkpoint import export_coop, load_prompts

    ckpt = load_prompts(args.checkpoint)
    export_coop(ckpt, out)
    if ckpt.depth > 1:
        print(
            f"note: {args.checkpoint} has deep prompts (depth {ckpt.depth}); CoOp/TPT take the shallow context only, "
            "so they are not exported.",
            file=sys.stderr,
        )
    print(f"wrote {out}: ctx {tuple(ckpt.ctx.shape)} (n_ctx {ckpt.n_ctx}, width {ckpt.width})", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return 0, or 2 with an ``error:`` line when the checkpoint or output is unusable."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _body(args))


if __name__ == "__main__":
    sys.exit(main())
