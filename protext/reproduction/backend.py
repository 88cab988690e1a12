"""The adapter onto protext's training and evaluation: :class:`LibraryRunner`, the real :class:`CellRunner`.

The model is loaded once, on first use, and passed to every training and evaluation of the table.
Every heavy import (torch, the model, training, evaluation) happens inside a method, so planning
and listing tables never pay for it.
"""

from __future__ import annotations

import json
import platform
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .config import ReproduceConfig, ReproduceError
from .plan import ENSEMBLE, Cell
from .run_folder import read_json, write_json
from .runner import EvalRequest, PromptJob


def evaluation_template(cell: Cell) -> Optional[str]:
    """The ``--template`` a cell's evaluation is given: None wherever the evaluation's own rule
    (:func:`protext.templates.choose_template`, the planner's too) gives the cell's template.

    Only prompts on their training dataset need it: the evaluation records a checkpoint's training
    template as saved (``{}.``), the table writes it in full (``a photo of a {}.``). Both encode the
    same prompt, since the learned context replaces "a photo of a".
    """
    return cell.template if cell.in_domain else None


class LibraryRunner:
    """Trains with :func:`protext.training.run_training`, evaluates with :func:`protext.evaluation.evaluate`.

    The model is loaded once, on first use, and passed to every training and evaluation.
    """

    def __init__(self, config: ReproduceConfig) -> None:
        self.config = config
        self._clip = None
        self._device = None

    def _load(self):
        if self._clip is None:
            from ..devices import resolve_device
            from ..models import load_clip

            self._device = resolve_device(self.config.device)  # a DeviceError (a UserError) names --device
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
                try:
                    self._clip = load_clip(self.config.model, self.config.pretrained, device=self._device, seed=self.config.seed)
                except (ValueError, FileNotFoundError, RuntimeError) as err:
                    raise ReproduceError(f"--model {self.config.model} --pretrained {self.config.pretrained}: {err}") from None
        return self._clip

    def environment(self) -> dict[str, Any]:
        """Device, versions, CPU capability and model identity, recorded with every cell."""
        from ..evaluation.runtime import device_name, versions
        from ..hardware import cpu_capability
        from ..models import text_fingerprint

        clip = self._load()
        return {
            "device": str(self._device),
            "device_name": device_name(self._device),
            "cpu_capability": cpu_capability(),
            "versions": versions(),
            "python": platform.python_version(),
            "model": clip.identity,
            "text_tower_fingerprint": text_fingerprint(clip.model),
        }

    def check_prompts(self, path: Path) -> None:
        """Refuse (``UserError``) a checkpoint trained on other text-tower weights than the model's."""
        from ..checkpoint import check_weights, load_prompts

        check_weights(load_prompts(path), self._load(), path)

    def train(self, job: PromptJob) -> dict[str, Any]:
        """Train (or resume) ``job``'s preset on the loaded model; its record, wall time under ``cost``."""
        from ..training import TrainJob, run_training

        # a run killed after its last checkpoint but before its record (or its loss plot) was written
        # resumes like any other: the saved state says every epoch is done, so nothing is retrained,
        # and run_training writes the history, the plot and the same record as an uninterrupted run
        classes = job.checkpoint.with_suffix(".classes.json")
        write_json(classes, job.classes)
        train_job = TrainJob(
            descriptions=job.descriptions, preset=job.preset, classes=str(classes), split=job.split,
            **dict(job.overrides), out=job.checkpoint,  # epochs, depth: TrainJob fields
            cache_dir=job.checkpoint.parent / "targets", resume=True, model=self.config.model,
            pretrained=self.config.pretrained, device=str(self._device or self.config.device),
        )
        self._load()
        outcome = run_training(train_job, clip=self._clip, progress=self.config.progress)
        if not outcome.complete:
            raise ReproduceError(f"training {job.preset} stopped: {outcome.message or outcome.status}")
        last = outcome.history[-1] if outcome.history else None
        return {
            "cost": {"seconds": round(float(outcome.seconds), 3)}, "epochs": len(outcome.history),
            "final_loss": getattr(last, "loss", None), "samples": outcome.samples, "classes": len(outcome.classes),
            "settings": _jsonable(outcome.settings or train_job.settings()),  # the depth fitted to the tower
        }

    def eval_config(self, request: EvalRequest):
        """The :class:`protext.evaluation.EvalConfig` of a cell's evaluation (nothing is loaded or run)."""
        from ..evaluation import EvalConfig

        cell, tta = request.cell, request.cell.tta or {}
        runs = cell.runs if cell.runs and cell.runs["kind"] != "order-free" else {}
        return EvalConfig(
            dataset=cell.dataset, root=request.root, split=cell.split, limit=request.limit,
            model=self.config.model, pretrained=self.config.pretrained, device=self.config.device,
            precision=self.config.precision, method=cell.features,
            template=evaluation_template(cell),
            templates=cell.template_rule, descriptions=_opt(request.descriptions), prompts=_opt(request.checkpoint),
            tta=tta.get("method"), tta_views=tta.get("views"), tta_selection=tta.get("selection"),
            tta_steps=tta.get("steps"), tta_lr=tta.get("lr"), tta_init=tta.get("init"), augmix=tta.get("augmix"),
            tta_options=dict(tta["options"]) if tta.get("options") else None,
            stream_runs=runs.get("stream_runs"), stream_seed=runs.get("stream_seed"), scenario=runs.get("scenario"),
            tasks=runs.get("tasks"),
            batch_size=self.config.batch_size, workers=self.config.workers,
            seed=self.config.seed if tta.get("seed") is None else tta["seed"],  # ZERO: its published seed
            out=str(request.out / "results.json"), progress=self.config.progress,
        )

    def finished(self, request: EvalRequest) -> Optional[dict[str, Any]]:
        """The cell's evaluation when it finished before a kill that came before the cell file; else None.

        Under torchrun rank 0 asks this before calling the ranks into an evaluation: a finished one
        is read back by rank 0 alone, and the others are never called.
        """
        done = request.out / "results.json"
        if not done.is_file():
            return None
        payload = read_json(done, f"delete {request.out} to re-evaluate the cell")
        return _cell_result(payload, request.cell.template, request.cell.runs)

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Evaluate one cell (or read back its finished evaluation); the parts of the results a cell keeps.

        Under torchrun every rank calls it for the same cell at once: the evaluation shards the images
        over the ranks and merges them exactly (see :mod:`protext.evaluation.loop`).
        """
        from ..evaluation import evaluate  # looked up on use: tests replace protext.evaluation.evaluate

        done = self.finished(request)
        if done is not None:  # evaluated before a kill that came before the cell file: not redone
            return done
        payload = evaluate(self.eval_config(request), clip=self._load(), progress=self.config.progress)
        return _cell_result(payload, request.cell.template, request.cell.runs)


def _opt(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(asdict(value), default=str))
    except TypeError:
        return str(value)


def _cell_result(payload: dict[str, Any], ensemble: str = ENSEMBLE, runs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The parts of an evaluation's results a table cell keeps; ``ensemble`` names the template of an
    ensemble cell (whose evaluation records a list of templates, not one); ``runs``: the cell's
    orders or scenario in a protocol table (see :func:`_run_metrics`)."""
    metrics = payload["metrics"]
    kept = {k: metrics[k] for k in ("top1", "top5", "mean_per_class", "ece", "acc1", "acc5", "mean_per_class_recall", "n_images")
            if k in metrics}
    kept["n_classes"] = payload["dataset"]["n_classes"]
    timing = payload["timing"]
    result = {
        "metrics": kept,
        "cost": {"image_seconds": timing["eval_seconds"], "seconds_per_image": timing["seconds_per_image"],
                 "peak_memory": timing["peak_memory"], "gflops_per_image": timing.get("gflops_per_image")},
        "template": payload["template"].get("template") or ensemble,
        "details": {
            "template": payload["template"],
            "method": payload["method"],
            "checkpoint": payload.get("checkpoint"),
            "tta": {k: v for k, v in (payload.get("tta") or {}).items() if not k.startswith("seconds")} or None,
            "runtime": payload["runtime"],
        },
    }
    if runs is not None:
        kept.update(_run_metrics(payload, runs, result))
    return result


