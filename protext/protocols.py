"""The published tables (``../shared/design/PUBLISHED.md``) as data: what each cell runs, and its number.

A :class:`Protocol` is one table: its datasets (columns), its class splits (``all``, or ``base`` and
``novel`` for base-to-novel), its rows (:class:`Row`: which class features, which template rule,
which preset trains the prompts, which test-time adaptation) and the numbers the paper printed. The
paper's own average cells are kept apart (:attr:`Protocol.published_averages`): protext recomputes
every average and harmonic mean from the rows and shows the paper's beside it, because at least one
printed average (the CLIP text-only ``65.15*``) is not the mean of its own row.

Only :mod:`protext.reproduction` reads this module; nothing here touches torch or the disk, so the
tables can be listed (``python -m protext.reproduce --list``) instantly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional

from .errors import UserError
from .templates import TEMPLATE_RULES

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
    None: the run's ``--seed``.
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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``augmix_by_dataset`` as a ``{dataset: bool}`` object)."""
        out = asdict(self)
        out["augmix_by_dataset"] = dict(self.augmix_by_dataset)
        return out

    def augmix_for(self, dataset: str) -> Optional[bool]:
        """AugMix on ``dataset``: its entry in ``augmix_by_dataset``, else ``augmix`` (None: the method's default)."""
        return dict(self.augmix_by_dataset).get(dataset, self.augmix)

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """The settings of one cell on ``dataset``, JSON-ready: ``augmix`` resolved per dataset, and
        ``seed`` present only where the protocol fixes one."""
        out = {k: v for k, v in asdict(self).items() if k not in ("augmix_by_dataset", "seed")}
        out["augmix"] = self.augmix_for(dataset)
        if self.seed is not None:
            out["seed"] = self.seed
        return out


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

    def all_departures(self) -> list[str]:
        """This table's departures from the paper, then those common to every table."""
        return list(self.departures) + list(COMMON_DEPARTURES)

    @property
    def base_to_novel(self) -> bool:
        """True when the cells are base and novel halves, with a harmonic mean per dataset."""
        return self.splits == ("base", "novel")

    def measures(self) -> tuple[str, ...]:
        """The numbers reported per (row, dataset): ``top1``, or ``base``/``novel``/``hm``."""
        if self.base_to_novel:
            return ("base", "novel", "hm")
        return ("top1", "ece") if self.report_ece else ("top1",)

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.name} has no row {name!r}")


# --------------------------------------------------------------------------------------------------
# published numbers, typed in from PUBLISHED.md (tests/test_protocols.py compares every one with it)


def _row_numbers(row: str, datasets: tuple[str, ...], values: tuple[float, ...], measure: str = "top1"):
    if len(datasets) != len(values):
        raise ValueError(f"{row}: {len(values)} numbers for {len(datasets)} datasets")
    return {(row, d, measure): v for d, v in zip(datasets, values)}


def _b2n_numbers(row: str, cells: Mapping[str, tuple[float, float, float]]):
    out = {}
    for dataset, (base, novel, hm) in cells.items():
        out.update({(row, dataset, "base"): base, (row, dataset, "novel"): novel, (row, dataset, "hm"): hm})
    return out


_CLIP_TEXT_ONLY = (66.72, 92.98, 44.56, 47.84, 65.29, 71.30, 24.90, 62.59, 89.13, 66.83, 86.11)
_CUPL_TEXT_ONLY = (69.62, 94.32, 53.96, 60.27, 65.95, 73.85, 27.66, 69.00, 91.11, 70.63, 86.11)
_PROTEXT_TEXT_ONLY = (70.22, 95.29, 54.02, 58.53, 66.77, 74.42, 29.01, 69.76, 92.72, 71.45, 86.68)

