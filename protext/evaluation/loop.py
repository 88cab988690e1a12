"""The evaluation loop: zero-shot or any test-time adaptation method over a dataset.

One function, :func:`evaluate`, does the whole run: checks that need no model (flags, inputs,
every output path), the dataset, the model and class features, then the images, sharded under
torchrun and logged per image as they finish (:mod:`.resume`), so a rerun of the same command
continues where a killed one stopped and ends with the same results. Metrics come from the merged
per-image predictions only.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..devices import uses_cuda
from ..distributed import DistContext, gather, init_distributed, shard
from ..errors import UserError
from ..results import Prediction, merge_predictions, predictions_from_logits
from ..templates import TEMPLATE_ENSEMBLES
from . import adapters, features
from .cost import CostMeter, FlopSample
from .config import ONLINE_METHODS, EvalConfig, EvalError, uses_descriptions
from .data import Preprocess, SeededViews, batches, input_identity, open_dataset, progress_bar
from .preflight import check_classes, check_inputs, check_outputs
from .resume import ResumeLog, check_log_inputs
from .runtime import Runtime, peak_memory, reset_peak_memory, resolve_runtime

#: an online method's state is saved every this many images of its stream (resume granularity)
STATE_EVERY = 50


@dataclass
class Setup:
    """Everything built before the images: shared by the zero-shot and TTA paths."""

    config: EvalConfig
    ctx: DistContext
    runtime: Runtime
    dataset: Any
    classnames: list[str]
    n_images: int
    fingerprint: str
    inputs: dict[str, Any] = field(default_factory=dict)  # the images and classes (data.input_identity)
    clip: Any = None
    template: Optional[features.TemplateChoice] = None
    checkpoint: Any = None
    record: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    @property
    def oracle(self) -> bool:
        """Whether the method chooses something on the test labels after the stream (dmn-oracle)."""
        from ..tta import registry

        return bool(self.config.tta) and registry.get(self.config.tta).oracle


@dataclass
class ShardResult:
    """What one rank (or one stream) sends to rank 0."""

    predictions: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0  # summed per-image seconds, from the log for images done by earlier runs
    phases: dict[str, float] = field(default_factory=dict)
    stream: Optional[dict[str, Any]] = None
    peak_memory: Optional[dict[str, Any]] = None  # this rank's, measured when its images are done
    flops: Optional[FlopSample] = None  # FLOPs counted on this rank's (stream's) real calls (.cost)
    error: Optional[str] = None


def _legacy_errors() -> tuple[type[BaseException], ...]:
    """Bad-input exceptions of modules that do not derive from UserError yet."""
    from ..datasets import DatasetError
    from ..models import PretrainedUnavailableError
    from ..prompts import PromptShapeError
    from ..text_tower import UnsupportedTextTowerError
    from ..zeroshot import ZeroShotError

    return (UserError, DatasetError, PretrainedUnavailableError, PromptShapeError, UnsupportedTextTowerError, ZeroShotError)


def prepare(config: EvalConfig, ctx: DistContext) -> tuple[Any, Runtime, str, dict[str, Any]]:
    """Every check that needs no model: flags, input files, the dataset, output paths, the resume
    log, the TTA settings for this dataset. Returns the dataset, the runtime, the run's fingerprint
    and its inputs (:func:`.data.input_identity`).

    The inputs come first, so the real problem is the one reported: a mistyped ``--root`` is
    "no such folder", not a complaint about the results file its name would have.

    Raises :class:`~.preflight.AlreadyDone` when the results file already holds this run's result."""
    config.validate()
    if config.tta in ONLINE_METHODS and ctx.active:
        raise EvalError(
            f"--tta {config.tta} adapts online: its result depends on one ordered stream of images, which cannot be "
            f"split over {ctx.world_size} processes without changing it. Run it in one process (without torchrun)."
        )
    check_inputs(config)
    runtime = resolve_runtime(config, ctx)
    dataset = open_dataset(config)
    source = f"--classes {config.classes}" if config.classes else f"the class names of --dataset {config.dataset} --root {config.root}"
    check_classes(list(dataset.classnames), config, source)
    adapters.validate_tta(config, dataset.name, runtime)
    inputs = input_identity(dataset)
    fingerprint = config.fingerprint(features.input_digests(config))
    resuming = check_log_inputs(config.output_path(), fingerprint, inputs, config)
    check_outputs(config, fingerprint, inputs, log_exists=resuming)
    return dataset, runtime, fingerprint, inputs


