"""``python -m protext.eval``: zero-shot accuracy of CLIP, CuPL or learned prompts, with optional TPT.

Examples::

    # CLIP with the dataset's template, on the novel half of DTD
    python -m protext.eval --dataset dtd --root data --split novel --method clip

    # learned prompts, then TPT initialised from them, sharded over 4 processes
    torchrun --nproc_per_node 4 -m protext.eval --dataset oxford_pets --root data \\
        --method prompts --prompts checkpoints/imagenet_cross.safetensors --tpt

The CLI is a thin layer: flags become an :class:`EvalConfig`; the class features come from
:mod:`protext.zeroshot`, TPT from :mod:`protext.tpt`, metrics and files from :mod:`protext.results`.
User errors (missing files, bad layouts, mismatched checkpoints) end with one ``error:`` line and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .checkpoint import CheckpointError, PromptCheckpoint, load_coop, load_prompts
from .descriptions import DescriptionFileError, load_cupl_json, read_descriptions
from .distributed import DistContext, gather, init_distributed, shard, shutdown
from .models import PretrainedUnavailableError, load_clip
from .prompts import PromptShapeError
from .results import (
    Prediction,
    compute_metrics,
    markdown_table,
    merge_predictions,
    metrics_dict,
    predictions_from_logits,
    predictions_table,
    write_json,
)
from .text_tower import UnsupportedTextTowerError
from .tpt import TPT_INITS, TPT_TUNE, PromptTuner, TPTConfig, checkpoint_encoder, handcrafted_encoder, image_generator
from .zeroshot import (
    METHODS,
    ZeroShotError,
    clip_text_features,
    cupl_text_features,
    ImageEncoder,
    logit_scale,
    prompt_text_features,
    zeroshot_logits,
)

SPLITS = ("all", "base", "novel")
PRECISIONS = ("auto", "fp32", "amp", "bf16")
COOP_SUFFIXES = (".pth", ".pt", ".tar")


class EvalError(ValueError):
    """An inconsistent combination of flags."""


@dataclass
class EvalConfig:
    """Everything a run depends on; written into the results JSON as ``settings``."""

    dataset: str
    root: str
    split: str = "all"
    classnames: Optional[str] = None
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "auto"
    method: str = "clip"
    template: Optional[str] = None
    descriptions: Optional[str] = None
    prompts: Optional[str] = None
    tpt: bool = False
    tpt_views: int = 64
    tpt_selection: float = 0.1
    tpt_steps: int = 1
    tpt_lr: float = 5e-3
    tpt_init: Optional[str] = None
    tpt_tune: str = "all"
    tpt_naive: bool = False
    batch_size: int = 64
    workers: int = 2
    limit: Optional[int] = None
    seed: int = 0
    out: Optional[str] = None
    save_logits: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Reject flag combinations that cannot mean anything, naming the flags."""
        if self.method not in METHODS:
            raise EvalError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'.")
        if self.split not in SPLITS:
            raise EvalError(f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'.")
        if self.precision not in PRECISIONS:
            raise EvalError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        if self.method == "cupl" and not self.descriptions:
            raise EvalError("--method cupl needs --descriptions FILE (.jsonl description cache or CuPL .json).")
        if self.method == "prompts" and not self.prompts:
            raise EvalError("--method prompts needs --prompts CHECKPOINT (.safetensors, or a CoOp .pth).")
        if self.batch_size < 1 or self.workers < 0:
            raise EvalError("--batch-size must be >= 1 and --workers >= 0.")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit}.")
        if self.tpt:
            init = self.resolved_tpt_init()
            if init not in TPT_INITS:
                raise EvalError(f"--tpt-init must be one of {', '.join(TPT_INITS)}, got '{init}'.")
            if init in ("prompts", "coop") and not self.prompts:
                raise EvalError(f"--tpt-init {init} needs --prompts CHECKPOINT to start from.")
            if self.tpt_tune not in TPT_TUNE:
                raise EvalError(f"--tpt-tune must be one of {', '.join(TPT_TUNE)}, got '{self.tpt_tune}'.")

    def resolved_tpt_init(self) -> str:
        """``--tpt-init``, or what ``--method`` implies: clip → handcrafted, prompts → the checkpoint."""
        if self.tpt_init:
            return self.tpt_init
        if self.method == "clip":
            return "handcrafted"
        if self.method == "prompts":
            return "coop" if Path(self.prompts or "").suffix in COOP_SUFFIXES else "prompts"
        raise EvalError(
            "--tpt tunes prompt vectors, and --method cupl has none (its classes are averaged "
            "description features). Use --method clip or --method prompts with --tpt, or pass --tpt-init."
        )

    def output_path(self) -> Path:
        if self.out:
            return Path(self.out)
        tag = f"{self.method}-tpt" if self.tpt else self.method
        return Path("results") / f"{self.dataset}-{self.split}-{tag}.json"


