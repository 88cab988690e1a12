"""The shared vocabulary of the published tables: datasets, class counts, and the types a table is made of.

:class:`TTASpec` (a test-time setting), :class:`RunSpec` (how many stream orders, or which StatA
scenario, a cell replays), :class:`Row`, :class:`Average` and :class:`Protocol`, the number helpers
the table modules type their published numbers with, and the departures common to every table.
Nothing here imports torch or reads a file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

#: the ten ProText/CoOp target datasets besides ImageNet, in Table 4's column order
CROSS_TARGETS = (
    "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)
#: ImageNet's four variants, in ProText Table 5's column order (V2, Sketch, A, R)
VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
#: the column order of ProText Table 2/6
TEXT_ONLY_ORDER = (
    "imagenet", "caltech101", "dtd", "eurosat", "stanford_cars", "oxford_flowers",
    "fgvc_aircraft", "sun397", "oxford_pets", "ucf101", "food101",
)
#: TPT's natural-shift column order (ImageNet, A, V2, R, Sketch)
TPT_OOD_ORDER = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
#: TPT's fine-grained column order
TPT_XD_ORDER = (
    "fgvc_aircraft", "caltech101", "stanford_cars", "dtd", "eurosat",
    "oxford_flowers", "food101", "oxford_pets", "sun397", "ucf101",
)

#: class counts of every dataset (ImageNet-A and -R: the 200-class subsets their builder keeps)
CLASS_COUNTS = {
    "imagenet": 1000, "imagenet_v2": 1000, "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200,
    "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102, "food101": 101,
    "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101,
}

FEATURES = ("clip", "cupl", "prompts", "ensemble", "ensemble80", "template+cupl", "ensemble+cupl", "ensemble80+cupl")
"""Class features: one template (clip), the mean of a class's CuPL descriptions (cupl), learned prompts,
the mean over ZERO+Ensemble's seven templates (ensemble) or CLIP's 80 ImageNet templates (ensemble80),
or those templates and the CuPL descriptions in one mean (``+cupl``: DMN-ZS's and DPE's ``tip_cupl``)."""

#: ZERO's published default seed (TTA.md §1); equals ``protext.tta.zero.PUBLISHED_SEED`` (tested),
#: repeated here because this module imports no torch
ZERO_SEED = 1


@dataclass(frozen=True)
class TTASpec:
    """A test-time adaptation setting of a row (TTA.md, PRESETS.md "TPT (published defaults)").

    A field left at None takes the method's published default for the dataset (:mod:`protext.tta`
    resolves it: TDA's 1 or 64 views, C-TPT's λ 50 or 20, TDA's (α⁺, β⁺), AugMix on the fine-grained
    sets), and the evaluation records the value it resolved. ``init`` is where TPT's prompts start:
    ``handcrafted`` ("a photo of a", 4 tokens), ``prompts`` (the row's ProText checkpoint) or ``coop``.
    ``augmix_by_dataset`` overrides ``augmix`` per dataset (C-TPT's natural-shift runs: on for
    A/V2/R/Sketch, off for ImageNet). ``seed`` is the views' seed the published runs used (ZERO: 1);
    None: the run's ``--seed``. ``options`` are further registry options by flag dest, fixed by the
    protocol for every dataset (OGA's TDA: ``tda_alpha`` 2, ``tda_beta`` 5; its DMN: ``dmn_memory`` 8).
    """

    method: str = "tpt"
    views: Optional[int] = 64
    selection: Optional[float] = 0.1
    steps: Optional[int] = 1
    lr: Optional[float] = 5e-3
    init: Optional[str] = "handcrafted"
    augmix: Optional[bool] = None
    augmix_by_dataset: tuple[tuple[str, bool], ...] = ()
    seed: Optional[int] = None
    options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``augmix_by_dataset`` and ``options`` as objects; ``options`` only when set)."""
        out = asdict(self)
        out["augmix_by_dataset"] = dict(self.augmix_by_dataset)
        out.pop("options")
        if self.options:
            out["options"] = dict(self.options)
        return out

    def augmix_for(self, dataset: str) -> Optional[bool]:
        """AugMix on ``dataset``: its entry in ``augmix_by_dataset``, else ``augmix`` (None: the method's default)."""
        return dict(self.augmix_by_dataset).get(dataset, self.augmix)

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """The settings of one cell on ``dataset``, JSON-ready: ``augmix`` resolved per dataset, and
        ``seed`` and ``options`` present only where the protocol fixes them."""
        out = {k: v for k, v in asdict(self).items() if k not in ("augmix_by_dataset", "seed", "options")}
        out["augmix"] = self.augmix_for(dataset)
        if self.seed is not None:
            out["seed"] = self.seed
        if self.options:
            out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class RunSpec:
    """What a cell of a protocol table replays from one encoding (TTA2.md §11; :mod:`protext.streams`).

    Either ``stream_runs`` seeded orders of the whole test set (OGA: 100 orders from master seed
    42), or the StatA ``scenario`` (``very_low`` … ``all``, ``online-low`` … ``online-separate``)
    with ``tasks`` tasks or streams (None: StatA's 1000 / 100) drawn from ``stream_seed`` (None:
    StatA's 1). The evaluation is ``eval --stream-runs N --stream-seed S`` or ``eval --scenario NAME
    --tasks N --stream-seed S`` (:mod:`protext.evaluation.orders`).
    """

    stream_runs: Optional[int] = None
    stream_seed: Optional[int] = None
    scenario: Optional[str] = None
    tasks: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.stream_runs is None) == (self.scenario is None):
            raise ValueError("a RunSpec replays either stream_runs orders or a scenario")
        if self.tasks is not None and self.scenario is None:
            raise ValueError("tasks count a scenario's tasks or streams")


TPT = TTASpec()
ZERO = TTASpec("zero", views=64, selection=0.3, steps=None, lr=None, init=None, seed=ZERO_SEED)
TDA = TTASpec("tda", views=None, selection=None, steps=None, lr=None, init=None)
CTPT = TTASpec("ctpt")
#: C-TPT's natural-shift runs switch AugMix on for A/V2/R/Sketch (TTA.md §2); ImageNet shares the
#: fine-grained protocol (λ 50) and, as in TPT's code (set 'I'), has no AugMix (PUBLISHED.md)
CTPT_SHIFTS = TTASpec(
    "ctpt", augmix_by_dataset=(("imagenet", False),) + tuple((d, True) for d in VARIANTS),
)


_ONLINE = dict(views=None, selection=None, steps=None, lr=None, init=None)
DMN = TTASpec("dmn", **_ONLINE)
DMN_ORACLE = TTASpec("dmn-oracle", **_ONLINE)
DPE = TTASpec("dpe", **_ONLINE)
BOOST = TTASpec("boost", **_ONLINE)
OTPT = TTASpec("otpt")
#: O-TPT's natural-shift script switches AugMix on for A/V2/R/Sketch with λ 2 (TTA2.md §9), as C-TPT's
OTPT_SHIFTS = TTASpec("otpt", augmix_by_dataset=(("imagenet", False),) + tuple((d, True) for d in VARIANTS))
TPS = TTASpec("tps", views=None, selection=None, steps=None, lr=None, init=None)


@dataclass(frozen=True)
class Row:
    """One row of a table: how every cell of that row builds its class features.

    Attributes:
        name: the row label as the paper prints it (``CLIP``, ``CuPL``, ``ProText``, ``TPT`` ...).
        features: ``clip``, ``cupl``, ``prompts`` or ``ensemble`` (ZERO's seven templates).
        template_rule: ``protext``, ``coop`` or ``tpt`` (:mod:`protext.templates`).
        preset: the preset that trains the row's prompts; ``{dataset}`` is replaced by the
            column's dataset (``text_only/{dataset}``). None for rows without learned prompts.
        novel_features: class features on the novel half when they differ (CuPL has no
            descriptions of unseen classes: its novel cells are CLIP's).
        features_by_dataset: per-dataset exceptions to ``features`` (TDA's published features).
        tta: test-time adaptation, or None.
        external: a user-supplied checkpoint the row needs (``coop``: CoOp's 16-shot ImageNet
            prompts, which protext cannot train from text); its cells are skipped without one.
        note: why the row is set up this way (printed in ``TABLE.md``).
        runs: the orders or scenario every cell of the row replays (protocol tables); None in a
            protocol table: the row's predictions do not depend on the order (zero-shot, episodic
            methods), and each cell is one run.
    """

    name: str
    features: str
    template_rule: str
    preset: Optional[str] = None
    novel_features: Optional[str] = None
    features_by_dataset: tuple[tuple[str, str], ...] = ()
    tta: Optional[TTASpec] = None
    external: Optional[str] = None
    note: str = ""
    runs: Optional[RunSpec] = None

    def features_for(self, dataset: str, split: str) -> str:
        """The class features of the row's cell on ``dataset``/``split``."""
        if split == "novel" and self.novel_features:
            return self.novel_features
        return dict(self.features_by_dataset).get(dataset, self.features)

    def preset_for(self, dataset: str) -> Optional[str]:
        """The preset that trains this row's prompts for a column's dataset, if any."""
        return self.preset.format(dataset=dataset) if self.preset else None


@dataclass(frozen=True)
class Average:
    """An average column: the mean of a row's cells over ``datasets`` (recomputed, never copied)."""

    name: str
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class Protocol:
    """One published table.

    Attributes:
        name: the table's command-line name (``protext-base2novel``).
        title: the paper and table it reproduces.
        datasets: the columns, in the paper's order.
        splits: ``("all",)``, or ``("base", "novel")`` for base-to-novel (harmonic mean added).
        rows: the rows, in the paper's order.
        averages: the average columns.
        published: ``(row, dataset, measure) -> number``; measure is ``top1``, ``base``,
            ``novel``, ``hm`` or ``ece``.
        published_averages: the paper's own average cells, ``(row, average, measure) -> number``.
        notes: protocol facts every reader of the table needs (printed in ``TABLE.md``).
        report_ece: also report the expected calibration error (C-TPT's tables print acc / ECE).
        departures: every place protext still runs this table differently from the paper, and why
            (:data:`COMMON_DEPARTURES` apply to every table and are added by :meth:`all_departures`).
        report_runs: a protocol table (OGA, StatA): every cell reports the mean top-1 over its runs,
            the Expected Tail Accuracy and the spread of the runs (``top1``, ``eta``, ``spread``).
        published_only: published numbers of methods protext does not implement (OGA, StatA,
            TransCLIP), ``(method, setting, number)``: shown beside the table, never as cells.
        pivot: ``(row, method, setting, published)`` entries: the rows' 11-set averages laid out
            method × setting (StatA's own shape) in ``TABLE.md``, with the paper's number for that
            setting (None: not published); a row may fill several settings (an order-free one).
    """

    name: str
    title: str
    datasets: tuple[str, ...]
    splits: tuple[str, ...]
    rows: tuple[Row, ...]
    averages: tuple[Average, ...]
    published: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    published_averages: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    report_ece: bool = False
    departures: tuple[str, ...] = ()
    report_runs: bool = False
    published_only: tuple[tuple[str, str, float], ...] = ()
    pivot: tuple[tuple[str, str, str, Optional[float]], ...] = ()

    def all_departures(self) -> list[str]:
        """This table's departures from the paper, then those common to every table."""
        return list(self.departures) + list(COMMON_DEPARTURES)

    @property
    def trains_prompts(self) -> bool:
        """Whether a row trains prompts (it names a preset): only then do ``--epochs`` and ``--depth``
        change the table's numbers, and only then are they departures."""
        return any(row.preset for row in self.rows)

    @property
    def base_to_novel(self) -> bool:
        """True when the cells are base and novel halves, with a harmonic mean per dataset."""
        return self.splits == ("base", "novel")

    def measures(self) -> tuple[str, ...]:
        """The numbers reported per (row, dataset): ``top1``, or ``base``/``novel``/``hm``, or the
        runs' ``top1`` (mean), ``eta`` and ``spread``."""
        if self.base_to_novel:
            return ("base", "novel", "hm")
        if self.report_runs:
            return ("top1", "eta", "spread")
        return ("top1", "ece") if self.report_ece else ("top1",)

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.name} has no row {name!r}")


