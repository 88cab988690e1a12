"""A method over many streams or tasks from one encoding: ``eval --tta tda --stream-runs 100`` (OGA)
and ``eval --tta tda --scenario online-medium`` (StatA).

The published gains of online methods are about the size of the effect of the stream order (OGA,
TTA2.md §11.1). This runs the method over N seeded permutations of the test set, exactly OGA's
(``(--stream-seed, N)`` gives the same N orders for every method and process), with a fresh adapter
per run, and reports every run's accuracy and ECE with their mean, spread and the Expected Tail
Accuracy (the mean of the worst 10 % of runs).

The views of an image do not depend on the order (they are keyed by the seed and the image's
index), so each image is encoded once and the N orders are replayed from those features: 100 orders
cost one pass over the images plus the method's own arithmetic. Finished runs are logged one line
each; a killed job re-encodes the images and continues with the first unfinished run.

StatA's scenarios (TTA2.md §11.2) replay the same features in realistic batches: ``--scenario
very_low`` … ``all`` draws tasks of a few active classes (each task its own fresh adapter, the images
of its batch in turn), ``--scenario online-low|medium|high|separate`` correlated streams of batches
of 128 (a fresh adapter per stream, state kept across its batches). Every draw comes from one
Generator seeded by ``--stream-seed`` (StatA: 1), recorded, including the Dirichlet draw the original
leaves unseeded. A run's accuracy is the mean of its per-batch accuracies, as OGA and StatA score.

Within a batch the images go one at a time (each updates the method's state, then is predicted),
unless ``--stream-update batch`` (TDA, DMN-ZS, with ``--stream-runs``) asks for OGA's rule
(TTA2.md §11.1): the whole batch updates the state first (the adapter's ``observe``), then each of
its images is predicted from that state (``predict``), so a batch's later images act on its earlier
ones' predictions. The rule is recorded under the results' ``runs``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write
from ..devices import uses_cuda
from ..distributed import init_distributed
from ..results import Prediction, compute_metrics, predictions_from_logits, write_results
from . import adapters
from ..flops import PartCounter
from .config import EvalConfig, EvalError
from .cost import FlopSample
from .data import SeededViews, batches, progress_bar
from .loop import ShardResult, build_adapter, build_setup, class_features
from .preflight import AlreadyDone
from .runtime import peak_memory, reset_peak_memory


#: what each ``--stream-update`` rule does within a batch, as the results record it
UPDATE_RULES = {
    "image": "image by image: each image of a batch updates the state, then is predicted",
    "batch": "OGA's batch rule (TTA2.md §11.1): the whole batch updates the state in its order, then each of its "
             "images is predicted from that state",
}


def update_rule(setup, tta_cfg) -> str:
    """The run's ``--stream-update`` (``image`` for a method without the option)."""
    return getattr(tta_cfg.settings(setup.dataset.name), "stream_update", "image")


def runs_log_path(out: Path) -> Path:
    """The finished runs of a multi-order job, one JSON line each, beside its results file."""
    return out.with_name(out.name + ".runs.jsonl")