def _run_metrics(payload: dict[str, Any], runs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A protocol-table cell's numbers: ``top1`` the mean over its runs, ``eta`` the Expected Tail
    Accuracy, ``spread`` the runs' standard deviation (ddof 0), ``runs`` their count; the per-run
    accuracies and the draws go under ``details.runs``.

    An order-free cell (zero-shot, an episodic method) is one run whose predictions no order
    changes: its mean and ETA are its top-1, its spread 0.
    """
    if runs["kind"] == "order-free":
        top1 = payload["metrics"]["top1"]
        result["details"]["runs"] = {"kind": "order-free", "note": "predictions independent of the order: one run"}
        return {"top1": top1, "eta": top1, "spread": 0.0, "runs": 1}
    replay = payload["runs"]
    summary = replay["summary"]["top1"]
    result["details"]["runs"] = {
        **{k: v for k, v in replay.items() if k not in ("per_run", "summary")},
        "summary": replay["summary"],
        "per_run_top1": [run["top1"] for run in replay["per_run"]],
        "per_run_ece": [run["ece"] for run in replay["per_run"]],
        # each run's seed, size and first images (its wall time is a cost, kept by the evaluation's own file)
        "per_run": [{k: v for k, v in run.items() if k != "seconds"} for run in replay["per_run"]],
    }
    result["cost"]["encode_seconds"] = payload["timing"].get("encode_seconds")
    return {"top1": summary["mean"], "eta": summary["eta"], "spread": summary["std"], "runs": summary["n_runs"],
            "top1_run0_images": payload["metrics"]["top1"], "ece": replay["summary"]["ece"]["mean"]}