_B2N_ORDER = ("imagenet",) + CROSS_TARGETS
_B2N = {
    "CLIP": (
        (72.43, 68.14, 70.22), (96.84, 94.00, 95.40), (91.17, 97.26, 94.12), (63.37, 74.89, 68.65),
        (72.08, 77.80, 74.83), (90.10, 91.22, 90.66), (27.19, 36.29, 31.09), (69.36, 75.35, 72.23),
        (53.24, 59.90, 56.37), (56.48, 64.05, 60.03), (70.53, 77.50, 73.85),
    ),
    "CuPL": (
        (74.30, 68.14, 71.09), (97.22, 94.00, 95.58), (94.42, 97.26, 95.82), (63.54, 74.89, 68.75),
        (74.36, 77.80, 76.04), (89.93, 91.22, 90.57), (30.61, 36.29, 33.21), (76.02, 75.35, 75.68),
        (62.85, 59.90, 61.34), (59.64, 64.05, 61.77), (75.28, 77.50, 76.37),
    ),
    "ProText": (
        (75.00, 71.38, 73.14), (98.06, 95.63, 96.83), (94.95, 98.00, 96.45), (64.54, 76.08, 69.84),
        (74.36, 78.44, 76.35), (90.20, 91.98, 91.08), (30.91, 34.13, 32.44), (76.14, 79.14, 77.61),
        (63.08, 61.59, 62.33), (59.71, 80.97, 68.73), (75.54, 79.50, 77.47),
    ),
}
_B2N_AVERAGE = {"CLIP": (69.34, 74.22, 71.70), "CuPL": (72.56, 74.22, 73.38), "ProText": (72.95, 76.98, 74.91)}

_CROSS_ORDER = ("imagenet",) + CROSS_TARGETS
_CLIP_CROSS = (66.72, 92.98, 89.13, 65.29, 71.30, 86.11, 24.90, 62.59, 44.56, 47.84, 66.83)
_PROTEXT_CROSS = (69.80, 94.81, 91.01, 66.00, 72.35, 86.66, 24.72, 67.34, 47.93, 51.86, 69.60)

_DG_ORDER = ("imagenet",) + VARIANTS
_DG = {
    "CLIP": (66.72, 60.83, 46.15, 47.77, 73.96),
    "CuPL": (69.62, 63.27, 49.02, 50.72, 77.05),
    "ProText": (70.22, 63.54, 49.45, 51.47, 77.35),
}
_DG_AVERAGE = {"CLIP": 57.18, "CuPL": 60.01, "ProText": 60.45}

_TPT_OOD = {
    "CLIP (`a photo of a`)": (66.73, 47.87, 60.86, 73.98, 46.09),
    "TPT": (68.98, 54.77, 63.45, 77.06, 47.94),
    "CoOp (16-shot)": (71.51, 49.71, 64.20, 75.21, 47.99),
    "TPT + CoOp": (73.61, 57.95, 66.83, 77.27, 49.29),
}
_TPT_OOD_AVERAGE = {"CLIP (`a photo of a`)": 57.20, "TPT": 60.81, "CoOp (16-shot)": 59.28, "TPT + CoOp": 62.83}
_TPT_XD = {
    "CLIP (`a photo of a`)": (23.67, 93.35, 65.48, 44.27, 42.01, 67.44, 83.65, 88.25, 62.59, 65.13),
    "TPT": (24.78, 94.16, 66.87, 47.75, 42.44, 68.98, 84.67, 87.79, 65.50, 68.04),
}
_TPT_XD_AVERAGE = {"CLIP (`a photo of a`)": 63.58, "TPT": 65.10}


_TTA_OOD = {
    "ZERO": (69.31, 59.61, 64.16, 77.22, 48.40),
    "ZERO + Ensemble": (71.17, 62.75, 65.23, 80.75, 50.59),
    "TDA": (69.51, 60.11, 64.67, 80.24, 50.54),
    "C-TPT (acc / ECE)": (68.5, 51.6, 62.7, 76.0, 47.9),
}
_CTPT_OOD_ECE = (3.15, 8.16, 6.23, 1.54, 7.35)
_TTA_XD = {
    "ZERO": (25.21, 93.66, 68.04, 46.12, 34.33, 67.68, 86.53, 87.75, 65.03, 67.77),
    "ZERO + Ensemble": (25.21, 94.41, 68.97, 45.86, 42.17, 67.17, 86.77, 87.83, 67.63, 69.18),
    "TDA": (23.91, 94.24, 67.28, 47.40, 58.00, 71.42, 86.14, 88.63, 67.62, 70.66),
    "C-TPT (acc / ECE)": (24.85, 93.63, 65.8, 46.0, 43.2, 69.8, 83.7, 88.2, 64.8, 65.7),
}
_CTPT_XD_ECE = (4.36, 4.24, 1.59, 11.9, 13.2, 5.04, 3.43, 1.90, 5.04, 2.54)
_TTA_XD_AVERAGE = {
    ("ZERO", "top1"): 64.21, ("ZERO + Ensemble", "top1"): 65.52, ("TDA", "top1"): 67.53,
    ("C-TPT (acc / ECE)", "top1"): 64.57, ("C-TPT (acc / ECE)", "ece"): 5.13,
}