def evaluate_orders(config: EvalConfig, *, clip: Any = None, progress: bool = True,
                    command: Optional[str] = None) -> dict[str, Any]:
    """``config.tta`` (online) over ``config.stream_runs`` OGA orders; the results payload.

    Raises:
        protext.errors.UserError: bad flags or inputs, before any model loads.
    """
    from ..streams import summarize_runs
    from .payload import build_payload
    from .resume import remove_logs

    started = time.perf_counter()
    ctx = init_distributed(use_cuda=uses_cuda(config.device))
    if ctx.active:
        raise EvalError("--stream-runs/--scenario replay one encoding in one process; run them without torchrun.")
    try:
        if config.scenario is not None and config.scenario.startswith("online-"):
            _check_stream_size(config, ctx)  # before the model loads
        setup = build_setup(config, ctx, clip, progress and config.progress)
    except AlreadyDone as done:
        print(f"note: {done.path} already holds this run's result; nothing to do (--overwrite recomputes it).", file=sys.stderr)
        return done.payload
    out = config.output_path()
    if config.overwrite:
        runs_log_path(out).unlink(missing_ok=True)
    log = _RunsLog(runs_log_path(out), setup.fingerprint)
    finished = log.read()
    reset_peak_memory(setup.runtime.device)
    sample = FlopSample()  # the first image's encoding and run 0's first step, on the real calls
    encoded, labels, encode_seconds = _encode_once(setup, progress and config.progress, sample)
    plan, described = plan_runs(config, labels)
    with PartCounter(all_once=True) as counter:
        text = class_features(setup)
    _add(sample.once, counter.once)
    tta_cfg = adapters.tta_config(config, setup.runtime)
    runs: list[dict[str, Any]] = []
    first: Optional[ShardResult] = None
    with progress_bar(len(plan), setup.progress, f"{setup.dataset.name} {config.tta} {described['kind']}") as bar:
        for r, (seed, run_batches) in enumerate(plan):
            result, record = _one_run(setup, tta_cfg, text, encoded, labels, r, seed, run_batches, finished.get(r),
                                      sample if r == 0 else None)
            if r not in finished:
                log.append(record)
            if first is None:
                first = result
            runs.append(record)
            bar.update(1)
    first.peak_memory = peak_memory(setup.runtime.device)
    first.flops = sample
    first.stream = None  # the runs are reported under "runs", not as stream seeds
    first.seconds = encode_seconds + first.seconds
    payload = build_payload(setup, [[first]], command or f"protext.evaluation.evaluate_orders({config!r})",
                            time.perf_counter() - started)
    summary = {"top1": summarize_runs([run["top1"] for run in runs]).to_dict()}
    # the tail is of accuracy; ECE gets its spread only (its "worst" runs are its highest)
    summary["ece"] = {k: v for k, v in summarize_runs([run["ece"] for run in runs]).to_dict().items()
                      if k not in ("eta", "tail_runs")}
    rule = update_rule(setup, tta_cfg)
    described = {**described, "update": rule, "update_rule": UPDATE_RULES[rule]}
    payload["runs"] = {**described, "n_runs": len(plan), "per_run": runs, "summary": summary,
                       "note": "a run's top-1 is the mean of its per-batch accuracies; ETA = mean top-1 of the worst "
                               "10% of runs; the predictions above are run 0's"}
    payload["metrics"]["top1_mean_over_runs"] = summary["top1"]["mean"]
    payload["metrics"]["top1_eta"] = summary["top1"]["eta"]
    payload["timing"]["encode_seconds"] = encode_seconds
    if setup.ctx.is_main:
        write_results(payload, out)
        remove_logs(out, setup.fingerprint)
        runs_log_path(out).unlink(missing_ok=True)
    return payload


def _encode_once(setup, progress: bool, sample: FlopSample) -> tuple[list[torch.Tensor], list[int], float]:
    """Every image's view features, in dataset order (the views keyed by seed and index); the first
    image's encoding counted into ``sample``."""
    from ..tta import registry
    from ..tta.api import views_for_recipe
    from ..tta.views import model_preprocess_cfg

    config = setup.config
    tta_cfg = adapters.tta_config(config, setup.runtime)
    recipe = registry.get(config.tta).views(tta_cfg.settings(setup.dataset.name))
    maker = SeededViews(views_for_recipe(recipe, model_preprocess_cfg(setup.clip.model)), config.seed)
    from ..tta.api import image_dtype
    from ..zeroshot import ImageEncoder

    encoder = ImageEncoder(setup.clip.model, image_dtype(tta_cfg))  # what the method's own adapter encodes with
    features: list[torch.Tensor] = []
    labels: list[int] = []
    began = time.perf_counter()
    with progress_bar(setup.n_images, progress, f"{setup.dataset.name} encode once") as bar:
        for views, batch_labels, _ in batches(setup.dataset, list(range(setup.n_images)), maker, 1, config.workers):
            if features:
                features.append(encoder(views[0]))
            else:
                with PartCounter() as counter:
                    features.append(encoder(views[0]))
                _add(sample.per_images, counter.per_call)
            labels += list(batch_labels)
            bar.update(1)
    return features, labels, time.perf_counter() - began


def _check_stream_size(config: EvalConfig, ctx) -> None:
    """An online scenario needs at least one full batch of 128 images."""
    from .. import streams
    from .loop import prepare

    dataset = prepare(config, ctx)[0]
    n = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    if n < streams.STATA_ONLINE_BATCH_SIZE:
        raise EvalError(f"--scenario {config.scenario} streams batches of {streams.STATA_ONLINE_BATCH_SIZE} images and drops "
                        f"an incomplete one; this dataset has {n} (--limit included): use a batch scenario.")


