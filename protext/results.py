"""Evaluation results: per-image predictions, the metrics computed from them, and the files written.

Metrics are computed from the merged per-image predictions only, so a run sharded over processes,
or interrupted and resumed from its log, gives the same numbers as one uninterrupted process, by
construction.

A results file ``R.json`` comes with ``R.md`` (the summary row as a markdown table) and
``R.reliability.png`` (the reliability diagram of the calibration bins); :func:`result_files`
names all three so a pre-flight check can test them before any work starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from .atomic import atomic_write

if TYPE_CHECKING:  # torch is imported where logits are turned into predictions: the eval command's
    import torch  # pre-flight reads result_files() from here before anything heavy is loaded

TOP_K = 5
#: equal-width confidence bins of the expected calibration error (TTA.md §5, as C-TPT computes it)
ECE_BINS = 20


@dataclass(frozen=True)
class Prediction:
    """One test image's outcome.

    Attributes:
        index: the image's index in the dataset.
        label: its true label.
        topk: the top-k labels, best first.
        confidence: max softmax probability of the calibration logits (the final logits, or view
            0's for methods whose final score is not a probability, such as ZERO's votes).
        calibration_pred: argmax of the calibration logits (what ``confidence`` is the confidence of).
        logits: the final logits, only when asked for.
        extras: per-image vectors a method keeps for a choice made after the stream (the DMN-ZS
            oracle's text and memory probabilities), logged so that choice survives a resume.
    """

    index: int
    label: int
    topk: tuple[int, ...]
    confidence: float = math.nan
    calibration_pred: int = -1
    logits: Optional[tuple[float, ...]] = None
    extras: Optional[dict[str, tuple[float, ...]]] = None

    @property
    def pred(self) -> int:
        return self.topk[0]

    def record(self) -> dict[str, Any]:
        """A JSON-able dict (floats survive a JSON round trip exactly)."""
        out: dict[str, Any] = {"i": self.index, "y": self.label, "k": list(self.topk), "c": self.confidence, "p": self.calibration_pred}
        if self.logits is not None:
            out["z"] = list(self.logits)
        if self.extras is not None:
            out["x"] = {name: list(values) for name, values in self.extras.items()}
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Prediction":
        logits = record.get("z")
        extras = {name: tuple(float(v) for v in values) for name, values in record["x"].items()} if "x" in record else None
        return cls(int(record["i"]), int(record["y"]), tuple(int(k) for k in record["k"]), float(record["c"]), int(record["p"]),
                   None if logits is None else tuple(float(v) for v in logits), extras)


def predictions_from_logits(
    indices: Sequence[int],
    labels: Sequence[int],
    logits: torch.Tensor,
    k: int = TOP_K,
    keep_logits: bool = False,
    calibration_logits: Optional[torch.Tensor] = None,
) -> list[Prediction]:
    """Predictions of a batch of logits ``(n_images, n_classes)``.

    ``calibration_logits`` (same shape) give the confidence; by default the logits themselves.
    """
    logits = logits.float()  # a torch.Tensor: torch is already loaded by whoever made it
    calib = logits if calibration_logits is None else calibration_logits.float()
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices.tolist()
    conf, cpred = calib.softmax(dim=-1).max(dim=-1)
    rows = [tuple(r) for r in logits.tolist()] if keep_logits else [None] * len(top)
    return [
        Prediction(int(i), int(y), tuple(t), float(c), int(p), r)
        for i, y, t, c, p, r in zip(indices, labels, top, conf.tolist(), cpred.tolist(), rows)
    ]


def merge_predictions(parts: Iterable[Sequence[Prediction]]) -> list[Prediction]:
    """Merge the predictions of every shard into dataset order.

    The same index twice with the same outcome (a batch redone after a resume) is kept once; twice
    with different outcomes is an error: the sharding or the resume log is wrong.
    """
    by_index: dict[int, Prediction] = {}
    for part in parts:
        for p in part:
            seen = by_index.get(p.index)
            if seen is not None and seen != p:
                raise RuntimeError(f"image {p.index} has two different predictions: the sharding or the resume log is wrong.")
            by_index[p.index] = p
    return [by_index[i] for i in sorted(by_index)]


# --------------------------------------------------------------------------------------------------
# metrics


@dataclass
class CalibrationBin:
    """One equal-width confidence bin ``lower < confidence <= upper``."""

    lower: float
    upper: float
    n: int
    accuracy: float  # fraction correct in the bin (0 when empty)
    confidence: float  # mean confidence in the bin (0 when empty)


def calibration_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> list[CalibrationBin]:
    """Sort samples into ``n_bins`` equal-width bins on [0, 1]; a sample is in bin b when
    ``b/n < conf <= (b+1)/n`` (a confidence of exactly 0 is in no bin, as in C-TPT's code)."""
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    bins = []
    for b in range(n_bins):
        lower, upper = b / n_bins, (b + 1) / n_bins
        members = [(c, bool(ok)) for c, ok in zip(confidences, correct) if lower < c <= upper]
        n = len(members)
        acc = sum(ok for _, ok in members) / n if n else 0.0
        conf = sum(c for c, _ in members) / n if n else 0.0
        bins.append(CalibrationBin(lower, upper, n, acc, conf))
    return bins


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> float:
    """ECE in percent: ``100 · Σ_b (n_b / N) · |acc_b − conf_b|`` over :func:`calibration_bins`."""
    total = len(confidences)
    if total == 0:
        return 0.0
    bins = calibration_bins(confidences, correct, n_bins)
    return 100.0 * sum(b.n / total * abs(b.accuracy - b.confidence) for b in bins)


@dataclass
class Metrics:
    """Accuracies and calibration error in percent over a set of predictions."""

    n_images: int
    top1: float
    top5: float
    mean_per_class: float
    ece: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)


def per_class_keys(classnames: Sequence[str]) -> list[str]:
    """The key of each label in per-class results: its name, or ``name [label]`` for a name that
    two labels share (CLIP's ImageNet list names 657 and 744 'missile'), so no class hides another."""
    counts: dict[str, int] = {}
    for name in classnames:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} [{label}]" for label, name in enumerate(classnames)]


