"""A table as a plan of cells (row × dataset [× base/novel]), each with every setting that produced it.

A cell's settings come from the protocol alone (features, class split, template rule and the exact
template, preset and its n_ctx, test-time adaptation, and in the protocol tables the stream orders or
scenario it replays, resolved to every count and seed), so the results say precisely what ran. The
template follows the one policy of :func:`protext.templates.choose_template`, which the evaluation
asks too. Nothing here reads a file or imports torch: ``--plan`` prints it instantly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .. import streams
from ..protocols import CLASS_COUNTS, Protocol, Row, get_protocol
from ..tta import registry
from ..templates import CONTEXT_PHRASE, FROM_TRAINING, choose_template
from .config import ReproduceConfig, check_run_counts, slug

#: the template field of cells whose class features average ZERO's seven templates
ENSEMBLE = "ensemble of 7 templates"
#: the template field of cells whose class features average CLIP's 80 ImageNet templates (TDA on R, Sketch)
ENSEMBLE80 = "ensemble of CLIP's 80 templates"
#: class features that are template ensembles: their cells' template field, and where it comes from
ENSEMBLE_CELLS = {
    "ensemble": (ENSEMBLE, "ZERO+Ensemble's seven templates (TTA.md §1.6)"),
    "ensemble80": (ENSEMBLE80, "CLIP's 80 ImageNet templates, open_clip's OPENAI_IMAGENET_TEMPLATES (TTA.md §3.7)"),
}
#: the template source of prompts evaluated on the dataset they were trained on
IN_DOMAIN = "training template (in-domain prompts)"


def cell_key(row: str, dataset: str, split: str) -> str:
    """A cell's name and file stem: ``<row>__<dataset>__<split>`` in safe characters."""
    return f"{slug(row)}__{dataset}__{split}"


@dataclass(frozen=True)
class Cell:
    """One number of a table, with every setting that produced it (all from the protocol)."""

    table: str
    row: str
    dataset: str
    split: str
    features: str
    template_rule: str
    template: str
    template_source: str
    n_classes: int
    preset: Optional[str] = None
    n_ctx: Optional[int] = None
    tta: Optional[dict[str, Any]] = None
    external: Optional[str] = None
    runs: Optional[dict[str, Any]] = None

    @property
    def key(self) -> str:
        """The cell's file name stem: ``<row>__<dataset>__<split>`` in safe characters."""
        return cell_key(self.row, self.dataset, self.split)

    @property
    def in_domain(self) -> bool:
        """Whether the cell's prompts are evaluated on their training dataset (and keep its template)."""
        return self.template_source == IN_DOMAIN

    def settings(self) -> dict[str, Any]:
        """Every setting, JSON-ready (``runs`` only in the protocol tables, where it is set)."""
        out = asdict(self)
        if self.runs is None:
            del out["runs"]
        return out

    def computation(self) -> tuple:
        """What the number depends on; cells equal here share one evaluation (CuPL novel = CLIP)."""
        tta, runs = json.dumps(self.tta, sort_keys=True), json.dumps(self.runs, sort_keys=True)
        return (self.dataset, self.split, self.features, self.template, self.preset, tta, self.external, runs)


def preset_info(name: str):
    """The named training preset (:func:`protext.presets.get_preset`)."""
    from ..presets import get_preset  # imported on use: listing and planning tables stay instant

    return get_preset(name)


def cell_template(row: Row, dataset: str, features: str) -> tuple[str, str]:
    """(template, where it comes from) for a row's cell on ``dataset``.

    Template ensembles name their list; every other cell asks the one template policy,
    :func:`protext.templates.choose_template`, as the evaluation does.
    """
    if features in ENSEMBLE_CELLS:
        return ENSEMBLE_CELLS[features]
    if features.endswith("+cupl") and features[: -len("+cupl")] in ENSEMBLE_CELLS:
        template, source = ENSEMBLE_CELLS[features[: -len("+cupl")]]
        return f"{template} + CuPL descriptions", f"{source}, and the class's CuPL descriptions in one mean"
    preset = row.preset_for(dataset) if features == "prompts" else None
    trained = preset_info(preset) if preset is not None else None
    decision = choose_template(
        dataset, row.template_rule,
        trained_on=trained.dataset if trained else None,
        # written in full so the context replaces its phrase, the way the table records it
        training_template=f"{CONTEXT_PHRASE} {trained.template}" if trained else None,
    )
    if features == "cupl":  # recorded for completeness: CuPL's class features use no template
        return decision.template, "not used: the class's CuPL descriptions"
    if decision.source == FROM_TRAINING:
        return decision.template, IN_DOMAIN
    if features == "template+cupl":
        return decision.template, f"{row.template_rule} rule, and the class's CuPL descriptions in one mean"
    return decision.template, f"{row.template_rule} rule"


def _cell_for(protocol: Protocol, row: Row, dataset: str, split: str, config: ReproduceConfig) -> Cell:
    features = row.features_for(dataset, split)
    preset = row.preset_for(dataset) if features == "prompts" else None
    template, source = cell_template(row, dataset, features)
    tta = row.tta.for_dataset(dataset) if row.tta else None
    # --tta-views shrinks the many views of a smoke run; a protocol's single pre-computed view stays one
    if tta is not None and config.tta_views is not None and tta.get("views") != 1:
        tta["views"] = config.tta_views
    # TPT and C-TPT start from the hand-crafted "a photo of a" unless the row names another init
    tunes = tta is not None and registry.get(tta["method"]).tunes_prompts
    handcrafted = tta is not None and (tta.get("init") or ("handcrafted" if tunes else None)) == "handcrafted"
    n_ctx = preset_info(preset).n_ctx if preset else (4 if handcrafted else None)
    total = CLASS_COUNTS[dataset]
    n_classes = {"all": total, "base": math.ceil(total / 2), "novel": total - math.ceil(total / 2)}[split]
    return Cell(
        protocol.name, row.name, dataset, split, features, row.template_rule, template, source, n_classes,
        preset, n_ctx, tta, row.external, resolved_runs(protocol, row, config),
    )


