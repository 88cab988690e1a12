"""``python -m protext.train``: learn ProText prompts from a description file, with no images.

    python -m protext.train --descriptions llm_data/dtd.jsonl --preset text_only/dtd \\
        --out checkpoints/dtd.safetensors

Reads the JSONL of ``protext.gen_descriptions``, selects classes, computes (or reuses) the frozen
description targets, trains the context and deep prompts (ALGORITHMS.md §3) and writes, beside the
checkpoint: ``NAME.loss.json`` (loss history), ``NAME.loss.png`` (loss curve) and ``NAME.resume.pt``
(the state ``--resume`` continues from; updated after every epoch, like the checkpoint itself).

Class selection (``--classes`` / ``--split``): without ``--classes`` every class of the description
file is trained on, in file order. ``--classes FILE`` names the classes (a ``.txt`` with one name per
line, CoOp's ``n01440764 tench`` lines included; a ``.json`` list; or a CoOp ``split_zhou_*.json``,
whose class names are taken in label order); the prompts use these names, matched to the description
file case-insensitively with ``_`` as a space. ``--split base|novel`` then keeps the first
``ceil(n/2)`` labels or the rest (the CoOp base-to-novel convention), so it needs ``--classes`` in
label order: a description file's own key order is not a dataset's label order (DTD's CuPL file
starts with 'gauzy'). ``base2novel/*`` presets imply ``--split base``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import __version__
from .checkpoint import save_prompts
from .descriptions import DescriptionFileError, match_classnames, normalize_classname, read_descriptions
from .models import PretrainedUnavailableError, load_clip, text_fingerprint
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from .prompts import PromptedTextEncoder
from .targets import TargetCacheError, description_targets, tokenize_descriptions, warn_truncated
from .text_tower import UnsupportedTextTowerError, text_tower
from .training import (
    EpochRecord,
    NonFiniteLossError,
    ResumeStateError,
    TextPairs,
    TrainConfig,
    train,
)

EXIT_BAD_INPUT = 2
EXIT_NAN = 3
MAX_LISTED = 40


class CliError(Exception):
    """Bad input: printed as ``error: ...`` and exit status 2, before anything is written."""


# --------------------------------------------------------------------------------------------------
# arguments


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's paragraphs, wraps each one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent) for p in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.train",
        description=(
            "Learn ProText context and deep text prompts from class descriptions alone (no images). "
            "Loss MSE x 1000 between the prompted class feature and each description's frozen CLIP "
            "feature; AdamW (0.9, 0.98, wd 0.1); 5 warm-up epochs at 1e-5, then cosine; batch 256."
        ),
        epilog=(
            "Files written beside --out NAME.safetensors: NAME.loss.json (loss history), NAME.loss.png (loss "
            "curve), NAME.resume.pt (updated every epoch, read by --resume). Target embeddings of the "
            "descriptions are cached per model weights and reused by later runs.\n\n"
            "Classes: without --classes, every class of the description file, in file order. With --classes, "
            "those names (matched case-insensitively, '_' as space), which the prompts then use; descriptions of "
            "other classes are dropped (listed), selected classes without descriptions are listed in a warning. "
            "--split base|novel takes the first ceil(n/2) / the remaining --classes names (CoOp's base-to-novel "
            "convention), so --classes must be in label order, e.g. ../shared/classnames/dtd.json or a CoOp "
            "split_zhou_*.json.\n\n"
            f"Presets: {', '.join(PRESETS)}."
        ),
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--descriptions", required=True, metavar="FILE.jsonl",
        help="description file written by 'python -m protext.gen_descriptions' (or its 'import' of a CuPL JSON)",
    )
    data.add_argument(
        "--classes", metavar="FILE",
        help="train on these classes only: a .txt (one name per line), a .json list, or a CoOp split_zhou_*.json "
        "(names in label order) [every class of the description file]",
    )
    data.add_argument(
        "--split", choices=("all", "base", "novel"),
        help="base = first ceil(n/2) classes of --classes, novel = the rest (needs --classes in label order) "
        "[base for base2novel/* presets, else all]",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip architecture, e.g. ViT-B-16, ViT-L-14, tiny-clip [ViT-B-16]")
    model.add_argument(
        "--pretrained", default="openai",
        help="open_clip tag, a local weights file (OpenAI .pt or open_clip state dict), or 'random' (tests only) "
        "[openai]",
    )
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: cuda when available [auto]")
    model.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="autocast dtype for the text tower; prompts and optimiser stay fp32; fp16 needs CUDA and adds a "
        "gradient scaler [fp32]",
    )
    hyper = parser.add_argument_group("hyper-parameters (default: the preset's; see PRESETS.md)")
    hyper.add_argument(
        "--preset", choices=list(PRESETS), metavar="NAME",
        help=f"published setting: cross_dataset, text_only/<dataset>, base2novel/<dataset>; "
        f"without it n_ctx, lr and epochs come from {DEFAULT_PRESET}",
    )
    hyper.add_argument("--n-ctx", type=int, help="context vectors (token positions 1..n_ctx)")
    hyper.add_argument("--depth", type=int, help="prompt depth: 1 = shallow (CoOp); blocks 1..depth-1 get deep prompts [9]")
    hyper.add_argument(
        "--ctx-init",
        help="init phrase for n_ctx <= 4 ['a photo of a']; 'none' for random N(0, 0.02^2) context",
    )
    hyper.add_argument("--lr", type=float, help="base learning rate of the cosine schedule")
    hyper.add_argument("--epochs", type=int, help="total epochs, warm-up included")
    hyper.add_argument("--warmup-epochs", type=int, help="epochs at the constant warm-up rate 1e-5 [5]")
    hyper.add_argument("--batch-size", type=int, help="(class, description) pairs per step [256]")
    hyper.add_argument("--loss", choices=("mse", "l1"), help="loss on normalised features [mse]")
    hyper.add_argument("--loss-weight", type=float, help="loss factor [1000 for mse, 1 for l1, as published]")
    hyper.add_argument("--seed", type=int, default=1, help="seeds prompt initialisation and per-epoch shuffling [1]")
    hyper.add_argument(
        "--keep-last-batch", action="store_true",
        help="train on the last incomplete batch of each epoch too (the published loader drops it)",
    )
    out = parser.add_argument_group("output and run control")
    out.add_argument(
        "--out", metavar="checkpoints/NAME.safetensors",
        help="checkpoint path [checkpoints/<descriptions file name>.safetensors]",
    )
    out.add_argument("--resume", action="store_true", help="continue the run saved beside --out (NAME.resume.pt)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out and start afresh")
    out.add_argument(
        "--naive", action="store_true",
        help="reference path: per-sample prompts and targets at full 77 tokens (same math, much slower)",
    )
    out.add_argument(
        "--no-shared-prefix", action="store_true",
        help="fast path without computing the prompts' shared start (start of text + context) once per batch; "
        "same results, slower (for comparisons)",
    )
    out.add_argument(
        "--cache-dir",
        help="target embedding cache directory [$PROTEXT_TARGET_CACHE, else ~/.cache/protext/targets]",
    )
    out.add_argument("--no-cache", action="store_true", help="compute description targets without the disk cache")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@dataclass
class RunSettings:
    """Everything a run needs, resolved from the preset and the command-line overrides."""

    config: TrainConfig
    n_ctx: int
    depth: int
    ctx_init: Optional[str]
    template: str
    split: str
    preset: Optional[str]
    preset_values: dict[str, Any] = field(default_factory=dict)


def resolve_settings(args: argparse.Namespace) -> RunSettings:
    """Preset values, overridden by every flag given."""
    preset: Preset = get_preset(args.preset or DEFAULT_PRESET)

    def pick(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    ctx_init = pick(args.ctx_init, preset.ctx_init)
    if ctx_init is not None and ctx_init.strip().lower() in ("", "none"):
        ctx_init = None
    split = args.split or (preset.split if args.preset else "all")
    n_ctx = pick(args.n_ctx, preset.n_ctx)
    depth = pick(args.depth, preset.depth)
    if n_ctx < 1:
        raise CliError(f"--n-ctx must be at least 1, got {n_ctx}.")
    if depth < 1:
        raise CliError(f"--depth must be at least 1, got {depth}.")
    try:
        config = TrainConfig(
            lr=pick(args.lr, preset.lr),
            epochs=pick(args.epochs, preset.epochs),
            warmup_epochs=pick(args.warmup_epochs, preset.warmup_epochs),
            warmup_lr=preset.warmup_lr,
            batch_size=pick(args.batch_size, preset.batch_size),
            loss=pick(args.loss, preset.loss),
            loss_weight=args.loss_weight if args.loss_weight is not None else (None if args.loss else preset.loss_weight),
            betas=preset.betas,
            weight_decay=preset.weight_decay,
            seed=args.seed,
            precision=args.precision,
            naive=args.naive,
            shared_prefix=not args.no_shared_prefix,
            drop_last=not args.keep_last_batch,
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    return RunSettings(config, n_ctx, depth, ctx_init, preset.template, split, args.preset, preset.as_dict() if args.preset else {})


# --------------------------------------------------------------------------------------------------
# classes


_WNID_LINE = re.compile(r"^n\d{8}\s+(.+)$")


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a ``.txt``, a ``.json`` list, or a CoOp ``split_zhou`` JSON (in label order)."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--classes {path}: no such file.")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CliError(f"--classes {path}: not valid JSON ({err}).") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            names = [x.strip() for x in data]
        elif isinstance(data, dict) and any(k in data for k in ("train", "val", "test")):
            names = _split_file_classes(path, data)
        else:
            raise CliError(
                f"--classes {path}: expected a JSON list of class names or a CoOp split file "
                '({"train": [[path, label, classname], ...], ...}).'
            )
    else:
        names = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            wnid = _WNID_LINE.match(line)
            names.append(wnid.group(1).strip() if wnid else line)
    if not names or not all(names):
        raise CliError(f"--classes {path}: no class names (or an empty one) in the file.")
    return names


def _split_file_classes(path: Path, data: dict) -> list[str]:
    by_label: dict[int, str] = {}
    for part in ("train", "val", "test"):
        for item in data.get(part) or []:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], int) and isinstance(item[2], str)):
                raise CliError(f"--classes {path}: '{part}' entries must be [relative path, label, classname]; got {item!r}.")
            label, name = item[1], item[2]
            if by_label.setdefault(label, name) != name:
                raise CliError(f"--classes {path}: label {label} is named both '{by_label[label]}' and '{name}'.")
    if sorted(by_label) != list(range(len(by_label))):
        raise CliError(f"--classes {path}: labels are not 0..{len(by_label) - 1} without gaps.")
    return [by_label[i] for i in range(len(by_label))]


def apply_split(names: list[str], split: str) -> list[str]:
    """``base``: the first ``ceil(n/2)`` names; ``novel``: the rest; ``all``: every name."""
    half = math.ceil(len(names) / 2)
    return names[:half] if split == "base" else names[half:] if split == "novel" else names


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


@dataclass
class ClassSelection:
    """Descriptions keyed by the class names the prompts will use, and what was left out."""

    descriptions: dict[str, list[str]]
    missing: list[str]  # selected classes with no description
    dropped: list[str]  # description classes not selected
    merged: list[str]  # duplicate selected names merged


def select_classes(descriptions: dict[str, list[str]], wanted: Optional[list[str]]) -> ClassSelection:
    """Match the wanted class names to the description file's classes."""
    if wanted is None:
        return ClassSelection(descriptions, [], [], [])
    unique: dict[str, str] = {}
    merged = []
    for name in wanted:
        key = normalize_classname(name)
        if key in unique:
            merged.append(name)
        else:
            unique[key] = name
    match = match_classnames(list(descriptions), list(unique.values()))
    selected = {name: descriptions[match.mapping[name]] for name in unique.values() if name in match.mapping}
    return ClassSelection(selected, match.missing, match.unused, merged)