def compute_metrics(predictions: Sequence[Prediction], classnames: Sequence[str]) -> Metrics:
    """Top-1, top-5, mean per-class top-1 (classes without images are left out of the mean), ECE.

    Per-class accuracy is kept by label (:func:`per_class_keys`), so two labels with one name are
    two classes in the mean and in ``per_class``."""
    n = len(predictions)
    hits1 = sum(p.pred == p.label for p in predictions)
    hits5 = sum(p.label in p.topk[:TOP_K] for p in predictions)
    seen = [0] * len(classnames)
    right = [0] * len(classnames)
    for p in predictions:
        seen[p.label] += 1
        right[p.label] += int(p.pred == p.label)
    accuracies = {c: 100.0 * right[c] / seen[c] for c in range(len(classnames)) if seen[c]}
    keys = per_class_keys(classnames)
    per_class = {keys[c]: {"accuracy": accuracy, "n": seen[c]} for c, accuracy in accuracies.items()}
    mean = sum(accuracies.values()) / len(accuracies) if accuracies else 0.0
    ece = expected_calibration_error([p.confidence for p in predictions], [p.calibration_pred == p.label for p in predictions])
    return Metrics(
        n_images=n,
        top1=100.0 * hits1 / n if n else 0.0,
        top5=100.0 * hits5 / n if n else 0.0,
        mean_per_class=mean,
        ece=ece,
        per_class=per_class,
    )


def metrics_dict(metrics: Metrics) -> dict[str, Any]:
    """protext's metrics (percent) followed by CLIP_benchmark's names (fractions), so results load
    into either ecosystem's tables."""
    out = asdict(metrics)
    out["acc1"] = metrics.top1 / 100.0
    out["acc5"] = metrics.top5 / 100.0
    out["mean_per_class_recall"] = metrics.mean_per_class / 100.0
    return out


def predictions_table(predictions: Sequence[Prediction]) -> dict[str, list]:
    """Column form of the predictions for JSON: compact and easy to load into a data frame."""
    table: dict[str, list] = {
        "index": [p.index for p in predictions],
        "label": [p.label for p in predictions],
        "topk": [list(p.topk) for p in predictions],
        "confidence": [p.confidence for p in predictions],
        "calibration_pred": [p.calibration_pred for p in predictions],
    }
    if predictions and predictions[0].logits is not None:
        table["logits"] = [list(p.logits or ()) for p in predictions]
    return table