# TTA2.md §6-§10; ``None``: not published (or not found)
_TTA2_XD_ORDER = ("imagenet",) + TPT_XD_ORDER
_TTA2_XD = {
    # DMN paper Table 3 [img: dmn figures/zero-shot.png], beta2 searched on the test labels
    "DMN-ZS (beta2 on test labels, as published)": (72.25, 30.03, 95.38, 67.96, 55.85, 59.43, 74.49, 85.08, 92.04, 70.18, 72.51),
    # DPE's results image (cross-domain) and OOD image (ImageNet)
    "DPE": (71.91, 28.95, 94.81, 67.31, 54.20, 55.79, 75.07, 86.17, 91.14, 70.07, 70.44),
    # a third-party listing gives Aircraft only (TTA2.md §8: the repository has no numbers)
    "BoostAdapter": (None, 27.45, None, None, None, None, None, None, None, None, None),
    # O-TPT README "Main Results"
    "O-TPT (acc / ECE)": (67.33, 23.64, 93.95, 64.53, 45.68, 42.84, 70.07, 84.13, 87.95, 64.23, 64.16),
}
_OTPT_XD_ECE = (1.96, 3.68, 3.80, 1.78, 7.88, 12.98, 3.87, 1.46, 1.90, 4.93, 2.34)
_TTA2_XD_AVERAGE = {
    ("DMN-ZS (beta2 on test labels, as published)", "avg (11)", "top1"): 70.72,
    ("DPE", "avg (10 XD)", "top1"): 69.40,
    ("BoostAdapter", "avg (10 XD)", "top1"): 68.68,
    ("O-TPT (acc / ECE)", "avg (11)", "top1"): 64.41,
    ("O-TPT (acc / ECE)", "avg (11)", "ece"): 4.21,
}
_TTA2_OOD = {
    "DMN-ZS (beta2 on test labels, as published)": (72.25, 58.28, 65.17, 78.55, 53.20),
    "DPE": (71.91, 59.63, 65.44, 80.40, 52.26),
    "BoostAdapter": (None, 64.53, None, None, None),
    "O-TPT (acc / ECE)": (None, 49.87, 61.65, 72.55, 47.12),
    "TPS": (70.19, 60.08, 64.73, 80.27, 49.95),
}
_OTPT_OOD_ECE = (None, 7.22, 3.97, 1.46, 6.87)
_TTA2_OOD_AVERAGE = {
    ("DPE", "avg (OOD 4)", "top1"): 64.43, ("DMN-ZS (beta2 on test labels, as published)", "avg (OOD 4)", "top1"): 63.80,
    ("TPS", "avg (OOD 4)", "top1"): 63.76, ("O-TPT (acc / ECE)", "avg (OOD 4)", "top1"): 57.80,
    ("O-TPT (acc / ECE)", "avg (OOD 4)", "ece"): 4.88,
}


def _sparse_numbers(rows: Mapping[str, tuple[Optional[float], ...]], order: tuple[str, ...], measure: str = "top1") -> dict:
    """Published cells of rows that print only some datasets (``None``: not published)."""
    out: dict = {}
    for row, values in rows.items():
        kept = [(d, v) for d, v in zip(order, values) if v is not None]
        out.update(_row_numbers(row, tuple(d for d, _ in kept), tuple(v for _, v in kept), measure))
    return out