# --------------------------------------------------------------------------------------------------
# flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.eval",
        description=(
            "Zero-shot top-1/top-5 accuracy of CLIP with a template (clip), an ensemble of class "
            "descriptions (cupl) or learned prompts (prompts), optionally with test-time prompt tuning "
            "(--tpt). Run under `torchrun --nproc_per_node N -m protext.eval ...` to shard the images."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help=_dataset_help())
    data.add_argument("--root", required=True, help="Folder holding the dataset (CoOp/Dassl or TPT layout), or the image folder itself for --dataset folder.")
    data.add_argument("--split", default="all", choices=SPLITS, help="Classes to test on: all, base (first ceil(n/2) labels) or novel (the rest). Always the test images.")
    data.add_argument("--classnames", default=None, metavar="FILE", help="Class-name file overriding the names from the split file or folders (JSON list or one name per line).")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="Evaluate only the first N images (in dataset order), for smoke runs.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip architecture (ViT-B-16, ViT-L-14, tiny-clip, ...).")
    model.add_argument("--pretrained", default="openai", help="open_clip tag, a local weights file, or 'random' (smoke tests only).")
    model.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK.")
    model.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="fp32; amp (CUDA: fp16 autocast, and for TPT a gradient scaler with initial scale 1000, as published); "
        "bf16 (image encoding with a bfloat16 copy of the image tower; text and prompts fp32); auto = amp on CUDA, fp32 on CPU.",
    )

    method = parser.add_argument_group("class features")
    method.add_argument("--method", default="clip", choices=METHODS, help="clip: one template; cupl: mean of description features; prompts: learned context (and deep prompts) from --prompts.")
    method.add_argument("--template", default=None, help="Prompt template with {} for the class name. Default: the dataset's template (PRESETS.md); for learned prompts trained on this very dataset (checkpoint preset text_only/NAME or base2novel/NAME) the checkpoint's own template, as ProText evaluates in-domain.")
    method.add_argument("--descriptions", default=None, metavar="FILE", help="For --method cupl: a protext description cache (.jsonl) or a CuPL JSON file {class: [descriptions]}.")
    method.add_argument("--prompts", default=None, metavar="CKPT", help="Learned prompts: a protext .safetensors checkpoint, or a CoOp/TPT .pth ({'state_dict': {'ctx': ...}}).")

    tpt = parser.add_argument_group("test-time prompt tuning")
    tpt.add_argument("--tpt", action="store_true", help="Tune the prompts on each test image's views before predicting it (TPT), resetting them after every image.")
    tpt.add_argument("--tpt-views", type=int, default=64, help="Views per image, the image itself included (AugMix for fine-grained datasets, crops and flips for ImageNet).")
    tpt.add_argument("--tpt-selection", type=float, default=0.1, help="Fraction of the views of lowest entropy kept for the loss (int(views * fraction)).")
    tpt.add_argument("--tpt-steps", type=int, default=1, help="AdamW steps per image (0: no tuning, the prediction of view 0).")
    tpt.add_argument("--tpt-lr", type=float, default=5e-3, help="AdamW learning rate (other AdamW settings are PyTorch's defaults).")
    tpt.add_argument("--tpt-init", default=None, choices=TPT_INITS, help="Prompts TPT starts from: handcrafted ('a photo of a', 4 tokens), prompts (a ProText checkpoint: context and deep prompts) or coop (a CoOp .pth: context). Default: from --method.")
    tpt.add_argument("--tpt-tune", default="all", choices=TPT_TUNE, help="Which vectors TPT tunes: all (context and deep prompts) or shallow (context only).")
    tpt.add_argument("--tpt-naive", action="store_true", help="Use the slow reference implementation (views re-encoded each step, full 77-token text); for checks only.")

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="Images per batch for the methods without TPT (TPT takes one image at a time).")
    run.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images and making views.")
    run.add_argument("--seed", type=int, default=0, help="Seed of the random model (--pretrained random) and of every image's TPT views (keyed by seed and image index).")
    run.add_argument("--out", default=None, metavar="FILE", help="Results JSON. Default: results/DATASET-SPLIT-METHOD[-tpt].json.")
    run.add_argument("--save-logits", action="store_true", help="Also store every image's logits in the JSON (large: images x classes numbers; for checks).")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show a progress bar with the running top-1 (rank 0 only; its own shard when sharded).")
    return parser


