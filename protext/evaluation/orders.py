"""An online method over many stream orders from one encoding: ``eval --tta tda --stream-runs 100``.

The published gains of online methods are about the size of the effect of the stream order (OGA,
TTA2.md §11.1). This runs the method over N seeded permutations of the test set, exactly OGA's
(``(--stream-seed, N)`` gives the same N orders for every method and process), with a fresh adapter
per run, and reports every run's accuracy and ECE with their mean, spread and the Expected Tail
Accuracy (the mean of the worst 10 % of runs).

The views of an image do not depend on the order (they are keyed by the seed and the image's
index), so each image is encoded once and the N orders are replayed from those features: 100 orders
cost one pass over the images plus the method's own arithmetic. Finished runs are logged one line
each; a killed job re-encodes the images and continues with the first unfinished run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write
from ..distributed import init_distributed
from ..results import Prediction, compute_metrics, predictions_from_logits, write_results
from . import adapters
from .config import EvalConfig, EvalError
from .data import SeededViews, batches, progress_bar
from .loop import ShardResult, build_adapter, build_setup, class_features
from .preflight import AlreadyDone
from .runtime import peak_memory, reset_peak_memory


def runs_log_path(out: Path) -> Path:
    """The finished runs of a multi-order job, one JSON line each, beside its results file."""
    return out.with_name(out.name + ".runs.jsonl")


def evaluate_orders(config: EvalConfig, *, clip: Any = None, progress: bool = True,
                    command: Optional[str] = None) -> dict[str, Any]:
    """``config.tta`` (online) over ``config.stream_runs`` OGA orders; the results payload.

    Raises:
        protext.errors.UserError: bad flags or inputs, before any model loads.
    """
    from ..streams import oga_seeds, summarize_runs
    from .payload import build_payload
    from .resume import remove_logs

    started = time.perf_counter()
    ctx = init_distributed(use_cuda=config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()))
    try:
        setup = build_setup(config, ctx, clip, progress and config.progress)
    except AlreadyDone as done:
        print(f"note: {done.path} already holds this run's result; nothing to do (--overwrite recomputes it).", file=sys.stderr)
        return done.payload
    out = config.output_path()
    seeds = oga_seeds(config.stream_seed_or_default, config.stream_runs)
    if config.overwrite:
        runs_log_path(out).unlink(missing_ok=True)
    log = _RunsLog(runs_log_path(out), setup.fingerprint)
    finished = log.read()
    reset_peak_memory(setup.runtime.device)
    encoded, labels, encode_seconds = _encode_once(setup, progress and config.progress)
    text = class_features(setup)
    tta_cfg = adapters.tta_config(config, setup.runtime)
    runs: list[dict[str, Any]] = []
    first: Optional[ShardResult] = None
    with progress_bar(len(seeds), setup.progress, f"{setup.dataset.name} {config.tta} orders") as bar:
        for r, seed in enumerate(seeds):
            result, record = _one_run(setup, tta_cfg, text, encoded, labels, r, seed, finished.get(r))
            if r not in finished:
                log.append(record)
            if first is None:
                first = result
            runs.append(record)
            bar.update(1)
    first.peak_memory = peak_memory(setup.runtime.device)
    first.seconds = encode_seconds + first.seconds
    payload = build_payload(setup, [[first]], command or f"protext.evaluation.evaluate_orders({config!r})",
                            time.perf_counter() - started)
    summary = {"top1": summarize_runs([run["top1"] for run in runs]).to_dict()}
    # the tail is of accuracy; ECE gets its spread only (its "worst" runs are its highest)
    summary["ece"] = {k: v for k, v in summarize_runs([run["ece"] for run in runs]).to_dict().items()
                      if k not in ("eta", "tail_runs")}
    payload["runs"] = {
        "protocol": "OGA (TTA2.md §11.1): N seeded permutations, a fresh adapter per run; views and their "
                    "features shared by every run (encoded once)",
        "master_seed": config.stream_seed_or_default, "n_runs": len(seeds), "seeds": seeds,
        "order": "np.random.default_rng(seed).choice(range(N), N, replace=False)",
        "per_run": runs, "summary": summary,
        "note": "ETA = mean top-1 of the worst 10% of runs; the predictions above are run 0's",
    }
    payload["metrics"]["top1_mean_over_runs"] = summary["top1"]["mean"]
    payload["metrics"]["top1_eta"] = summary["top1"]["eta"]
    payload["timing"]["encode_seconds"] = encode_seconds
    if setup.ctx.is_main:
        write_results(payload, out)
        remove_logs(out, setup.fingerprint)
        runs_log_path(out).unlink(missing_ok=True)
    return payload


def _encode_once(setup, progress: bool) -> tuple[list[torch.Tensor], list[int], float]:
    """Every image's view features, in dataset order (the views keyed by seed and index)."""
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
            features.append(encoder(views[0]))
            labels += list(batch_labels)
            bar.update(1)
    return features, labels, time.perf_counter() - began


def _one_run(setup, tta_cfg, text: torch.Tensor, encoded: list[torch.Tensor], labels: list[int], r: int, seed: int,
             done: Optional[dict[str, Any]]) -> tuple[ShardResult, dict[str, Any]]:
    """Run ``r``: a fresh adapter over the features in order ``seed``; its metrics (from the log
    when an earlier job finished it, except run 0, whose predictions the results keep)."""
    from ..streams import oga_order

    result = ShardResult(stream={"seed": seed, "order": "oga", "run": r})
    if done is not None and r > 0:
        return result, done
    adapter = build_adapter(setup, tta_cfg, text_features=text)
    order = oga_order(seed, len(encoded))
    predictions: list[Prediction] = []
    began = time.perf_counter()
    for index in order:
        out = adapter.adapt_features(encoded[index])
        predictions += predictions_from_logits([index], [labels[index]], out.logits.float().cpu()[None],
                                               keep_logits=setup.config.save_logits,
                                               calibration_logits=out.calibration_logits.float().cpu()[None])
    result.seconds = time.perf_counter() - began
    result.predictions = sorted(predictions, key=lambda p: p.index)
    metrics = compute_metrics(result.predictions, setup.classnames)
    record = {"run": r, "seed": seed, "top1": metrics.top1, "ece": metrics.ece, "first_indices": order[:10],
              "seconds": result.seconds}
    return result, record


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


__all__ = ["evaluate_orders", "runs_log_path"]