def _numbers(rows: Mapping[str, tuple[float, ...]], order: tuple[str, ...]) -> dict:
    out: dict = {}
    for row, values in rows.items():
        out.update(_row_numbers(row, order, values))
    return out


# --------------------------------------------------------------------------------------------------
# rows shared by several tables

_CLIP_COOP = Row("CLIP", "clip", "coop", note="CoOp's one template per dataset (PUBLISHED.md), not the ProText templates")
_CUPL = Row(
    "CuPL", "cupl", "coop", novel_features="clip",
    note="norm(mean of the normalised features of every description of the class, repeats included)",
)
_CLIP_TPT = Row("CLIP (`a photo of a`)", "clip", "tpt", note="TPT's baseline: `a photo of a {}.` on every dataset")
_TPT_ROW = Row("TPT", "clip", "tpt", tta=TPT, note="64 views, 6 kept, 1 AdamW step at 5e-3, prompts reset per image")
# TDA's published class features (TTA.md §3.7): the seven Tip-Adapter templates (ZERO's ensemble) on
# ImageNet, A, V2, Caltech, Cars and SUN; CLIP's 80 templates on R and Sketch (open_clip's list); on
# the rest one dataset template, which in TDA's code is CoOp's (the row's rule)
_TDA_FEATURES = tuple((d, "ensemble") for d in (
    "imagenet", "imagenet_a", "imagenet_v2", "caltech101", "stanford_cars", "sun397")) + tuple(
    (d, "ensemble80") for d in ("imagenet_r", "imagenet_sketch"))
_TTA_ROWS = (
    Row("ZERO", "clip", "tpt", tta=ZERO,
        note="64 views without AugMix, 19 kept, hard votes of the zero-temperature argmax, seed 1 (published)"),
    Row("ZERO + Ensemble", "ensemble", "tpt", tta=ZERO, note="ZERO over the mean feature of its seven templates"),
    Row("TDA", "clip", "coop", features_by_dataset=_TDA_FEATURES, tta=TDA,
        note="online positive/negative caches; 1 view (64 with AugMix on A/V2/R/Sketch); the 7-template "
             "ensemble on ImageNet, A, V2, Caltech, Cars and SUN, CLIP's 80 templates on R and Sketch, "
             "CoOp's template elsewhere (as TDA's code)"),
    Row("C-TPT (acc / ECE)", "clip", "tpt", tta=CTPT, note="TPT with the text-feature dispersion term, λ 50 (20 on A/V2/R/Sketch)"),
)
_TTA_OOD_ROWS = _TTA_ROWS[:3] + (
    Row("C-TPT (acc / ECE)", "clip", "tpt", tta=CTPT_SHIFTS,
        note="TPT with the text-feature dispersion term: ImageNet λ 50 without AugMix, A/V2/R/Sketch λ 20 "
             "with AugMix views, as published"),
)
_TTA_NOTES = ("ImageNet-A and -R are scored on their 200-class subsets.",)

# DMN-ZS's and DPE's tip_cupl (TTA2.md §6, §7): the seven Tip-Adapter templates and the CuPL descriptions
# in one mean on the ImageNet family, Caltech and SUN; one dataset template and the descriptions elsewhere.
# DPE takes CLIP's 80 templates on R and Sketch.
_TIP_CUPL = tuple((d, "ensemble+cupl") for d in (
    "imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch", "caltech101", "sun397"))
_DPE_FEATURES = tuple((d, f) for d, f in _TIP_CUPL if d not in ("imagenet_r", "imagenet_sketch")) + tuple(
    (d, "ensemble80+cupl") for d in ("imagenet_r", "imagenet_sketch"))
_DMN_NOTE = ("online memory of 50 features per class from 32 views (crops of at least half the image, AugMix on the "
             "fine-grained sets); templates + CuPL in one mean (tip_cupl)")
