"""``python -m protext.train``: learn ProText prompts from a description file, with no images.

    python -m protext.train --descriptions llm_data/dtd.jsonl --preset text_only/dtd \\
        --out checkpoints/dtd.safetensors

Flags in, :func:`protext.training.run_training` called, one summary line out; the library does the
work (class selection, preset merging, targets, the loop, checkpoint, history and plot). Killed at
any moment, the run continues with the same command plus ``--resume`` and ends bit for bit where an
uninterrupted run would.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError, run_command
from .presets import DEFAULT_PRESET, OVERRIDABLE, PRESETS, Settings

EXIT_NAN = 3
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_HINT = "finished epochs and encoded target chunks are kept; rerun the same command with --resume to continue"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's paragraphs, wraps each one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent) for p in text.split("\n\n"))


EPILOG = (
    "Files written beside --out NAME.safetensors: NAME.loss.json (loss history), NAME.loss.png (loss curve), "
    "NAME.resume.pt (written every epoch before the checkpoint, read by --resume). Target embeddings of the "
    "descriptions are cached per model weights, chunk by chunk, and reused by later runs.\n\n"
    "Classes: without --classes, every class of the description file, in file order. With --classes, those names "
    "(matched case-insensitively, '_' as space), which the prompts then use; descriptions of other classes are "
    "dropped (listed), selected classes without descriptions are listed in a warning. --split base|novel takes the "
    "first ceil(n/2) / the remaining --classes names (CoOp's base-to-novel convention), so --classes must be in label "
    "order: a dataset's built-in list by name (dtd, eurosat, imagenet, ...) or a CoOp split_zhou_*.json. A "
    "base2novel/<dataset> preset without --classes takes that dataset's built-in list.\n\n"
    "--epochs counts the warm-up epochs too: a run of no more epochs than --warmup-epochs never leaves the warm-up "
    "rate 1e-5 (a warning says so).\n\n"
    f"Presets: {', '.join(PRESETS)}."
)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--descriptions", required=True, metavar="FILE.jsonl",
                      help="description file written by 'python -m protext.gen_descriptions' (or its 'import' of a CuPL JSON)")
    data.add_argument("--classes", metavar="FILE",
                      help="train on these classes only: a .txt (one name per line, CoOp ids allowed), a .json list, a "
                      "CoOp split_zhou_*.json (names in label order), or a built-in list by dataset name (imagenet, dtd, eurosat, "
                      "oxford_pets, ...) [a base2novel/* preset's dataset, else every class of the description file]")
    data.add_argument("--split", choices=("all", "base", "novel"),
                      help="base = first ceil(n/2) classes of --classes, novel = the rest (needs --classes in label order) "
                      "[base for base2novel/* presets, else all]")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip architecture, e.g. ViT-B-16, ViT-L-14, tiny-clip [ViT-B-16]")
    model.add_argument("--pretrained", default="openai",
                       help="open_clip tag, a local weights file (OpenAI .pt or open_clip state dict), or 'random' (tests only) [openai]")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: cuda when available [auto]")
    model.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="autocast dtype for the text tower; prompts and optimiser stay fp32; fp16 needs CUDA and adds a "
                       "gradient scaler; auto = bf16 on CUDA with bf16 support, else fp32 [fp32]")


def _hyper_flags(parser: argparse.ArgumentParser) -> None:
    hyper = parser.add_argument_group("hyper-parameters (default: the preset's; see PRESETS.md)")
    hyper.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                       help="published setting: cross_dataset, text_only/<dataset>, base2novel/<dataset>; without it n_ctx, "
                       f"lr and epochs come from {DEFAULT_PRESET}")
    hyper.add_argument("--n-ctx", type=int, help="context vectors (token positions 1..n_ctx)")
    hyper.add_argument("--depth", type=int, help="prompt depth: 1 = shallow (CoOp); blocks 1..depth-1 get deep prompts; "
                       "at most the text tower's blocks [the preset's 9, or the tower's blocks where it has fewer]")
    hyper.add_argument("--ctx-init", help="init phrase for n_ctx <= 4 ['a photo of a']; 'none' for random N(0, 0.02^2) context")
    hyper.add_argument("--lr", type=float, help="base learning rate of the cosine schedule")
    hyper.add_argument("--epochs", type=int, help="total epochs, warm-up included")
    hyper.add_argument("--warmup-epochs", type=int, help="epochs at the constant warm-up rate 1e-5 [5]")
    hyper.add_argument("--batch-size", type=int, help="(class, description) pairs per step [256]")
    hyper.add_argument("--loss", choices=("mse", "l1"), help="loss on normalised features [mse]")
    hyper.add_argument("--loss-weight", type=float, help="loss factor [1000 for mse, 1 for l1, as published]")
    hyper.add_argument("--seed", type=int, default=1, help="seeds prompt initialisation and per-epoch shuffling [1]")
    hyper.add_argument("--keep-last-batch", action="store_true",
                       help="train on the last incomplete batch of each epoch too (the published loader drops it)")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output and run control")
    out.add_argument("--out", metavar="checkpoints/NAME.safetensors",
                     help="checkpoint path [checkpoints/<descriptions file name>.safetensors]")
    out.add_argument("--resume", action="store_true", help="continue the run saved beside --out (NAME.resume.pt)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out and start afresh")
    out.add_argument("--no-shared-prefix", action="store_true",
                     help="compute every class prompt's start of text and context separately; same results, slower "
                     "(for comparisons)")
    out.add_argument("--cache-dir", help="target embedding cache directory [$PROTEXT_TARGET_CACHE, else ~/.cache/protext/targets]")
    out.add_argument("--no-cache", action="store_true", help="compute description targets without the disk cache")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    out.add_argument("--naive", action="store_true",
                     help="deprecated, ignored: the reference path moved beside the tests (benchmarks/bench_train.py times it)")


def build_parser() -> argparse.ArgumentParser:
    """The command line (building it imports no torch, so ``--help`` is instant)."""
    parser = argparse.ArgumentParser(
        prog="python -m protext.train",
        description=(
            "Learn ProText context and deep text prompts from class descriptions alone (no images). Loss MSE x 1000 "
            "between the prompted class feature and each description's frozen CLIP feature; AdamW (0.9, 0.98, wd 0.1); "
            "5 warm-up epochs at 1e-5, then cosine; batch 256."
        ),
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    _data_flags(parser)
    _hyper_flags(parser)
    _run_flags(parser)
    return parser


def job_from_args(args: argparse.Namespace):
    """The :class:`protext.training.TrainJob` the flags describe."""
    from .training import TrainJob

    return TrainJob(
        descriptions=args.descriptions, preset=args.preset, classes=args.classes, out=args.out,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, resume=args.resume, overwrite=args.overwrite,
        model=args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, seed=args.seed,
        shared_prefix=not args.no_shared_prefix, keep_last_batch=args.keep_last_batch, **_hyperparameters(args),
    )


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The hyper-parameter flags (and ``--split``) by their :class:`TrainJob` field names; None: the preset's."""
    return {key: getattr(args, key) for key in OVERRIDABLE}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"warning: {message}")


