"""Evaluation results: per-image predictions, the metrics computed from them, JSON and markdown.

Metrics are computed from the merged per-image predictions only, so a run sharded over processes
gives the same numbers as one process, by construction.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .atomic import atomic_write

TOP_K = 5


@dataclass(frozen=True)
class Prediction:
    """One test image's outcome: its dataset index, true label and the top-k labels (best first)."""

    index: int
    label: int
    topk: tuple[int, ...]
    logits: Optional[tuple[float, ...]] = None

    @property
    def pred(self) -> int:
        return self.topk[0]


def predictions_from_logits(
    indices: Sequence[int], labels: Sequence[int], logits: torch.Tensor, k: int = TOP_K, keep_logits: bool = False
) -> list[Prediction]:
    """Top-k predictions of a batch of logits (n_images, n_classes), optionally keeping the logits."""
    k = min(k, logits.shape[-1])
    top = logits.float().topk(k, dim=-1).indices.tolist()
    rows = [tuple(r) for r in logits.float().tolist()] if keep_logits else [None] * len(top)
    return [Prediction(int(i), int(y), tuple(t), r) for i, y, t, r in zip(indices, labels, top, rows)]


def merge_predictions(parts: Iterable[Sequence[Prediction]]) -> list[Prediction]:
    """Merge the predictions of every shard into dataset order; an index seen twice is an error."""
    merged = sorted((p for part in parts for p in part), key=lambda p: p.index)
    for a, b in zip(merged, merged[1:]):
        if a.index == b.index:
            raise RuntimeError(f"image {a.index} was evaluated by two shards: the sharding is wrong.")
    return merged


@dataclass
class Metrics:
    """Accuracies in percent over a set of predictions."""

    n_images: int
    top1: float
    top5: float
    mean_per_class: float
    per_class: dict[str, dict[str, float]]


def compute_metrics(predictions: Sequence[Prediction], classnames: Sequence[str]) -> Metrics:
    """Top-1, top-5 and per-class top-1 accuracy (%, classes without images are left out of the mean)."""
    n = len(predictions)
    hits1 = sum(p.pred == p.label for p in predictions)
    hits5 = sum(p.label in p.topk[:TOP_K] for p in predictions)
    seen = [0] * len(classnames)
    right = [0] * len(classnames)
    for p in predictions:
        seen[p.label] += 1
        right[p.label] += int(p.pred == p.label)
    per_class = {
        name: {"accuracy": 100.0 * right[c] / seen[c], "n": seen[c]} for c, name in enumerate(classnames) if seen[c]
    }
    mean = sum(v["accuracy"] for v in per_class.values()) / len(per_class) if per_class else 0.0
    return Metrics(
        n_images=n,
        top1=100.0 * hits1 / n if n else 0.0,
        top5=100.0 * hits5 / n if n else 0.0,
        mean_per_class=mean,
        per_class=per_class,
    )


def predictions_table(predictions: Sequence[Prediction]) -> dict[str, list]:
    """Column form of the predictions for JSON: compact and easy to load into a data frame."""
    table: dict[str, list] = {
        "index": [p.index for p in predictions],
        "label": [p.label for p in predictions],
        "topk": [list(p.topk) for p in predictions],
    }
    if predictions and predictions[0].logits is not None:
        table["logits"] = [list(p.logits or ()) for p in predictions]
    return table


def metrics_dict(metrics: Metrics) -> dict[str, Any]:
    return asdict(metrics)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table with one row per mapping, columns in the first row's key order."""
    if not rows:
        return ""
    columns = list(rows[0].keys())

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (a crash never leaves half a results file)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")

    atomic_write(path, write)