# --------------------------------------------------------------------------------------------------
# outputs


def side_paths(out: Path) -> dict[str, Path]:
    """The files written beside a checkpoint."""
    stem = out.with_suffix("")
    return {
        "history": Path(f"{stem}.loss.json"),
        "plot": Path(f"{stem}.loss.png"),
        "state": Path(f"{stem}.resume.pt"),
    }


def write_history(path: Path, history: list[EpochRecord], status: str, extra: dict[str, Any]) -> None:
    """The loss history as JSON: per-epoch loss and rate, and every step's loss."""
    payload = {
        "status": status,
        **extra,
        "epochs": [
            {"epoch": r.epoch + 1, "lr": r.lr, "loss": r.loss, "steps": r.steps, "seconds": round(r.seconds, 3)}
            for r in history
        ],
        "step_losses": [r.step_losses for r in history],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def plot_history(path: Path, history: list[EpochRecord], title: str) -> None:
    """A loss-curve PNG: every step's loss, epoch means, and the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    xs, ys = [], []
    for r in history:
        xs += [r.epoch + (i + 1) / r.steps for i in range(r.steps)]
        ys += r.step_losses
    ax.plot(xs, ys, lw=0.8, alpha=0.6, label="step loss")
    ax.plot([r.epoch + 1 for r in history], [r.loss for r in history], "o-", ms=3, label="epoch mean")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    lr_ax = ax.twinx()
    if history:
        edges = [r.epoch for r in history] + [history[-1].epoch + 1]
        rates = [r.lr for r in history] + [history[-1].lr]
        lr_ax.step(edges, rates, where="post", color="gray", lw=0.8)
    lr_ax.set_ylabel("learning rate", color="gray")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# main


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device '{name}': not a torch device (cpu, cuda, cuda:N, auto).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"warning: {message}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input, 3 the loss became NaN)."""
    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # one readable line per warning, not a source location
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=ResourceWarning)
            return _run(args)
    except CliError as err:
        _say(f"error: {err}")
        return EXIT_BAD_INPUT
    finally:
        warnings.showwarning = shown