def calibration_dict(predictions: Sequence[Prediction], n_bins: int = ECE_BINS) -> dict[str, Any]:
    """The bins behind the ECE, for the reliability diagram and for readers of the JSON."""
    bins = calibration_bins([p.confidence for p in predictions], [p.calibration_pred == p.label for p in predictions], n_bins)
    return {"n_bins": n_bins, "rule": "lower < confidence <= upper", "bins": [asdict(b) for b in bins]}


# --------------------------------------------------------------------------------------------------
# files


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


def summary_row(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The one-line summary of a results payload (printed, and the markdown file's table)."""
    metrics = payload["metrics"]
    return {
        "dataset": payload["dataset"]["name"],
        "split": payload["dataset"]["split"],
        "method": payload["method"],
        "images": metrics["n_images"],
        "top-1": metrics["top1"],
        "top-5": metrics["top5"],
        "per-class": metrics["mean_per_class"],
        "ECE": metrics["ece"],
        "s/img": payload["timing"]["seconds_per_image"],
    }


def result_files(path: str | os.PathLike) -> dict[str, Path]:
    """Every file :func:`write_results` writes for results path ``path``."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return {
        "json": path,
        "markdown": path.with_name(stem + ".md"),
        "reliability": path.with_name(stem + ".reliability.png"),
    }


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (a crash never leaves half a results file)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")

    atomic_write(path, write)


def write_reliability_diagram(path: str | os.PathLike, calibration: Mapping[str, Any], title: str) -> None:
    """Bars of accuracy per confidence bin against the diagonal, with the ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    bins = calibration["bins"]
    width = 1.0 / len(bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lefts = [b["lower"] for b in bins]
    ax.bar(lefts, [b["accuracy"] for b in bins], width=width, align="edge", edgecolor="black", label="accuracy")
    gaps = [b["confidence"] - b["accuracy"] if b["n"] else 0.0 for b in bins]
    ax.bar(lefts, gaps, bottom=[b["accuracy"] for b in bins], width=width, align="edge", color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_runs_plot(path: str | os.PathLike, runs: Mapping[str, Any], title: str) -> None:
    """The distribution of per-run accuracies (stream orders, tasks or streams) with the worst
    tenth marked and the mean and ETA drawn: what a spread of runs says at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(run["top1"] for run in runs["per_run"])
    summary = runs["summary"]["top1"]
    tail = summary["tail_runs"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = max(5, min(30, len(values) // 3))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="black", alpha=0.8, label=f"{len(values)} {runs['kind']}")
    ax.hist(values[:tail], bins=bins, range=(min(values), max(values)), color="#c44e52", edgecolor="black",
            label=f"worst {tail} (tail)")
    ax.axvline(summary["mean"], color="black", linestyle="-", label=f"mean {summary['mean']:.2f}")
    ax.axvline(summary["eta"], color="#c44e52", linestyle="--", label=f"ETA {summary['eta']:.2f}")
    ax.set(xlabel="top-1 accuracy of a run (%)", ylabel="runs", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_results(payload: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Path]:
    """Write the results JSON, its markdown summary and its reliability diagram; returns the paths.

    The JSON is written last, so its presence means the whole set is there.
    """
    files = result_files(path)
    row = summary_row(payload)
    atomic_write(files["markdown"], lambda tmp: Path(tmp).write_text(markdown_table([row]) + "\n"))
    bins = payload["calibration"]["bins"]
    total = sum(b["n"] for b in bins)
    # the ECE of the bins drawn (with several stream seeds: the first seed's; the table has the mean)
    drawn = 100.0 * sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins) if total else 0.0
    title = f"{row['dataset']} {row['method']}: ECE {drawn:.2f}%"
    write_reliability_diagram(files["reliability"], payload["calibration"], title)
    if payload.get("runs"):  # several orders, tasks or streams: their spread, beside the JSON
        runs_png = Path(files["json"]).with_suffix(".runs.png")
        write_runs_plot(runs_png, payload["runs"], f"{row['dataset']} {row['method']}: {payload['runs']['kind']}")
        files["runs"] = runs_png
    write_json(files["json"], payload)
    return files
