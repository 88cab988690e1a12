"""The results payload: everything a result must say about how it was obtained, and its metrics."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any, Optional

from ..results import calibration_dict, compute_metrics, metrics_dict, predictions_table
from . import adapters
from .cost import flops_record
from .loop import STATE_EVERY, Setup, ShardResult, merged
from ..hardware import cpu_capability
from .runtime import device_name, versions

#: metrics whose mean and spread over stream seeds are reported
_STREAM_METRICS = ("top1", "top5", "mean_per_class", "ece")


def _tta_record(setup: Setup, phases: dict[str, float], n_images: int) -> Optional[dict[str, Any]]:
    config = setup.config
    if not config.tta:
        return None
    tta_cfg = adapters.tta_config(config, setup.runtime)
    record: dict[str, Any] = {
        "method": config.tta,
        "settings": adapters.resolved_settings(tta_cfg, setup.dataset.name),
        "view_seed": config.seed,
        "seconds_per_phase": phases,
        "seconds_per_image_per_phase": {k: v / n_images for k, v in phases.items()} if n_images else {},
    }
    if config.tunes_prompts:
        record["init"] = config.resolved_tta_init()
    if getattr(tta_cfg, "online", False):
        record["stream"] = {"state_saved_every": STATE_EVERY, "sharded": False}
    if setup.oracle:
        record["oracle"] = ("ORACLE, not a test-time result: beta2 chosen after the stream by the accuracy on the test "
                            "labels, as DMN-ZS's published numbers (TTA2.md §6 step 7); the value per stream is under "
                            "streams.per_seed[].oracle")
    return record


def _streams(setup: Setup, parts: list[list[ShardResult]]) -> Optional[dict[str, Any]]:
    """Per stream seed: its order and metrics; and the mean and spread over seeds."""
    if len(parts[0]) == 1 and parts[0][0].stream is None:
        return None
    per_seed = []
    for k, result in enumerate(parts[0]):
        predictions, seconds, _ = merged(parts, k)
        metrics = metrics_dict(compute_metrics(predictions, setup.classnames))
        metrics.pop("per_class")
        per_seed.append({**(result.stream or {}), "metrics": metrics, "predictions": predictions_table(predictions)})
    summary = {}
    for name in _STREAM_METRICS:
        values = [s["metrics"][name] for s in per_seed]
        summary[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "min": min(values), "max": max(values)}
    return {"seeds": [s["seed"] for s in per_seed], "per_seed": per_seed, "summary": summary,
            "note": "one stream, in one process; metrics are over the whole stream of every seed"}


def _peak(parts: list[list[ShardResult]]) -> dict[str, Any]:
    """The largest rank's peak memory, with every rank's (MiB)."""
    peaks = [part[-1].peak_memory or {"kind": "unknown", "mib": 0.0} for part in parts]
    return {"kind": peaks[0]["kind"], "mib": max(p["mib"] for p in peaks), "per_rank_mib": [p["mib"] for p in peaks]}


def _flops(setup: Setup, parts: list[list[ShardResult]]) -> dict[str, Any]:
    """GFLOPs per image from every rank's and stream's counts (:mod:`.cost`); the reused work is
    spread over every image of every stream."""
    results = [r for part in parts for r in part]
    processed = sum(len(r.predictions) for r in results)
    return flops_record([r.flops for r in results], processed, setup.clip.model, setup.clip.name)


def build_payload(setup: Setup, parts: list[list[ShardResult]], command: str, wall_seconds: float) -> dict[str, Any]:
    """The results dict written as JSON (first stream's predictions; every stream under ``streams``)."""
    config = setup.config
    predictions, seconds, phases = merged(parts, 0)
    metrics = compute_metrics(predictions, setup.classnames)
    n = metrics.n_images
    streams = _streams(setup, parts)
    flops = _flops(setup, parts)  # before the result is assembled: it runs one view and one prompt apart
    metrics_out = metrics_dict(metrics)
    if streams:
        for name in _STREAM_METRICS:  # the headline numbers are the mean over stream seeds
            metrics_out[name] = streams["summary"][name]["mean"]
        metrics_out["note"] = f"mean over stream seeds {streams['seeds']}; per seed under 'streams'"
    return {
        "protext_version": versions()["protext"],
        "command": command,
        "dataset": {"name": setup.dataset.name, "root": config.root, "split": config.split, "n_classes": len(setup.classnames),
                    "n_images_in_split": len(setup.dataset), "classnames": setup.classnames},
        "inputs": setup.inputs,  # the image listing and class names this result is of (a rerun compares them)
        "method": config.label(),
        "features": config.method,
        "template": setup.record["template"],
        "model": setup.record["model"],
        "checkpoint": setup.record.get("checkpoint"),
        "descriptions": setup.record.get("descriptions"),
        "tta": _tta_record(setup, phases, n),
        "streams": streams,
        "settings": {**asdict(config), "fingerprint": setup.fingerprint},
        "runtime": {"device": str(setup.runtime.device), "device_name": device_name(setup.runtime.device),
                    "precision": setup.runtime.precision, "world_size": setup.ctx.world_size, "versions": versions(),
                    "cpu_capability": cpu_capability()},
        "metrics": metrics_out,
        "calibration": calibration_dict(predictions),
        "timing": {"wall_seconds": wall_seconds, "eval_seconds": seconds, "seconds_per_image": seconds / n if n else 0.0,
                   "images_per_second": n / seconds if seconds > 0 else 0.0, "peak_memory": _peak(parts),
                   "gflops_per_image": flops["gflops_per_image"], "device": device_name(setup.runtime.device),
                   "flops": flops},
        "predictions": predictions_table(predictions),
    }