def load_model(config: EvalConfig, runtime: Runtime, ctx: DistContext):
    """The CLIP model; ``--pretrained random`` warns once (rank 0), as ``train`` does."""
    from ..models import load_clip

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            clip = load_clip(config.model, config.pretrained, device=runtime.device, precision="fp32", seed=config.seed)
        except ValueError as err:
            raise EvalError(f"--model/--pretrained: {err}") from None
    if ctx.is_main:
        for warning in caught:
            if "RANDOM" in str(warning.message):
                print(f"warning: {warning.message}", file=sys.stderr)
    return clip


def build_setup(config: EvalConfig, ctx: DistContext, clip, progress: bool) -> Setup:
    """Dataset, model, checkpoint (weights checked), template and the resume fingerprint."""
    dataset, runtime, fingerprint, inputs = prepare(config, ctx)
    classnames = list(dataset.classnames)
    n_images = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    setup = Setup(config, ctx, runtime, dataset, classnames, n_images, fingerprint, inputs=inputs, progress=progress)
    setup.clip = clip if clip is not None else load_model(config, runtime, ctx)
    setup.record["model"] = {"name": setup.clip.name, "pretrained": setup.clip.pretrained, "identity": setup.clip.identity}
    setup.checkpoint = features.load_checkpoint(config)
    if setup.checkpoint is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            weights = features.check_weights(setup.checkpoint, setup.clip, config.prompts, allow_other=config.allow_other_weights)
        if ctx.is_main:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
        setup.record["checkpoint"] = features.checkpoint_identity(config.prompts, setup.checkpoint, weights)
        setup.record["model"]["text_tower_fingerprint"] = weights.model
    setup.template = features.resolve_template(config, dataset.name, setup.checkpoint)
    setup.record["template"] = setup.template.record()
    ensemble = config.method.split("+")[0]  # ensemble+cupl, ensemble80+descriptors: a list, then descriptions
    if ensemble in TEMPLATE_ENSEMBLES:
        rule = {"ensemble": "zero-ensemble", "ensemble80": "clip-80"}[ensemble]
        setup.record["template"] = {"templates": list(features.ensemble_templates(ensemble)),
                                    "source": f"--method {config.method}", "rule": rule}
    return setup


def class_features(setup: Setup) -> torch.Tensor:
    """The class features of ``--method`` (descriptions read and recorded for cupl)."""
    config = setup.config
    descriptions = None
    if uses_descriptions(config.method):
        descriptions = features.read_description_source(config.descriptions)
        setup.record["descriptions"] = {"path": config.descriptions, "sha256": features.file_digest(config.descriptions)}
    return features.class_features(config, setup.clip, setup.classnames, setup.template.template, setup.checkpoint, descriptions)


# --------------------------------------------------------------------------------------------------
# the images


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[k : k + size] for k in range(0, len(indices), size)]


def _todo(indices: list[int], size: int, done: dict[int, Any]) -> list[int]:
    """The images of every chunk not wholly in the log. Chunks are fixed slices of this rank's
    shard, so a resumed run batches exactly as an uninterrupted one (same numbers, bit for bit);
    only the shard's last chunk can be short, so skipping whole chunks keeps the rest aligned."""
    return [i for chunk in _chunks(indices, size) if not all(i in done for i in chunk) for i in chunk]


def _open_log(setup: Setup, stream: Optional[int] = None) -> tuple[ResumeLog, dict[int, tuple[Prediction, float]]]:
    from dataclasses import asdict

    log = ResumeLog(setup.config.output_path(), setup.fingerprint, setup.ctx.rank if stream is None else 0, stream)
    done = log.read_done()
    log.open(asdict(setup.config), setup.inputs)
    return log, done


def _finish(indices: list[int], done: dict[int, tuple[Prediction, float]], result: ShardResult) -> ShardResult:
    """Add the images finished by earlier runs (from the log) to this run's."""
    new = {p.index for p in result.predictions}
    for i in indices:
        if i in done and i not in new:
            prediction, seconds = done[i]
            result.predictions.append(prediction)
            result.seconds += seconds
    result.predictions.sort(key=lambda p: p.index)
    return result


def _zeroshot_batch(encoder, images: torch.Tensor, text: torch.Tensor, scale, config: EvalConfig, idx, labels) -> list[Prediction]:
    from .. import zeroshot

    logits = zeroshot.zeroshot_logits(encoder(images), text, scale).cpu()
    features.check_finite(logits, config)
    return predictions_from_logits(idx, labels, logits, keep_logits=config.save_logits)


