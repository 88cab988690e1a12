"""The published tables (``../shared/design/PUBLISHED.md``, ``TTA2.md``) as data: what each cell runs, and its number.

A :class:`Protocol` is one table: its datasets (columns), its class splits (``all``, or ``base`` and
``novel`` for base-to-novel), its rows (:class:`Row`: which class features, which template rule,
which preset trains the prompts, which test-time adaptation, which stream orders or scenario) and
the numbers the paper printed. The paper's own average cells are kept apart
(:attr:`Protocol.published_averages`): protext recomputes every average and harmonic mean from the
rows and shows the paper's beside it, because at least one printed average (the CLIP text-only
``65.15*``) is not the mean of its own row.

One module per job (issue 16):

=====================  =====================================================================
``base``               datasets, class counts, the types (:class:`TTASpec`, :class:`RunSpec`,
                       :class:`Row`, :class:`Average`, :class:`Protocol`), number helpers
``protext_tables``     ProText's and TPT's tables (PUBLISHED.md), ProText + test-time methods
``tta_tables``         ZERO/TDA/C-TPT (PUBLISHED.md) and DMN-ZS/DPE/BoostAdapter/O-TPT/TPS (TTA2.md)
``protocol_tables``    the OGA (100 stream orders, ETA) and StatA (realistic batches and streams)
                       protocols (TTA2.md §11)
=====================  =====================================================================

Only :mod:`protext.reproduction` reads this package; nothing here touches torch or the disk, so the
tables can be listed (``python -m protext.reproduce --list``) instantly.
"""

from __future__ import annotations

from ..errors import UserError
from ..templates import TEMPLATE_RULES
from . import protext_tables, protocol_tables, tta_tables
from .base import (
    CLASS_COUNTS, COMMON_DEPARTURES, CROSS_TARGETS, FEATURES, TEXT_ONLY_ORDER, TPT_OOD_ORDER, TPT_XD_ORDER, VARIANTS,
    ZERO_SEED, Average, Protocol, Row, RunSpec, TTASpec,
)

_PROTOCOLS: tuple[Protocol, ...] = protext_tables.TABLES + tta_tables.TABLES + protocol_tables.TABLES
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in _PROTOCOLS}

__all__ = [
    "Average", "CLASS_COUNTS", "COMMON_DEPARTURES", "CROSS_TARGETS", "FEATURES", "PROTOCOLS", "Protocol", "Row",
    "RunSpec", "TEXT_ONLY_ORDER", "TPT_OOD_ORDER", "TPT_XD_ORDER", "TTASpec", "UnknownTableError", "VARIANTS",
    "ZERO_SEED", "get_protocol", "table_names",
]


class UnknownTableError(UserError):
    """A table name that is not one of :data:`PROTOCOLS`."""


def table_names() -> list[str]:
    """Every table name, in the order of PUBLISHED.md (then TTA2.md's)."""
    return list(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The table called ``name``; an unknown name raises :class:`UnknownTableError` listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UnknownTableError(f"unknown table {name!r}; the tables are: {', '.join(PROTOCOLS)}") from None


def _check_protocols() -> None:
    """Import-time consistency: rules, features and published keys all name real rows and columns."""
    assert len(PROTOCOLS) == len(_PROTOCOLS), "two tables share a name"
    for p in _PROTOCOLS:
        names = {r.name for r in p.rows}
        assert len(names) == len(p.rows), (p.name, "two rows share a name")
        for r in p.rows:
            assert r.template_rule in TEMPLATE_RULES and r.features in FEATURES, (p.name, r.name)
            assert r.runs is None or p.report_runs, (p.name, r.name, "runs outside a protocol table")
        for row, dataset, measure in p.published:
            assert row in names and dataset in p.datasets and measure in p.measures(), (p.name, row, dataset, measure)
        averages = {a.name for a in p.averages}
        for row, average, measure in p.published_averages:
            assert row in names and average in averages and measure in p.measures(), (p.name, row, average)
        assert {entry[0] for entry in p.pivot} <= names, (p.name, "pivot names an unknown row")


_check_protocols()