def _dataset_help() -> str:
    try:
        from .datasets import DATASET_NAMES

        names = ", ".join(DATASET_NAMES)
    except ImportError:  # the help must work even if the data module is broken
        names = "see protext.datasets"
    return f"Dataset name: {names}; 'folder' for a plain image folder (one sub-folder per class)."


def parse_config(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    """Flags -> validated :class:`EvalConfig` (argparse exits with code 2 on malformed flags)."""
    args = build_parser().parse_args(argv)
    return EvalConfig(**vars(args))


# --------------------------------------------------------------------------------------------------
# pieces of a run


@dataclass
class Runtime:
    """Resolved device and numeric settings."""

    device: torch.device
    precision: str
    image_dtype: Optional[torch.dtype]
    amp: bool


def resolve_runtime(cfg: EvalConfig, ctx: DistContext) -> Runtime:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {cfg.device}: CUDA is not available on this machine.")
        if ctx.active or device.index is None:
            device = torch.device("cuda", ctx.local_rank if ctx.active else torch.cuda.current_device())
    precision = cfg.precision
    if precision == "auto":
        precision = "amp" if device.type == "cuda" else "fp32"
    if precision == "amp" and device.type != "cuda":
        raise EvalError("--precision amp (fp16 autocast with a gradient scaler) needs CUDA; use fp32 or bf16 on the CPU.")
    image_dtype = {"fp32": None, "amp": torch.float16, "bf16": torch.bfloat16}[precision]
    return Runtime(device, precision, image_dtype, precision == "amp")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: the identity of a checkpoint or description file in the results."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def checkpoint_identity(path: str, checkpoint: PromptCheckpoint) -> dict[str, Any]:
    # class lists can hold a thousand names: count them instead of copying them into every result
    meta = {k: v for k, v in checkpoint.meta.items() if k not in ("classnames", "classes") and _jsonable(v)}
    if isinstance(checkpoint.meta.get("classes"), list):
        meta["n_classes"] = len(checkpoint.meta["classes"])
    return {
        "path": str(path),
        "sha256": file_digest(path),
        "n_ctx": checkpoint.n_ctx,
        "depth": checkpoint.depth,
        "width": checkpoint.width,
        "meta": meta,
    }


def load_checkpoint(cfg: EvalConfig) -> Optional[PromptCheckpoint]:
    """The checkpoint ``--prompts`` names, read in the format the TPT init or the suffix asks for."""
    if not cfg.prompts:
        return None
    coop = (cfg.tpt and cfg.resolved_tpt_init() == "coop") or Path(cfg.prompts).suffix in COOP_SUFFIXES
    return load_coop(cfg.prompts) if coop else load_prompts(cfg.prompts)


def resolve_template(
    cfg: EvalConfig, dataset_name: str, dataset_template: str, checkpoint: Optional[PromptCheckpoint], uses_checkpoint: bool
) -> tuple[str, str]:
    """(template, where it came from). ``--template`` wins; prompts evaluated on the dataset they
    were trained on keep their training template; everything else uses the dataset's template."""
    if cfg.template:
        return cfg.template, "--template"
    if uses_checkpoint and checkpoint is not None:
        trained_on = training_dataset(checkpoint.meta)
        if trained_on and trained_on in (cfg.dataset, dataset_name) and checkpoint.meta.get("template"):
            return str(checkpoint.meta["template"]), "checkpoint (same dataset)"
    return dataset_template, "dataset"


def training_dataset(meta: dict[str, Any]) -> Optional[str]:
    """The dataset a checkpoint's prompts were learned for, from its metadata (None if unknown).

    protext training records its preset (``text_only/dtd``, ``base2novel/dtd``, ``cross_dataset``)
    and the preset's values, which name the dataset.
    """
    if meta.get("dataset"):
        return str(meta["dataset"])
    values = meta.get("preset_values")
    if isinstance(values, dict) and values.get("dataset"):
        return str(values["dataset"])
    preset = meta.get("preset")
    if isinstance(preset, str) and "/" in preset:
        return preset.rsplit("/", 1)[1]
    return None


def read_description_source(path: str) -> dict[str, list[str]]:
    if Path(path).suffix == ".json":
        return load_cupl_json(path)
    return read_descriptions(path)


class _Indexed(Dataset):
    """Images of ``indices`` with their label and dataset index, each through ``make(image, index)``.

    A bad image does not raise here: inside a DataLoader worker the exception would come back
    wrapped in the worker's traceback. Its message travels as data instead and the main process
    raises it cleanly (see :func:`_collate`).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], make) -> None:
        self.base, self.indices, self.make = base, list(indices), make

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label = self.base[index]
        except _data_errors() as err:
            return None, -1, index, str(err)
        return self.make(image, index), label, index, ""


class _Preprocess:
    """The model's eval transform (picklable for worker processes)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image, index: int) -> torch.Tensor:
        return self.transform(image)


class _ViewMaker:
    """TPT views of one image, drawn from that image's own random stream (seed, dataset index)."""

    def __init__(self, views, seed: int) -> None:
        self.views, self.seed = views, seed

    def __call__(self, image, index: int) -> torch.Tensor:
        return self.views(image, generator=image_generator(self.seed, index))


def _collate(items):
    """Stack a batch, or pass on the first unreadable image's message."""
    for _, _, _, error in items:
        if error:
            return error
    tensors, labels, indices, _ = zip(*items)
    return torch.stack(tensors), list(labels), list(indices)


def _batches(loader: DataLoader):
    for batch in loader:
        if isinstance(batch, str):
            from .datasets import DatasetError

            raise DatasetError(batch)
        yield batch


def _data_errors() -> tuple[type[BaseException], ...]:
    from .datasets import DatasetError

    return (DatasetError, OSError)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class ShardResult:
    """What one rank sends to rank 0."""

    predictions: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0
    tpt_timings: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


def _evaluate_shard(cfg: EvalConfig, ctx: DistContext, rt: Runtime, state: dict[str, Any]) -> ShardResult:
    """Build everything this rank needs and predict its share of the images."""
    from .datasets import DatasetError, build_dataset, dataset_template

    try:
        dataset = build_dataset(cfg.dataset, cfg.root, split="test", subset=cfg.split, classnames_file=cfg.classnames)
    except DatasetError:
        raise
    except ValueError as err:  # an unknown dataset name
        raise EvalError(f"--dataset: {err}") from None
    classnames = list(dataset.classnames)
    n_images = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    indices = shard(range(n_images), ctx)
    state.update(classnames=classnames, n_dataset_images=len(dataset), n_images=n_images, dataset_name=dataset.name)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        try:
            clip = load_clip(cfg.model, cfg.pretrained, device=rt.device, precision="fp32", seed=cfg.seed)
        except ValueError as err:
            raise EvalError(str(err)) from None
    state["model"] = {"name": clip.name, "pretrained": clip.pretrained, "identity": clip.identity}

    checkpoint = load_checkpoint(cfg)
    if checkpoint is not None:
        state["checkpoint"] = checkpoint_identity(cfg.prompts, checkpoint)
    uses_checkpoint = cfg.method == "prompts" or (cfg.tpt and cfg.resolved_tpt_init() in ("prompts", "coop"))
    template, source = resolve_template(cfg, dataset.name, dataset_template(dataset.name), checkpoint, uses_checkpoint)
    state["template"] = {"template": template, "source": source}

    start = time.perf_counter()
    if cfg.tpt:
        result = _tpt_shard(cfg, ctx, rt, clip, dataset, indices, classnames, template, checkpoint)
    else:
        result = _zeroshot_shard(cfg, ctx, rt, clip, dataset, indices, classnames, template, checkpoint, state)
    result.seconds = time.perf_counter() - start
    return result


def _zeroshot_shard(cfg, ctx, rt, clip, dataset, indices, classnames, template, checkpoint, state) -> ShardResult:
    model, tokenizer = clip.model, clip.tokenizer
    if cfg.method == "clip":
        text = clip_text_features(model, tokenizer, classnames, template)
    elif cfg.method == "cupl":
        descriptions = read_description_source(cfg.descriptions)
        state["descriptions"] = {"path": cfg.descriptions, "sha256": file_digest(cfg.descriptions)}
        text = cupl_text_features(model, tokenizer, classnames, descriptions, source=cfg.descriptions)
    else:
        text = prompt_text_features(checkpoint_encoder(checkpoint, model, tokenizer, classnames, template))
    scale = logit_scale(model).to(rt.device)
    image_encoder = ImageEncoder(model, rt.image_dtype)

    data = _Indexed(dataset, indices, _Preprocess(clip.preprocess))
    loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False, collate_fn=_collate)
    result = ShardResult()
    right = 0
    with _progress(len(indices), cfg.progress and ctx.is_main, f"{dataset.name} {cfg.method}") as bar:
        for images, labels, idx in _batches(loader):
            feats = image_encoder(images)
            logits = zeroshot_logits(feats, text, scale).cpu()
            batch = predictions_from_logits(idx, labels, logits, keep_logits=cfg.save_logits)
            result.predictions += batch
            right += sum(p.pred == p.label for p in batch)
            bar.update(len(batch))
            bar.set_postfix(top1=f"{100.0 * right / len(result.predictions):.2f}")
    return result