def resolved_runs(protocol: Protocol, row: Row, config: ReproduceConfig) -> Optional[dict[str, Any]]:
    """What a protocol table's cell replays, every count, seed and sampler setting written out
    (:mod:`protext.streams`); None outside the protocol tables.

    ``order-free``: one run (zero-shot, episodic methods). ``orders``: OGA's seeded permutations.
    ``tasks``: a StatA batch scenario. ``streams``: a StatA online scenario.
    """
    if not protocol.report_runs:
        return None
    spec = row.runs
    if spec is None:
        return {"kind": "order-free", "runs": 1}
    if spec.stream_runs is not None:
        seed = streams.OGA_MASTER_SEED if spec.stream_seed is None else spec.stream_seed
        return {"kind": "orders", "stream_runs": config.stream_runs or spec.stream_runs, "stream_seed": seed,
                "batch_size": streams.OGA_BATCH_SIZE, "last_batch": "kept, shorter"}
    seed = streams.STATA_SEED if spec.stream_seed is None else spec.stream_seed
    if spec.scenario.startswith("online-"):
        tasks = config.tasks or spec.tasks or streams.STATA_ONLINE_STREAMS
        return {"kind": "streams", "scenario": spec.scenario, "tasks": tasks, "stream_seed": seed,
                "batch_size": streams.STATA_ONLINE_BATCH_SIZE, "gamma": streams.online_setting(spec.scenario[len("online-"):]),
                "last_batch": "dropped when incomplete"}
    batch_size, k_min, k_max = streams.batch_setting(spec.scenario)
    return {"kind": "tasks", "scenario": spec.scenario, "tasks": config.tasks or spec.tasks or streams.STATA_BATCH_TASKS,
            "stream_seed": seed, "batch_size": batch_size, "k_min": k_min, "k_max": k_max}


def describe_runs(runs: dict[str, Any]) -> str:
    """A cell's runs in one phrase, e.g. ``orders runs:100 seed:42 batch:32``."""
    if runs["kind"] == "order-free":
        return "order-free (1 run)"
    if runs["kind"] == "orders":
        return f"orders runs:{runs['stream_runs']} seed:{runs['stream_seed']} batch:{runs['batch_size']}"
    if runs["kind"] == "streams":
        return (f"scenario:{runs['scenario']} streams:{runs['tasks']} seed:{runs['stream_seed']} "
                f"batch:{runs['batch_size']} gamma:{runs['gamma']}")
    classes = "all classes" if runs["k_min"] is None else f"K:{runs['k_min']}-{runs['k_max']}"
    batch = "whole pool" if runs["batch_size"] == -1 else runs["batch_size"]
    return f"scenario:{runs['scenario']} tasks:{runs['tasks']} seed:{runs['stream_seed']} batch:{batch} {classes}"


def plan_cells(protocol: Protocol, config: ReproduceConfig) -> list[Cell]:
    """Every cell of a table, row by row, in the paper's column order."""
    return [
        _cell_for(protocol, row, dataset, split, config)
        for row in protocol.rows
        for dataset in protocol.datasets
        for split in protocol.splits
    ]


def describe_plan(config: ReproduceConfig) -> str:
    """The cells a table would run, one line each with every setting (nothing is read or run)."""
    protocol = get_protocol(config.table)
    check_run_counts(config)
    lines = [f"{protocol.name}: {protocol.title}"]
    for cell in plan_cells(protocol, config):
        tta = "" if not cell.tta else " tta=" + resolved_tta(cell)
        preset = f" preset={cell.preset} n_ctx={cell.n_ctx}" if cell.preset else (f" n_ctx={cell.n_ctx}" if cell.n_ctx else "")
        external = f" needs --{cell.external}" if cell.external else ""
        runs = f" runs=[{describe_runs(cell.runs)}]" if cell.runs else ""
        lines.append(
            f"  {cell.key}: {cell.features}, {cell.n_classes} classes, template '{cell.template}' "
            f"({cell.template_source}){preset}{tta}{runs}{external}"
        )
    lines += [f"  departs: {d}" for d in config.departures(trains=protocol.trains_prompts)]
    lines += [f"  known departure: {d}" for d in protocol.all_departures()]
    methods = dict.fromkeys(row.tta.method for row in protocol.rows if row.tta)
    lines += [f"  {name} departs: {d}" for name in methods for d in registry.get(name).departures]
    return "\n".join(lines)


#: a row's TTA field → the flag dest the registry takes it under
_TTA_DESTS = {"views": "tta_views", "selection": "tta_selection", "steps": "tta_steps", "lr": "tta_lr", "augmix": "augmix"}


def resolved_tta(cell: Cell) -> str:
    """The cell's test-time method with every setting it will run with (the published ones filled in
    for the cell's dataset by the registry), e.g. ``dmn views:32 selection:0.1 ... dmn_beta2:1.0``."""
    given = {_TTA_DESTS[k]: v for k, v in cell.tta.items() if k in _TTA_DESTS and v is not None}
    given.update(cell.tta.get("options") or {})
    method = cell.tta["method"]
    settings = registry.record(method, registry.resolve(method, given, registry.context(cell.dataset)))
    extra = {k: v for k, v in cell.tta.items() if k in ("init", "seed") and v is not None}
    return method + "".join(f" {k}:{v}" for k, v in {**settings, **extra}.items())