_TTA2_ROWS = (
    Row("DMN-ZS (beta2 = 1)", "template+cupl", "coop", features_by_dataset=_TIP_CUPL, tta=DMN,
        note=_DMN_NOTE + "; the fusion weight beta2 fixed at 1 before the stream (as TTA-VLM and OGA); no paper prints this row"),
    Row("DMN-ZS (beta2 on test labels, as published)", "template+cupl", "coop", features_by_dataset=_TIP_CUPL, tta=DMN_ORACLE,
        note=_DMN_NOTE + "; ORACLE: beta2 picked after the stream by the accuracy on the test labels, as the paper's numbers"),
    Row("DPE", "template+cupl", "coop", features_by_dataset=_DPE_FEATURES, tta=DPE,
        note="evolving text prototypes + a 3-per-class visual queue, one AdamW step per image on two residuals; "
             "64 AugMix views on the ImageNet family, 1 view elsewhere"),
    Row("BoostAdapter", "clip", "coop", features_by_dataset=_TDA_FEATURES, tta=BOOST,
        note="TDA's caches and class features, plus each image's 6 most confident of 64 views as temporary cache "
             "entries; FIFO negative cache"),
    Row("O-TPT (acc / ECE)", "clip", "tpt", tta=OTPT,
        note="TPT plus λ times the non-orthogonality of the class features (closed form), λ 18"),
    Row("TPS", "ensemble80", "tpt", tta=TPS,
        note="per-class shifts of the normalised prototypes (CLIP's 80 templates), one AdamW step at 5e-3 per image"),
)
_TTA2_OOD_ROWS = _TTA2_ROWS[:4] + (
    Row("O-TPT (acc / ECE)", "clip", "tpt", tta=OTPT_SHIFTS,
        note="O-TPT's natural-shift protocol: λ 2 with AugMix views on A/V2/R/Sketch (ImageNet itself: λ 18, no AugMix)"),
    _TTA2_ROWS[5],
)
_TTA2_DEPARTURES = (
    "DMN-ZS's published numbers choose beta2 on the test labels after the stream (TTA2.md §6 step 7): that row is "
    "named as the oracle it is; the test-time row fixes beta2 = 1 before the stream.",
    "DMN-ZS's and DPE's single dataset template is CoOp's, except on Stanford Cars, where DMN uses 'a photo of a {}, "
    "a type of car.' and DPE two templates; TPS's published prototypes add GPT-4 descriptors, which protext does "
    "not have: its row uses CLIP's 80 templates only (the paper's template-only ablation).",
    "DPE and BoostAdapter run fp16 weights in their code; protext runs fp32 on the CPU (fp16 autocast on CUDA).",
    "BoostAdapter's and TPS's per-dataset numbers are mostly unpublished (TTA2.md §8, §10): only the cells found are "
    "shown; BoostAdapter's come from a third-party listing.",
    "One stream order (--seed) per cell for the online methods; the papers' loaders shuffle with their own RNG.",
)

_IN_DOMAIN = "learned context in place of `a photo of a` of the training template, as the authors evaluate in-domain"

COMMON_DEPARTURES = (
    "Runs on the CPU are fp32 throughout; the published GPU evaluations ran fp16 (protext's default on CUDA, "
    "--precision auto), so CPU numbers can differ from GPU ones in the last digits.",
)
"""Departures that hold for every table."""

_PROTEXT_DEPARTURES = (
    "ProText prompts are trained with protext's fast path (targets precomputed, each class encoded once per "
    "batch, shared prefix); it equals the published computation to float rounding, not bit for bit.",
    "Training seed 1 (the trainer's default; PRESETS.md names none), so the learned prompts, and the numbers "
    "they give, are one draw of the published run's randomness.",
)
_ZERO_TDA_DEPARTURES = (
    "One seed per cell, where ZERO and TDA report means over 3 seeds / stream orders: ZERO's cells use its "
    "published seed 1 (whatever --seed says), the others --seed. protext's seed keys each image's own view "
    "stream, not the published code's global torch RNG, so seed 1 does not draw the published run's views.",
    "ZERO votes are hard (the paper's rule); the published GPU runs were fp16, where near-ties give soft votes "
    "(TTA.md §1.5: the fp16-votes variant, not used here).",
    "The C-TPT numbers come from a third-party copy of the paper's tables (lower confidence).",
)

_PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(
        "protext-text-only",
        "ProText (AAAI'25) Table 2/6: text-only supervised, trained and tested on one dataset's classes",
        TEXT_ONLY_ORDER,
        ("all",),
        (_CLIP_COOP, _CUPL, Row("ProText", "prompts", "protext", preset="text_only/{dataset}", note=_IN_DOMAIN)),
        (Average("average (11)", TEXT_ONLY_ORDER),),
        {
            **_row_numbers("CLIP", TEXT_ONLY_ORDER, _CLIP_TEXT_ONLY),
            **_row_numbers("CuPL", TEXT_ONLY_ORDER, _CUPL_TEXT_ONLY),
            **_row_numbers("ProText", TEXT_ONLY_ORDER, _PROTEXT_TEXT_ONLY),
        },
        {
            ("CLIP", "average (11)", "top1"): 65.15,
            ("CuPL", "average (11)", "top1"): 69.31,
            ("ProText", "average (11)", "top1"): 69.90,
        },
        (
            "The paper's CLIP average 65.15* is the mean of its 10 non-ImageNet cells (65.153), not of the 11 "
            "it stands under (65.295); protext shows the recomputed 11-dataset mean.",
        ),
    ),
    Protocol(
        "protext-base2novel",
        "ProText (AAAI'25) Table 3: base-to-novel, prompts trained on the base half of each dataset",
        _B2N_ORDER,
        ("base", "novel"),
        (_CLIP_COOP, _CUPL, Row("ProText", "prompts", "protext", preset="base2novel/{dataset}", note=_IN_DOMAIN)),
        (Average("average", _B2N_ORDER),),
        {k: v for r, cells in _B2N.items() for k, v in _b2n_numbers(r, dict(zip(_B2N_ORDER, cells))).items()},
        {(r, "average", m): v for r, vals in _B2N_AVERAGE.items() for m, v in zip(("base", "novel", "hm"), vals)},
        (
            "Base = the first ceil(n/2) labels, novel = the rest (CoOp); HM = 2*b*n/(b+n) per dataset, and the "
            "average's HM is the HM of the base and novel averages.",
            "CuPL on novel classes is the CLIP row (there are no descriptions of unseen classes).",
        ),
    ),
    Protocol(
        "protext-cross-dataset",
        "ProText (AAAI'25) Table 4: cross-dataset, prompts trained on ImageNet (`cross_dataset` preset)",
        _CROSS_ORDER,
        ("all",),
        (
            _CLIP_COOP,
            Row("ProText", "prompts", "protext", preset="cross_dataset",
                note="ProText templates of PRESETS.md with the learned context in place of `a photo of a`"),
        ),
        (Average("avg (10 targets)", CROSS_TARGETS),),
        _numbers({"CLIP": _CLIP_CROSS, "ProText": _PROTEXT_CROSS}, _CROSS_ORDER),
        {("CLIP", "avg (10 targets)", "top1"): 65.15, ("ProText", "avg (10 targets)", "top1"): 67.23},
        ("ImageNet is the source dataset; the average is over the 10 targets only.",),
    ),
    Protocol(
        "protext-dg",
        "ProText (AAAI'25) Table 5: domain generalisation, the text-only ImageNet prompts (n_ctx 16) on the variants",
        _DG_ORDER,
        ("all",),
        (
            _CLIP_COOP,
            Row("CuPL", "cupl", "coop", note="CuPL's ImageNet file, restricted to each variant's classes"),
            Row("ProText", "prompts", "protext", preset="text_only/imagenet",
                note="the text_only/imagenet prompts (n_ctx 16), `a photo of a {}.` on every variant"),
        ),
        (Average("avg (4)", VARIANTS),),
        _numbers(_DG, _DG_ORDER),
        {(r, "avg (4)", "top1"): v for r, v in _DG_AVERAGE.items()},
        ("ImageNet-A and -R are scored on their 200-class subsets (the dataset builder's class mask).",
         "The average is over the four variants, ImageNet excluded."),
    ),
    Protocol(
        "tpt-ood",
        "TPT (NeurIPS'22) Table 1: natural distribution shifts",
        TPT_OOD_ORDER,
        ("all",),
        (
            _CLIP_TPT,
            _TPT_ROW,
            Row("CoOp (16-shot)", "prompts", "tpt", external="coop",
                note="CoOp's 16-shot ImageNet prompts, trained on images: pass --coop FILE (protext cannot train them)"),
            Row("TPT + CoOp", "prompts", "tpt", tta=TTASpec(init="coop"), external="coop",
                note="TPT initialised from the CoOp prompts of --coop FILE"),
        ),
        (Average("avg (OOD 4)", TPT_OOD_ORDER[1:]),),
        _numbers(_TPT_OOD, TPT_OOD_ORDER),
        {(r, "avg (OOD 4)", "top1"): v for r, v in _TPT_OOD_AVERAGE.items()},
        ("ImageNet-A and -R are scored on their 200-class subsets.", "The average excludes ImageNet."),
    ),
    Protocol(
        "tpt-xd",
        "TPT (NeurIPS'22) Table 2: fine-grained cross-dataset",
        TPT_XD_ORDER,
        ("all",),
        (_CLIP_TPT, _TPT_ROW),
        (Average("avg", TPT_XD_ORDER),),
        _numbers(_TPT_XD, TPT_XD_ORDER),
        {(r, "avg", "top1"): v for r, v in _TPT_XD_AVERAGE.items()},
        ("AugMix views on these fine-grained sets (TPT's protocol).",),
    ),
    Protocol(
        "protext-tpt",
        "ProText cross-dataset prompts + TPT (no published numbers: ours only; the ProText row's "
        "Table 4 numbers are shown where the protocol is Table 4's)",
        _CROSS_ORDER + VARIANTS,
        ("all",),
        (
            Row("ProText", "prompts", "protext", preset="cross_dataset",
                note="the cross_dataset prompts, ProText templates (Table 4's protocol; variants: `a photo of a {}.`)"),
            Row("ProText + TPT", "prompts", "protext", preset="cross_dataset", tta=TTASpec(init="prompts"),
                note="TPT (published defaults) starting from the cross_dataset prompts, context and deep prompts tuned"),
            Row("ProText + O-TPT", "prompts", "protext", preset="cross_dataset", tta=replace(OTPT, init="prompts"),
                note="O-TPT (published λ) starting from the cross_dataset prompts, context and deep prompts tuned"),
            *(Row(f"ProText + {label}", "prompts", "protext", preset="cross_dataset", tta=spec,
                  note=f"{label} (published defaults per dataset) on the class features of the cross_dataset prompts")
              for label, spec in (("DMN-ZS (beta2 = 1)", DMN), ("DPE", DPE), ("BoostAdapter", BOOST), ("TPS", TPS))),
        ),
        (Average("avg (10 targets)", CROSS_TARGETS), Average("avg (4 variants)", VARIANTS)),
        _row_numbers("ProText", _CROSS_ORDER, _PROTEXT_CROSS),
        {("ProText", "avg (10 targets)", "top1"): 67.23},
        ("No paper reports test-time adaptation of ProText prompts; the ProText + method rows have no published numbers.",),
    ),
    Protocol(
        "tta-ood",
        "ZERO (NeurIPS'24), TDA (CVPR'24), C-TPT (ICLR'24): natural distribution shifts",
        TPT_OOD_ORDER,
        ("all",),
        _TTA_OOD_ROWS,
        (Average("avg (OOD 4)", TPT_OOD_ORDER[1:]),),
        {**_numbers(_TTA_OOD, TPT_OOD_ORDER), **_row_numbers("C-TPT (acc / ECE)", TPT_OOD_ORDER, _CTPT_OOD_ECE, "ece")},
        {},
        _TTA_NOTES + ("The papers print no average here; protext's is over A, V2, R and Sketch.",),
        report_ece=True,
    ),
    Protocol(
        "tta-xd",
        "ZERO (NeurIPS'24), TDA (CVPR'24), C-TPT (ICLR'24): fine-grained cross-dataset",
        TPT_XD_ORDER,
        ("all",),
        _TTA_ROWS,
        (Average("avg", TPT_XD_ORDER),),
        {**_numbers(_TTA_XD, TPT_XD_ORDER), **_row_numbers("C-TPT (acc / ECE)", TPT_XD_ORDER, _CTPT_XD_ECE, "ece")},
        {(r, "avg", m): v for (r, m), v in _TTA_XD_AVERAGE.items()},
        _TTA_NOTES,
        report_ece=True,
    ),
    Protocol(
        "tta2-xd",
        "DMN-ZS (CVPR'24), DPE and BoostAdapter (NeurIPS'24), O-TPT (CVPR'25), TPS: ImageNet and fine-grained "
        "cross-dataset",
        _TTA2_XD_ORDER,
        ("all",),
        _TTA2_ROWS,
        (Average("avg (10 XD)", TPT_XD_ORDER), Average("avg (11)", _TTA2_XD_ORDER)),
        {**_sparse_numbers(_TTA2_XD, _TTA2_XD_ORDER), **_row_numbers("O-TPT (acc / ECE)", _TTA2_XD_ORDER, _OTPT_XD_ECE, "ece")},
        _TTA2_XD_AVERAGE,
        ("DMN-ZS's and O-TPT's printed averages include ImageNet (avg (11)); DPE's and BoostAdapter's do not.",),
        report_ece=True,
    ),
    Protocol(
        "tta2-ood",
        "DMN-ZS (CVPR'24), DPE and BoostAdapter (NeurIPS'24), O-TPT (CVPR'25), TPS: natural distribution shifts",
        TPT_OOD_ORDER,
        ("all",),
        _TTA2_OOD_ROWS,
        (Average("avg (OOD 4)", TPT_OOD_ORDER[1:]),),
        {**_sparse_numbers(_TTA2_OOD, TPT_OOD_ORDER), **_sparse_numbers({"O-TPT (acc / ECE)": _OTPT_OOD_ECE}, TPT_OOD_ORDER, "ece")},
        _TTA2_OOD_AVERAGE,
        _TTA_NOTES + ("The average is over A, V2, R and Sketch.",),
        report_ece=True,
    ),
)