def _tpt_shard(cfg, ctx, rt, clip, dataset, indices, classnames, template, checkpoint) -> ShardResult:
    from .views import view_transform_for

    model, tokenizer = clip.model, clip.tokenizer
    if cfg.resolved_tpt_init() == "handcrafted":
        encoder = handcrafted_encoder(model, tokenizer, classnames, template)
    else:
        encoder = checkpoint_encoder(checkpoint, model, tokenizer, classnames, template)
    config = TPTConfig(
        n_views=cfg.tpt_views,
        selection=cfg.tpt_selection,
        steps=cfg.tpt_steps,
        lr=cfg.tpt_lr,
        tune=cfg.tpt_tune,
        naive=cfg.tpt_naive,
        amp=rt.amp,
        image_dtype=rt.image_dtype,
    )
    tuner = PromptTuner(model, encoder, config)
    size = model.visual.image_size
    resolution = size[0] if isinstance(size, (tuple, list)) else int(size)
    views = view_transform_for(dataset.name, n_views=cfg.tpt_views, resolution=resolution)
    data = _Indexed(dataset, indices, _ViewMaker(views, cfg.seed))
    loader = DataLoader(data, batch_size=1, num_workers=cfg.workers, shuffle=False, collate_fn=_collate)

    result = ShardResult()
    right = 0
    with _progress(len(indices), cfg.progress and ctx.is_main, f"{dataset.name} TPT") as bar:
        for image_views, (label,), (index,) in _batches(loader):
            out = tuner.adapt(image_views[0])
            for phase, seconds in out.timings.items():
                result.tpt_timings[phase] = result.tpt_timings.get(phase, 0.0) + seconds
            (prediction,) = predictions_from_logits([int(index)], [int(label)], out.logits[None], keep_logits=cfg.save_logits)
            result.predictions.append(prediction)
            right += int(prediction.pred == prediction.label)
            bar.update(1)
            bar.set_postfix(top1=f"{100.0 * right / len(result.predictions):.2f}")
    return result


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, reported as one line instead of a traceback."""
    errors: list[type[BaseException]] = [
        EvalError,
        CheckpointError,
        PromptShapeError,
        ZeroShotError,
        DescriptionFileError,
        PretrainedUnavailableError,
        UnsupportedTextTowerError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ]
    try:
        from .datasets import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def run(cfg: EvalConfig, ctx: DistContext, argv: Optional[Sequence[str]] = None) -> tuple[Optional[dict[str, Any]], list[str]]:
    """Evaluate on every rank and merge on all of them: (results payload, error messages)."""
    wall_start = time.perf_counter()
    state: dict[str, Any] = {}
    try:
        cfg.validate()
        rt = resolve_runtime(cfg, ctx)
        result = _evaluate_shard(cfg, ctx, rt, state)
    except _user_errors() as err:
        # every rank still joins the gather below, so no rank is left waiting for a failed one
        rt = None
        result = ShardResult(error=str(err) or type(err).__name__)
    parts: list[ShardResult] = gather(result, ctx)
    errors = list(dict.fromkeys(p.error for p in parts if p.error))
    if errors or rt is None:
        return None, errors

    predictions = merge_predictions(p.predictions for p in parts)
    metrics = compute_metrics(predictions, state["classnames"])
    eval_seconds = max(p.seconds for p in parts)
    timings: dict[str, float] = {}
    for part in parts:
        for phase, seconds in part.tpt_timings.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    payload = {
        "protext_version": __version__,
        "command": "python -m protext.eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "dataset": {
            "name": state["dataset_name"],
            "root": cfg.root,
            "split": cfg.split,
            "n_classes": len(state["classnames"]),
            "n_images_in_split": state["n_dataset_images"],
            "classnames": state["classnames"],
        },
        "method": cfg.method + (" + TPT" if cfg.tpt else ""),
        "template": state["template"],
        "model": state["model"],
        "checkpoint": state.get("checkpoint"),
        "descriptions": state.get("descriptions"),
        "tpt": (
            {
                "init": cfg.resolved_tpt_init(),
                "tune": cfg.tpt_tune,
                "views": cfg.tpt_views,
                "selected_views": max(1, int(cfg.tpt_views * cfg.tpt_selection)),
                "steps": cfg.tpt_steps,
                "lr": cfg.tpt_lr,
                "path": "naive" if cfg.tpt_naive else "fast",
                "seconds_per_phase": timings,
            }
            if cfg.tpt
            else None
        ),
        "settings": asdict(cfg),
        "runtime": {
            "device": str(rt.device),
            "precision": rt.precision,
            "world_size": ctx.world_size,
            "torch": torch.__version__,
        },
        "metrics": metrics_dict(metrics),
        "timing": {
            "wall_seconds": time.perf_counter() - wall_start,
            "eval_seconds": eval_seconds,
            "images_per_second": metrics.n_images / eval_seconds if eval_seconds > 0 else 0.0,
        },
        "predictions": predictions_table(predictions),
    }
    return payload, []


def summary_row(payload: dict[str, Any]) -> dict[str, Any]:
    """The one-line summary printed (and easy to paste into a README)."""
    metrics = payload["metrics"]
    return {
        "dataset": payload["dataset"]["name"],
        "split": payload["dataset"]["split"],
        "method": payload["method"],
        "images": metrics["n_images"],
        "top-1": metrics["top1"],
        "top-5": metrics["top5"],
        "per-class": metrics["mean_per_class"],
        "img/s": payload["timing"]["images_per_second"],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 success, 2 bad input)."""
    cfg = parse_config(argv)
    ctx = init_distributed(use_cuda=cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()))
    try:
        payload, errors = run(cfg, ctx, argv)
        if errors:
            if ctx.is_main:
                for message in errors:
                    print(f"error: {message}", file=sys.stderr)
            return 2
        if ctx.is_main:
            out = cfg.output_path()
            write_json(out, payload)
            print(markdown_table([summary_row(payload)]))
            print(f"results written to {out}")
        return 0
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