#: upper bounds that only a typo exceeds; each would otherwise start a run that never ends or
#: cannot fit (CLIP's text context is 77 tokens: start, end and at least one class-name token)
MAX_EPOCHS = 100_000
MAX_N_CTX = 74
MAX_BATCH = 10_000_000
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


class TrainFlagError(UserError):
    """A flag value no training run can use; found before torch is imported."""


def out_path(args: argparse.Namespace) -> Path:
    """The checkpoint path the flags name (the default as :meth:`protext.training.TrainJob.out_path`)."""
    return Path(args.out) if args.out else Path("checkpoints") / f"{Path(args.descriptions).stem}.safetensors"


def preflight(args: argparse.Namespace) -> Path:
    """Every check of the flags and input files that needs no model, before torch is imported.

    Returns the checkpoint path. The library repeats what it needs (for callers that skip the
    command line); ``--depth`` and ``--n-ctx`` are checked against the model's config file here and
    against the loaded tower later; ``--device`` waits for torch.
    """
    from .preflight import check_output_dir, check_output_file
    from .classlists import BUILTIN, is_builtin
    from .presets import resolve

    if args.resume and args.overwrite:
        raise TrainFlagError("--resume and --overwrite contradict each other; pick one.")
    settings = resolve(args.preset, _hyperparameters(args))
    for flag, value in (("--lr", settings.lr), ("--loss-weight", settings.loss_weight)):
        if value is not None and not math.isfinite(value):
            raise TrainFlagError(f"{flag} must be a finite number, got {value}.")
    for flag, value, high in (("--epochs", settings.epochs, MAX_EPOCHS), ("--warmup-epochs", settings.warmup_epochs, MAX_EPOCHS),
                              ("--n-ctx", settings.n_ctx, MAX_N_CTX), ("--batch-size", settings.batch_size, MAX_BATCH)):
        if value > high:
            raise TrainFlagError(f"{flag} must be at most {high}, got {value}.")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise TrainFlagError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {args.seed}.")
    descriptions = Path(args.descriptions)
    if not descriptions.is_file():
        raise TrainFlagError(f"--descriptions {descriptions}: no such file.")
    if args.classes and not is_builtin(args.classes) and not Path(args.classes).is_file():
        raise TrainFlagError(f"--classes {args.classes}: no such file, and not a built-in class list ({', '.join(BUILTIN)}).")
    out = out_path(args)
    inputs = [("--descriptions", args.descriptions), ("--classes", args.classes)]
    check_output_file(out, "--out", inputs, suffix=".safetensors")
    if args.cache_dir and not args.no_cache:
        check_output_dir(args.cache_dir, "--cache-dir")
    _check_tower(args, settings)
    return out