_DEPARTURES = {
    "protext-text-only": _PROTEXT_DEPARTURES,
    "protext-base2novel": _PROTEXT_DEPARTURES,
    "protext-cross-dataset": _PROTEXT_DEPARTURES,
    "protext-dg": _PROTEXT_DEPARTURES,
    "tpt-ood": (
        "CoOp (16-shot) and TPT + CoOp need CoOp's image-trained ImageNet prompts (--coop FILE): protext learns "
        "prompts from text only and cannot make them; without the file those rows are not run.",
    ),
    "tpt-xd": (),
    "protext-tpt": _PROTEXT_DEPARTURES + ("No published numbers exist for ProText + TPT: nothing to compare with.",),
    "tta-ood": _ZERO_TDA_DEPARTURES,
    "tta-xd": _ZERO_TDA_DEPARTURES,
    "tta2-xd": _TTA2_DEPARTURES,
    "tta2-ood": _TTA2_DEPARTURES,
}
_PROTOCOLS = tuple(replace(p, departures=_DEPARTURES[p.name]) for p in _PROTOCOLS)
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in _PROTOCOLS}


class UnknownTableError(UserError):
    """A table name that is not one of :data:`PROTOCOLS`."""


def table_names() -> list[str]:
    """Every table name, in the order of PUBLISHED.md."""
    return list(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The table called ``name``; an unknown name raises :class:`UnknownTableError` listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UnknownTableError(f"unknown table {name!r}; the tables are: {', '.join(PROTOCOLS)}") from None


def _check_protocols() -> None:
    """Import-time consistency: rules, features and published keys all name real rows and columns."""
    for p in _PROTOCOLS:
        names = {r.name for r in p.rows}
        for r in p.rows:
            assert r.template_rule in TEMPLATE_RULES and r.features in FEATURES, (p.name, r.name)
        for row, dataset, measure in p.published:
            assert row in names and dataset in p.datasets and measure in p.measures(), (p.name, row, dataset, measure)
        averages = {a.name for a in p.averages}
        for row, average, measure in p.published_averages:
            assert row in names and average in averages and measure in p.measures(), (p.name, row, average)


_check_protocols()