def plan_runs(config: EvalConfig, labels: list[int]) -> tuple[list[tuple[int, list[list[int]]]], dict[str, Any]]:
    """The runs to replay, each ``(seed, batches of dataset indices)``, and how they were drawn."""
    import numpy as np

    from .. import streams

    if config.stream_runs is not None:
        master = config.stream_seed_or_default
        seeds = streams.oga_seeds(master, config.stream_runs)
        runs = [(seed, streams.chunk(streams.oga_order(seed, len(labels)), streams.OGA_BATCH_SIZE)) for seed in seeds]
        return runs, {"kind": "orders", "protocol": "OGA (TTA2.md §11.1): seeded permutations of the test set, a fresh "
                      "adapter per run, batches of 32 for the score (the last one shorter)", "master_seed": master,
                      "seeds": seeds, "order": "np.random.default_rng(seed).choice(range(N), N, replace=False)"}
    name = config.scenario
    seed = config.scenario_seed
    rng = np.random.default_rng(seed)
    if name.startswith("online-"):
        gamma = streams.online_setting(name[len("online-"):])
        n = config.tasks or streams.STATA_ONLINE_STREAMS
        runs = [(r, streams.online_stream(labels, gamma, streams.STATA_ONLINE_BATCH_SIZE, rng)) for r in range(n)]
        return runs, {"kind": "streams", "protocol": "StatA online (TTA2.md §11.2): correlated streams, batches of 128 "
                      "(the last incomplete one dropped), a fresh adapter per stream", "scenario": name, "gamma": gamma,
                      "seed": seed, "generator": "numpy.random.default_rng(seed), every draw including the Dirichlet's"}
    batch_size, k_min, k_max = streams.batch_setting(name)
    n = config.tasks or streams.STATA_BATCH_TASKS
    tasks = streams.batch_tasks(labels, k_min, k_max, batch_size, n, rng)
    runs = [(r, [list(map(int, task))]) for r, task in enumerate(tasks)]
    return runs, {"kind": "tasks", "protocol": "StatA realistic batches (TTA2.md §11.2): each task a batch of its "
                  "active classes' images, a fresh adapter per task", "scenario": name, "batch_size": batch_size,
                  "k_min": k_min, "k_max": k_max, "seed": seed,
                  "generator": "numpy.random.default_rng(seed), every draw"}


def _one_run(setup, tta_cfg, text: torch.Tensor, encoded: list[torch.Tensor], labels: list[int], r: int, seed: int,
             run_batches: list[list[int]], done: Optional[dict[str, Any]],
             sample: Optional[FlopSample] = None) -> tuple[ShardResult, dict[str, Any]]:
    """Run ``r``: a fresh adapter over its batches' images in turn; its metrics (from the log when an
    earlier job finished it, except run 0, whose predictions the results keep)."""
    result = ShardResult(stream={"seed": seed, "run": r})
    if done is not None and r > 0:
        return result, done
    adapter = build_adapter(setup, tta_cfg, text_features=text)
    by_batch = update_rule(setup, tta_cfg) == "batch"
    predictions: list[Prediction] = []
    batch_accuracy: list[float] = []
    began = time.perf_counter()
    for batch in run_batches:
        right = 0
        if by_batch:  # OGA: the whole batch into the state first, then every image read out
            for k, index in enumerate(batch):  # the first image's observe counted, with its predict below
                _counted(sample if k == 0 else None, lambda: adapter.observe(encoded[index]), done=False)
            outs = [_counted(sample, lambda: adapter.predict(encoded[index])) for index in batch]
        else:
            outs = [_counted(sample, lambda: adapter.adapt_features(encoded[index])) for index in batch]
        for index, out in zip(batch, outs):
            prediction = predictions_from_logits([index], [labels[index]], out.logits.float().cpu()[None],
                                                 keep_logits=setup.config.save_logits,
                                                 calibration_logits=out.calibration_logits.float().cpu()[None])[0]
            predictions.append(prediction)
            right += prediction.pred == prediction.label
        batch_accuracy.append(100.0 * right / len(batch))
    result.seconds = time.perf_counter() - began
    result.predictions = sorted(predictions, key=lambda p: p.index)
    metrics = compute_metrics(result.predictions, setup.classnames)
    record = {"run": r, "seed": seed, "top1": sum(batch_accuracy) / len(batch_accuracy), "ece": metrics.ece,
              "images": len(predictions), "batches": len(run_batches), "first_indices": run_batches[0][:10],
              "seconds": result.seconds}
    return result, record


def _counted(sample: Optional[FlopSample], call, done: bool = True):
    """``call()``, its FLOPs added to ``sample`` while the sample has no image yet: the method's own
    work on the first image (under the batch rule its observe, then its predict: ``done`` marks the
    image counted after the predict)."""
    if sample is None or sample.images:
        return call()
    with PartCounter() as counter:
        out = call()
    _add(sample.per_images, counter.per_call)
    if done:
        sample.images = 1
    return out


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for part, flops in counts.items():
        into[part] += flops


class _RunsLog:
    """One JSON line per finished run, under a header naming the job's fingerprint (another job's
    log is set aside, never mixed in)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint

    def read(self) -> dict[int, dict[str, Any]]:
        if not self.path.exists():
            header = json.dumps({"fingerprint": self.fingerprint}) + "\n"
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(header))
            return {}
        lines = self.path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("fingerprint") != self.fingerprint:
            raise EvalError(f"{self.path} holds the runs of another job (other settings or inputs); remove it or pass "
                            "--overwrite.")
        done = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that run is redone
                continue
            done[int(record["run"])] = record
        return done

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


__all__ = ["UPDATE_RULES", "evaluate_orders", "plan_runs", "runs_log_path", "update_rule"]
