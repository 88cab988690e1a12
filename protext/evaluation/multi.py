"""Several test-time methods over one encoding of each image: ``eval --tta zero,tda,mta``.

Methods that read only their views' image features (:class:`protext.tta.base.FeatureAdapter`: ZERO,
TDA, MTA, DMN-ZS, DPE, BoostAdapter, TPS) can share one pass over the images. Each image's views
are made and encoded once per distinct view recipe (DMN-ZS's crops differ from TPT's, TDA's count
from ZERO's), and every method of that recipe reads the same features: the fair comparison, at the
cost of one pass.

Each method gets exactly the run its own ``--tta NAME`` would be: the same settings, results file,
fingerprint and resume log (so its result equals the single-method run's, and a later single run
finds it done). A killed pass resumes each method from its own log; the images any method still
needs are encoded again. Online methods see the seeded stream order; the episodic ones, whose
results do not depend on order, see the same order.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..devices import uses_cuda
from ..distributed import init_distributed
from ..results import Prediction, predictions_from_logits, write_results
from . import adapters, features
from .config import EvalConfig, EvalError
from .cost import CostMeter
from .data import SeededViews, batches, progress_bar
from .loop import (
    STATE_EVERY, Setup, ShardResult, build_adapter, build_setup, choose_on_test_labels, class_features, stream_order,
    stream_record,
)
from .preflight import AlreadyDone
from .runtime import peak_memory, reset_peak_memory


def method_names(tta: str) -> list[str]:
    """``"zero,tda"`` → ``["zero", "tda"]``."""
    return [name.strip() for name in tta.split(",") if name.strip()]


def single_config(config: EvalConfig, name: str) -> EvalConfig:
    """The run ``--tta NAME`` alone would be: only the options that method takes."""
    from ..tta import registry

    own = {registry.dest(opt.flag) for _, opt in registry.options(registry.get(name))}
    fields = {}
    for flag in registry.shared_flags():
        key = registry.dest(flag)
        if hasattr(config, key) and key not in own:
            fields[key] = False if key == "tta_naive" else None
    options = {k: v for k, v in (config.tta_options or {}).items() if k in own}
    out = None
    if config.out:  # one file per method: NAME inserted before the suffix
        path = Path(config.out)
        out = str(path.with_name(f"{path.stem}-{name}{path.suffix}"))
    return replace(config, tta=name, tta_options=options or None, out=out, **fields)


@dataclass
class _Member:
    """One method of the pass: its own setup, adapter, log and progress."""

    name: str
    setup: Setup
    adapter: Any = None
    recipe: Any = None
    log: Any = None
    done: dict[int, tuple[Prediction, float]] = field(default_factory=dict)
    start: int = 0  # online: the stream position its saved state resumes at
    result: ShardResult = field(default_factory=ShardResult)
    meter: Any = None  # its CostMeter

    @property
    def online(self) -> bool:
        return bool(getattr(self.adapter, "online", False))

    def needs(self, index: int, position: int) -> bool:
        if self.online:
            return position >= self.start
        return index not in self.done


def evaluate_many(config: EvalConfig, *, clip: Any = None, progress: bool = True,
                  command: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Every method of ``config.tta`` (comma-separated) in one pass; ``{method: results payload}``.

    Raises:
        protext.errors.UserError: as :func:`protext.evaluation.evaluate`, before any model loads.
    """
    from .payload import build_payload
    from .resume import remove_logs

    start_time = time.perf_counter()
    ctx = init_distributed(use_cuda=uses_cuda(config.device))
    if ctx.active:
        raise EvalError(f"--tta {config.tta}: several methods in one pass run in one process; run them one at a time "
                        "under torchrun.")
    members: list[_Member] = []
    payloads: dict[str, dict[str, Any]] = {}
    for name in method_names(config.tta):
        one = single_config(config, name)
        try:
            setup = build_setup(one, ctx, clip, progress and config.progress)
        except AlreadyDone as done:
            remove_logs(done.path, done.payload["settings"]["fingerprint"])
            print(f"note: --tta {name}: {done.path} already holds its result; reused.", file=sys.stderr)
            payloads[name] = done.payload
            continue
        clip = setup.clip  # the first method loads the model, the others share it
        members.append(_Member(name, setup))
    if members:
        _run(members, config)
    for member in members:
        parts = [[member.result]]
        payload = build_payload(member.setup, parts, command or f"protext.evaluation.evaluate_many({config!r})",
                                time.perf_counter() - start_time)
        payload["tta"]["shared_pass"] = {"methods": method_names(config.tta),
                                         "note": "views made and encoded once per view recipe for every method of the pass"}
        out = member.setup.config.output_path()
        write_results(payload, out)
        remove_logs(out, member.setup.fingerprint)
        payloads[member.name] = payload
    return {name: payloads[name] for name in method_names(config.tta)}