def _run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    config = settings.config
    desc_path = Path(args.descriptions)
    out = Path(args.out) if args.out else Path("checkpoints") / f"{desc_path.stem}.safetensors"
    if out.suffix != ".safetensors":
        raise CliError(f"--out {out}: a checkpoint path must end in .safetensors.")
    paths = side_paths(out)
    resuming = args.resume and paths["state"].is_file()
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other; pick one.")
    if out.exists() and not resuming and not args.overwrite:
        hint = "" if not args.resume else f" (no resume state {paths['state'].name} beside it)"
        raise CliError(f"--out {out} already exists{hint}; pass --resume to continue that run or --overwrite to replace it.")
    device = _resolve_device(args.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise CliError("--precision fp16 needs CUDA (gradient-scaled fp16 autocast); use bf16 or fp32 on CPU.")

    # descriptions and classes
    try:
        descriptions = read_descriptions(desc_path)
    except FileNotFoundError:
        raise CliError(f"--descriptions {desc_path}: no such file.") from None
    except (DescriptionFileError, IsADirectoryError) as err:
        raise CliError(f"--descriptions {err}") from None
    if not descriptions:
        raise CliError(
            f"--descriptions {desc_path}: the file holds no descriptions. Generate some with "
            "'python -m protext.gen_descriptions' or import a CuPL JSON with "
            "'python -m protext.gen_descriptions import FILE.json --out FILE.jsonl'."
        )
    if settings.split != "all" and not args.classes:
        raise CliError(
            f"--split {settings.split} needs --classes with the dataset's class names in label order "
            "(e.g. ../shared/classnames/dtd.json or a CoOp split_zhou_*.json); the description file's "
            "own class order is not the label order."
        )
    wanted = apply_split(read_class_list(args.classes), settings.split) if args.classes else None
    selection = select_classes(descriptions, wanted)
    if selection.merged:
        _say(f"note: {len(selection.merged)} duplicate class names in --classes merged: {_listing(selection.merged)}")
    if selection.dropped:
        n_texts = sum(len(descriptions[c]) for c in selection.dropped)
        _say(
            f"note: {len(selection.dropped)} classes of {desc_path} are not among the selected classes "
            f"(--classes{'/--split' if settings.split != 'all' else ''}); their {n_texts} descriptions are dropped: "
            f"{_listing(selection.dropped)}"
        )
    if selection.missing:
        warnings.warn(
            f"{len(selection.missing)} selected classes have no descriptions in {desc_path} and are not trained on: "
            f"{_listing(selection.missing)}",
            stacklevel=1,
        )
    if not selection.descriptions:
        raise CliError(f"none of the selected classes has descriptions in {desc_path}; nothing to train on.")
    pairs = TextPairs.from_descriptions(selection.descriptions)
    _say(f"{len(pairs)} descriptions of {len(pairs.classnames)} classes from {desc_path}")

    # model and prompts
    try:
        clip = load_clip(args.model, args.pretrained, device=device)
    except (PretrainedUnavailableError, FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    try:
        tower = text_tower(clip.model)
    except UnsupportedTextTowerError as err:
        raise CliError(f"--model {args.model}: {err}") from None
    if settings.depth > tower.depth:
        raise CliError(
            f"--depth {settings.depth}: {clip.name}'s text tower has only {tower.depth} blocks; "
            f"pass --depth {tower.depth} or less."
        )
    torch.manual_seed(config.seed)  # the prompt initialisation, identical on resume
    try:
        encoder = PromptedTextEncoder(
            clip.model, clip.tokenizer, pairs.classnames, settings.n_ctx, settings.depth, settings.ctx_init, settings.template
        )
    except ValueError as err:
        raise CliError(str(err)) from None

    # targets (fast) or tokens (naive); each reports over-long descriptions once
    labels = [pairs.classnames[i] for i in pairs.class_index.tolist()]
    targets = tokens = None
    if config.naive:
        tokenized = tokenize_descriptions(clip.tokenizer, pairs.texts, tower.context_length)
        warn_truncated(pairs.texts, tokenized.truncated, tower.context_length, labels)
        tokens = tokenized.tokens
    else:
        try:
            targets, stats = description_targets(
                clip.model, clip.tokenizer, pairs.texts, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                progress=not args.quiet, labels=labels,
            )
        except TargetCacheError as err:
            raise CliError(str(err)) from None
        where = f" (cache {stats.cache_file})" if stats.cache_file else ""
        _say(f"targets: {stats.unique} distinct descriptions, {stats.cached} cached, {stats.computed} encoded{where}")

    meta_base = {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "text_tower_fingerprint": text_fingerprint(clip.model),
        "classes": pairs.classnames,
        "classes_without_descriptions": selection.missing,
        "split": settings.split,
        "classes_file": str(args.classes) if args.classes else None,
        "preset": settings.preset,
        "preset_values": settings.preset_values,
        "hyperparameters": {
            **config.as_dict(),
            "n_ctx": settings.n_ctx,
            "depth": settings.depth,
            "ctx_init": encoder.ctx_init,
            "template": encoder.template,
            "device": str(device),
        },
        "descriptions": str(desc_path),
        "descriptions_sha256": file_sha256(desc_path),
        "samples": len(pairs),
        "protext_version": __version__,
    }
    written: list[int] = []

    def save_epoch(record: EpochRecord, enc: PromptedTextEncoder, history: list[EpochRecord]) -> None:
        done = record.epoch + 1
        meta = {**meta_base, "epochs_done": done, "complete": done == config.epochs, "final_loss": record.loss}
        save_prompts(out, enc, meta)
        written.append(done)

    mode = "resuming" if resuming else "training"
    _say(
        f"{mode}: {clip.identity}, n_ctx {settings.n_ctx}, depth {settings.depth}, {config.epochs} epochs, "
        f"lr {config.lr}, batch {config.batch_size}, {config.loss} x {config.weight:g}, "
        f"{'naive' if config.naive else 'fast'} path, {device}/{config.precision} -> {out}"
    )
    title = f"{out.name}: {clip.identity}, n_ctx {settings.n_ctx}, depth {settings.depth}, lr {config.lr}"
    extra = {"checkpoint": str(out), "descriptions": str(desc_path)}
    began = time.perf_counter()
    try:
        result = train(
            encoder, pairs, config, targets=targets, tokens=tokens, state_path=paths["state"],
            resume=args.resume, on_epoch_end=save_epoch, progress=not args.quiet,
        )
    except ResumeStateError as err:
        raise CliError(f"--resume: {err} Start afresh with --overwrite.") from None
    except NonFiniteLossError as err:
        status = f"stopped: loss {err.value} at epoch {err.epoch + 1}, step {err.step + 1}"
        if err.history:
            write_history(paths["history"], err.history, status, extra)
            plot_history(paths["plot"], err.history, title)
        if err.history and (written or resuming):
            kept = f"The last good checkpoint (after epoch {err.history[-1].epoch + 1}, loss {err.history[-1].loss:.6g}) is kept at {out}."
        elif out.exists():
            kept = f"No epoch finished, so nothing was saved; {out} is left as it was."
        else:
            kept = "No epoch finished, so no checkpoint was written."
        hint = "a lower --lr" + (" or --precision fp32" if config.precision != "fp32" else "")
        _say(f"error: {err}; training stopped. {kept} Try {hint}.")
        return EXIT_NAN

    if not written and result.epochs_done:  # a resumed run that had already finished
        save_epoch(result.history[-1], encoder, result.history)
    write_history(paths["history"], result.history, "complete", {**extra, "final_loss": result.final_loss})
    plot_history(paths["plot"], result.history, title)
    elapsed = time.perf_counter() - began
    _say(
        f"done: {result.epochs_done} epochs (resumed after {result.resumed_from}) in {elapsed:.1f}s, "
        f"final loss {result.final_loss:.6g}; wrote {out}, {paths['history'].name}, {paths['plot'].name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