# --------------------------------------------------------------------------------------------------
# helpers the table modules type their published numbers with (tests/test_protocols.py compares every
# number with the design docs)


def row_numbers(row: str, datasets: tuple[str, ...], values: tuple[float, ...], measure: str = "top1"):
    if len(datasets) != len(values):
        raise ValueError(f"{row}: {len(values)} numbers for {len(datasets)} datasets")
    return {(row, d, measure): v for d, v in zip(datasets, values)}


def b2n_numbers(row: str, cells: Mapping[str, tuple[float, float, float]]):
    out = {}
    for dataset, (base, novel, hm) in cells.items():
        out.update({(row, dataset, "base"): base, (row, dataset, "novel"): novel, (row, dataset, "hm"): hm})
    return out


def sparse_numbers(rows: Mapping[str, tuple[Optional[float], ...]], order: tuple[str, ...], measure: str = "top1") -> dict:
    """Published cells of rows that print only some datasets (``None``: not published)."""
    out: dict = {}
    for row, values in rows.items():
        kept = [(d, v) for d, v in zip(order, values) if v is not None]
        out.update(row_numbers(row, tuple(d for d, _ in kept), tuple(v for _, v in kept), measure))
    return out


def numbers_by_row(rows: Mapping[str, tuple[float, ...]], order: tuple[str, ...]) -> dict:
    out: dict = {}
    for row, values in rows.items():
        out.update(row_numbers(row, order, values))
    return out



COMMON_DEPARTURES = (
    "Runs on the CPU are fp32 throughout; the published GPU evaluations ran fp16 (protext's default on CUDA, "
    "--precision auto), so CPU numbers can differ from GPU ones in the last digits.",
)
"""Departures that hold for every table."""
