"""The description cache's line format: one JSON object per line, written and checked one unit at a time.

Every line is a JSON object with at least ``classname`` and ``description``. Writers also set
``prompt`` (the *query* sent to the LLM; the field keeps its old name so existing caches stay
readable) and ``model``. Other fields are allowed and ignored. A *unit* is all the lines that one
request produced (one class x one query); :func:`encode_unit` stamps each of its lines with ``part``
(1-based) and ``parts`` (the unit's line count), which is what lets a reader tell a unit cut short
by a crash (:mod:`.cache_reader`) and a unit written twice by a resumed run (:func:`unit_key`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "Description",
    "DescriptionFileError",
    "DescriptionFileMissing",
    "PathLike",
    "encode_unit",
    "normalize_classname",
    "parse_record",
    "unit_key",
]


@dataclass
class Description:
    """One line of the cache: a description of ``classname`` and where it came from.

    ``query`` is what was asked (the LLM question, the offline template, or ``""`` for imported
    files); it is stored in the line's ``prompt`` field.
    """

    classname: str
    description: str
    query: str = ""
    model: str = ""


class DescriptionFileError(UserError, ValueError):
    """A description file (or a CuPL JSON file) that cannot be used as it is.

    ``str(err)`` starts with ``path:line:`` (or ``path:`` when no single line is at fault).
    """

    def __init__(self, path: PathLike, line: Optional[int], reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


class DescriptionFileMissing(UserError, FileNotFoundError):
    """A description file that does not exist (or is a directory)."""


def normalize_classname(name: str) -> str:
    """Canonical form for comparing class names: lowercase, ``_`` as space, single spaces, stripped."""
    return " ".join(name.lower().replace("_", " ").split())


def _query_key(query: str) -> str:
    return " ".join(query.casefold().split())


def unit_key(classname: str, query: str, model: str) -> tuple[str, str, str]:
    """The identity of a unit: two units with this key hold the same work (the second is a rewrite)."""
    return normalize_classname(classname), _query_key(query), model


def parse_record(raw: bytes) -> dict[str, Any]:
    """Decode one line; raise ValueError with a reason a person can act on."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("classname", "description"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string")
    for key in ("prompt", "model"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{key!r} must be a string")
    parts = obj.get("parts")
    if parts is not None or "part" in obj:
        part = obj.get("part")
        ok = isinstance(part, int) and isinstance(parts, int) and 1 <= part <= parts
        if not ok:
            raise ValueError(f"bad unit stamp part={part!r} parts={parts!r}")
    return obj


def encode_unit(records: Sequence[Description]) -> bytes:
    """Serialise one unit: one JSON line per record, stamped ``part``/``parts``."""
    lines = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, Description):
            raise TypeError(f"expected Description, got {type(rec).__name__}")
        if not rec.classname.strip() or not rec.description.strip():
            raise ValueError(f"empty classname or description in record {i}: {rec!r}")
        obj = asdict(rec)
        obj["prompt"] = obj.pop("query")  # on-disk name, kept for existing caches
        obj["model"] = obj.pop("model")  # keep the historical key order
        obj["part"], obj["parts"] = i, len(records)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")