def zeroshot_shard(setup: Setup) -> ShardResult:
    """Zero-shot predictions of this rank's images, batch by batch into the log."""
    from ..zeroshot import ImageEncoder, logit_scale

    config = setup.config
    meter = CostMeter()
    text = meter.once(class_features, setup)
    scale = logit_scale(setup.clip.model).to(setup.runtime.device)
    encoder = ImageEncoder(setup.clip.model, setup.runtime.image_dtype)
    result = ShardResult(flops=meter.sample)

    def predict(images, labels, idx) -> list[Prediction]:
        return _zeroshot_batch(encoder, images, text, scale, config, idx, labels)

    return _logged_batches(setup, Preprocess(setup.clip.preprocess), config.batch_size, config.method, meter.counting(predict), result)


def _logged_batches(setup: Setup, make, size: int, label: str, predict, result: ShardResult) -> ShardResult:
    """This rank's images not yet in the log, ``size`` at a time through ``predict``, each batch
    appended to the log as it finishes (with its seconds per image); then the logged ones added."""
    config, ctx = setup.config, setup.ctx
    indices = shard(range(setup.n_images), ctx)
    log, done = _open_log(setup)
    todo = _todo(indices, size, done)
    with progress_bar(len(todo), setup.progress and ctx.is_main, f"{setup.dataset.name} {label}") as bar:
        for inputs, labels, idx in batches(setup.dataset, todo, make, size, config.workers):
            start = time.perf_counter()
            batch = predict(inputs, labels, idx)
            seconds = time.perf_counter() - start
            log.append(batch, seconds / len(batch))
            result.predictions += batch
            result.seconds += seconds
            bar.update(len(batch))
    return _finish(indices, done, result)


def build_adapter(setup: Setup, tta_cfg, text_features: Optional[torch.Tensor] = None):
    """The TTA method on ``--method``'s class features (``text_features`` when already computed),
    or on the prompts the prompt tuners tune."""
    config = setup.config
    if config.tunes_prompts:
        encoder = features.prompt_encoder(config, setup.clip, setup.classnames, setup.template.template, setup.checkpoint)
        return adapters.build_adapter(tta_cfg, setup.clip, setup.dataset.name, encoder=encoder)
    if text_features is None:
        text_features = class_features(setup)
    return adapters.build_adapter(tta_cfg, setup.clip, setup.dataset.name, text_features=text_features)


def _adapt(adapter, views: torch.Tensor, setup: Setup, idx, labels, result: ShardResult) -> list[Prediction]:
    """Adapt to a batch of images' views; predictions and per-phase seconds."""
    outs = adapter.adapt_batch(list(views)) if len(views) > 1 else [adapter.adapt(views[0])]
    logits = torch.stack([o.logits.float().cpu() for o in outs])
    calibration = torch.stack([o.calibration_logits.float().cpu() for o in outs])
    features.check_finite(logits, setup.config)
    for out in outs:
        for phase, seconds in out.timings.items():
            result.phases[phase] = result.phases.get(phase, 0.0) + seconds
    predictions = predictions_from_logits(idx, labels, logits, keep_logits=setup.config.save_logits, calibration_logits=calibration)
    if setup.oracle:  # kept in the log: the choice after the stream needs every image's, resumed or not
        from dataclasses import replace

        predictions = [replace(p, extras={name: tuple(v.float().cpu().tolist()) for name, v in out.extras.items()})
                       for p, out in zip(predictions, outs)]
    return predictions


def episodic_shard(setup: Setup) -> ShardResult:
    """An episodic TTA method (each image on its own) over this rank's images."""
    config = setup.config
    tta_cfg = adapters.tta_config(config, setup.runtime)
    meter = CostMeter()
    adapter = meter.once(build_adapter, setup, tta_cfg)
    views = SeededViews(adapters.view_maker(tta_cfg, setup.dataset.name, setup.clip), config.seed)
    result = ShardResult(flops=meter.sample)

    def predict(image_views, labels, idx) -> list[Prediction]:
        return _adapt(adapter, image_views, setup, idx, labels, result)

    return _logged_batches(setup, views, config.tta_batch or 1, config.tta, meter.counting(predict), result)