def _run(members: list[_Member], config: EvalConfig) -> None:
    """The one pass: per image, each recipe's views made and encoded once, then every method."""
    from ..tta import registry
    from ..tta.api import views_for_recipe
    from ..tta.views import model_preprocess_cfg
    from .loop import _open_log

    first = members[0].setup
    reset_peak_memory(first.runtime.device)
    # every method of the pass reads --method's class features: computed (and counted) once, and
    # each method's cost record carries that once-per-run work as its own run would
    once = CostMeter()
    shared_features = once.once(class_features, first)
    seed = config.seed
    online = any(registry.get(m.name).online for m in members)
    order = stream_order(first.n_images, seed) if online else list(range(first.n_images))
    for m in members:
        m.meter = CostMeter()
        m.meter.sample.once = dict(once.sample.once)
        tta_cfg = adapters.tta_config(m.setup.config, m.setup.runtime)
        m.adapter = build_adapter(m.setup, tta_cfg, text_features=shared_features)
        m.recipe = registry.get(m.name).views(tta_cfg.settings(m.setup.dataset.name))
        m.log, m.done = _open_log(m.setup, stream=seed if m.online else None)
        if m.online:
            saved = m.log.load_state()
            if saved is not None and all(i in m.done for i in order[: saved[0]]):
                m.start = saved[0]
                m.adapter.load_state_dict(saved[1])
            m.result.stream = stream_record(seed, order, m.start)
    recipes = list(dict.fromkeys(m.recipe for m in members))
    preprocess = model_preprocess_cfg(first.clip.model)
    makers = [SeededViews(views_for_recipe(r, preprocess), seed) for r in recipes]
    sizes = [r.views for r in recipes]
    # each recipe's views go through the image encoder of its first method: the one its own run uses
    encoders = {r: next(m.adapter.image_encoder for m in members if m.recipe == r) for r in recipes}
    positions = {index: k for k, index in enumerate(order)}
    todo = [i for k, i in enumerate(order) if any(m.needs(i, k) for m in members)]
    label = ",".join(m.name for m in members)
    with progress_bar(len(todo), first.progress, f"{first.dataset.name} {label}") as bar:
        for views, labels, idx in batches(first.dataset, todo, _AllRecipes(makers), 1, config.workers):
            index, position = idx[0], positions[idx[0]]
            for recipe, part in zip(recipes, views[0].split(sizes)):
                began = time.perf_counter()
                encoded = encoders[recipe](part)
                encoding = time.perf_counter() - began
                for m in members:
                    if m.recipe == recipe and m.needs(index, position):
                        _step(m, part, encoded, encoding, labels, idx, position, len(order))
            bar.update(1)
    for m in members:
        m.result = _finished(m, order)
        m.result.peak_memory = peak_memory(first.runtime.device)
        m.result.flops = m.meter.sample


class _AllRecipes:
    """Every recipe's views of one image, stacked (picklable, for DataLoader workers)."""

    def __init__(self, makers: list[SeededViews]) -> None:
        self.makers = makers

    def __call__(self, image, index: int) -> torch.Tensor:
        return torch.cat([make(image, index) for make in self.makers])


def _step(m: _Member, views: torch.Tensor, encoded: torch.Tensor, encoding: float, labels, idx, position: int,
          n: int) -> None:
    """One method on one image's features; logged as its single run would log it. The method's
    first image is encoded again under its FLOP counter (the same features: encoding is
    deterministic), so its cost record counts what its own run would."""
    began = time.perf_counter()
    if m.meter.sample.images == 0:
        out = m.meter.batch(lambda: [m.adapter.adapt_features(m.adapter.image_encoder(views))])[0]
    else:
        out = m.adapter.adapt_features(encoded)
    seconds = encoding + time.perf_counter() - began  # what this method's own run would have spent
    logits = out.logits.float().cpu()[None]
    features.check_finite(logits, m.setup.config)
    predictions = predictions_from_logits(idx, labels, logits, keep_logits=m.setup.config.save_logits,
                                          calibration_logits=out.calibration_logits.float().cpu()[None])
    if m.setup.oracle:
        predictions = [replace(predictions[0], extras={k: tuple(v.float().cpu().tolist()) for k, v in out.extras.items()})]
    for phase, spent in {"images": encoding, **out.timings}.items():
        m.result.phases[phase] = m.result.phases.get(phase, 0.0) + spent
    m.log.append(predictions, seconds)
    m.result.predictions += predictions
    m.result.seconds += seconds
    if m.online:
        step = position + 1
        if step % STATE_EVERY == 0 and step < n:
            m.log.save_state(step, m.adapter.state_dict())


def _finished(m: _Member, order: list[int]) -> ShardResult:
    """The method's predictions, with those finished by an earlier run taken from its log."""
    from .loop import _finish

    earlier = order[: m.start] if m.online else order
    result = _finish(earlier, m.done, m.result)
    if m.setup.oracle:
        result.predictions, result.stream["oracle"] = choose_on_test_labels(result.predictions, m.setup.config.save_logits)
    return result


__all__ = ["evaluate_many", "method_names", "single_config"]
