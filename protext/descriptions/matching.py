"""Matching the class names a caller wants to the class keys of a description source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .cache_format import normalize_classname

__all__ = ["ClassMatch", "match_classnames", "normalize_classname"]


@dataclass
class ClassMatch:
    """How the class names a caller wants map onto the keys of a description source."""

    mapping: dict[str, str]  # wanted name -> key in available
    missing: list[str]  # wanted names with no key
    unused: list[str]  # available keys matched by no wanted name


def match_classnames(available: Iterable[str], wanted: Sequence[str]) -> ClassMatch:
    """Map the class names a caller wants onto the keys of a description source.

    An exact key wins; otherwise keys are compared through :func:`normalize_classname` (the first
    key in ``available`` order wins if several normalise alike). Nothing is guessed beyond that:
    names that still differ (``"Dodge Dakota Crew Cab 2010"`` vs ``"2010 Dodge Dakota Crew Cab"``)
    are reported in ``missing`` / ``unused`` for the caller to decide (CuPL's own keys are renamed
    by :mod:`protext.descriptions.cupl`'s documented key map instead).
    """
    keys = list(dict.fromkeys(available))
    exact = set(keys)
    by_norm: dict[str, str] = {}
    for key in keys:
        by_norm.setdefault(normalize_classname(key), key)
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for name in wanted:
        if name in mapping or name in missing:
            continue
        key = name if name in exact else by_norm.get(normalize_classname(name))
        if key is None:
            missing.append(name)
        else:
            mapping[name] = key
    used = set(mapping.values())
    return ClassMatch(mapping=mapping, missing=missing, unused=[k for k in keys if k not in used])