def _check_tower(args: argparse.Namespace, settings: Settings) -> None:
    """``--depth``/``--n-ctx`` against the text tower of ``--model``, read from its config file, by the
    rule every run follows (:func:`protext.architectures.fit_prompts`): a ``--depth`` deeper than the
    tower is refused here, not after the weights load; a preset's deeper depth is the run's to lower
    and to say so, once."""
    from .architectures import fit_prompts, text_tower_shape

    shape = text_tower_shape(args.model)
    if shape is not None:  # an architecture without a config file here is fitted once loaded
        fit_prompts(shape, settings.n_ctx, settings.depth, depth_given=args.depth is not None)


def _body(args: argparse.Namespace) -> int:
    from .locks import output_lock

    out = preflight(args)
    # Held from here, before torch is imported, to the end: a second run on this --out stops at
    # once (run_training takes the same lock again, reentrantly, for library callers).
    with output_lock(out, flag="--out", writer="training run"):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from .training import run_training

    if args.naive:
        _say("warning: --naive is deprecated and ignored: training always takes the fast path, which the tests prove "
             "equal to the reference (tests/reference/training_reference.py).")
    outcome = run_training(job_from_args(args), progress=not args.quiet)
    if not outcome.complete:
        _say(f"error: {outcome.message}")
        return EXIT_NAN
    files = outcome.files
    _say(
        f"done: {len(outcome.history)} epochs (resumed after {outcome.resumed_from}) in {outcome.seconds:.1f}s, "
        f"final loss {outcome.final_loss:.6g}; wrote {files['checkpoint']}, {files['history'].name}, {files['plot'].name}"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input, 3 the loss became NaN, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # one readable line per warning, not a source location
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=ResourceWarning)
            return run_command(lambda: _body(args), resume_hint=RESUME_HINT)
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