def stream_order(n_images: int, seed: int) -> list[int]:
    """The order an online method sees the images in: a seeded permutation."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_images, generator=generator).tolist()


def stream_record(seed: int, order: list[int], position: int) -> dict[str, Any]:
    """What a result says about one stream: its seed, how the order is drawn, where it resumed."""
    return {"seed": seed, "order": "torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))",
            "first_indices": order[:10], "resumed_at": position}


def stream_shard(setup: Setup, seed: int) -> ShardResult:
    """An online method over one seeded stream, its state saved every :data:`STATE_EVERY` images so a
    rerun continues with the caches it had (images after the saved position are redone)."""
    config = setup.config
    tta_cfg = adapters.tta_config(config, setup.runtime)
    meter = CostMeter()
    adapter = meter.once(build_adapter, setup, tta_cfg)
    views = SeededViews(adapters.view_maker(tta_cfg, setup.dataset.name, setup.clip), config.seed)
    order = stream_order(setup.n_images, seed)
    log, done = _open_log(setup, stream=seed)
    saved = log.load_state()
    position = 0
    if saved is not None and all(i in done for i in order[: saved[0]]):
        position = saved[0]
        adapter.load_state_dict(saved[1])
    result = ShardResult(stream=stream_record(seed, order, position))
    with progress_bar(len(order) - position, setup.progress, f"{setup.dataset.name} {config.tta} stream {seed}") as bar:
        for step, (image_views, labels, idx) in enumerate(batches(setup.dataset, order[position:], views, 1, config.workers), start=position + 1):
            start = time.perf_counter()
            batch = meter.batch(_adapt, adapter, image_views, setup, idx, labels, result)
            seconds = time.perf_counter() - start
            log.append(batch, seconds)
            result.predictions += batch
            result.seconds += seconds
            if step % STATE_EVERY == 0 and step < len(order):
                log.save_state(step, adapter.state_dict())
            bar.update(1)
    result = _finish(order[:position], done, result)
    result.flops = meter.sample
    if setup.oracle:
        result.predictions, result.stream["oracle"] = choose_on_test_labels(result.predictions, config.save_logits)
    return result


def choose_on_test_labels(predictions: list[Prediction], keep_logits: bool) -> tuple[list[Prediction], dict[str, Any]]:
    """DMN-ZS as published: after the stream, the fusion weight β₂ that maximises the accuracy on
    the test labels (TTA2.md §6 step 7), and every prediction re-scored with it. An oracle, and the
    result says so."""
    from ..tta.dmn import BETA2_CANDIDATES, oracle_beta2

    p_text = torch.tensor([p.extras["p_text"] for p in predictions])
    p_mem = torch.tensor([p.extras["p_mem"] for p in predictions])
    labels = [p.label for p in predictions]
    beta2, accuracy = oracle_beta2(p_text, p_mem, labels)
    fused = torch.log(p_text + beta2 * p_mem)
    rescored = predictions_from_logits([p.index for p in predictions], labels, fused, keep_logits=keep_logits)
    return rescored, {"beta2": beta2, "top1_at_beta2": accuracy, "candidates": list(BETA2_CANDIDATES),
            "selected_on": "test labels (an oracle: not a test-time result)"}


def run_images(setup: Setup) -> list[ShardResult]:
    """This rank's results: one per stream for online methods, else one."""
    config = setup.config
    reset_peak_memory(setup.runtime.device)
    if config.tta in ONLINE_METHODS:
        results = [stream_shard(setup, seed) for seed in (config.stream_seeds or [config.seed])]
    else:
        results = [episodic_shard(setup) if config.tta else zeroshot_shard(setup)]
    for result in results:
        result.peak_memory = peak_memory(setup.runtime.device)
    return results


def evaluate_shards(config: EvalConfig, clip=None, progress: bool = True) -> tuple[Optional[Setup], list[list[ShardResult]]]:
    """Run this rank's part and gather every rank's; a user error on any rank is raised on all."""
    ctx = init_distributed(use_cuda=uses_cuda(config.device))
    setup: Optional[Setup] = None
    try:
        setup = build_setup(config, ctx, clip, progress and config.progress)
        mine = run_images(setup)
    except _legacy_errors() as err:
        if not ctx.active:
            raise err if isinstance(err, UserError) else EvalError(str(err)) from None
        mine = [ShardResult(error=str(err) or type(err).__name__)]
    parts: list[list[ShardResult]] = gather(mine, ctx)
    errors = list(dict.fromkeys(r.error for part in parts for r in part if r.error))
    if errors:
        raise EvalError(errors[0])
    return setup, parts


def merged(parts: list[list[ShardResult]], stream: int = 0) -> tuple[list[Prediction], float, dict[str, float]]:
    """Stream ``stream``'s predictions of every rank, in dataset order, with summed seconds."""
    chosen = [part[stream] for part in parts]
    phases: dict[str, float] = {}
    for result in chosen:
        for phase, seconds in result.phases.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    return merge_predictions(r.predictions for r in chosen), sum(r.seconds for r in chosen), phases
