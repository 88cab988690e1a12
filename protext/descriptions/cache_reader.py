"""Reading the description cache: every line checked, a crash-damaged tail skipped, repeats kept as samples.

Files are append-only and each unit is written with a single ``write`` (:mod:`.cache`), so a crash
can damage only the end of the file, in one of two ways, both detected here:

* a torn last line: no trailing newline and not valid JSON;
* an incomplete last unit: its last line has ``part < parts`` (the kill landed on a line boundary).

Readers ignore such a tail with a warning and never modify the file;
:func:`~protext.descriptions.cache.repair_torn_tail` cuts it off (with the same :func:`scan_file`) before
a writer appends. Anything malformed *before* the tail cannot come from a crash, so it is an error
naming the file and line, and the file is left as it is.

**Repeats are samples.** A class that holds the same description twice (CuPL's DTD file has 75 such
repeats) is trained on it twice, as the published loader does. The only line that is *not* a sample
is one that a resumed generation wrote again: that is recognised from the unit records alone (a
whole stamped unit whose key -- class, query, model -- already appeared earlier in the file), never
by comparing description texts. Class names that differ only in case, ``_`` versus space or spacing
(``Beagle`` and ``beagle``) are one class everywhere, as in training; the first spelling is kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .cache_format import DescriptionFileError, DescriptionFileMissing, PathLike, normalize_classname, parse_record, unit_key

__all__ = [
    "CacheContents",
    "Scan",
    "read_cache",
    "read_descriptions",
    "read_records",
    "require_file",
    "scan_file",
]


# --------------------------------------------------------------------------------------------------
# scanning: the one parser behind reading and repairing


@dataclass
class _Line:
    number: int  # 1-based line number in the file
    offset: int  # byte offset of the line's first byte
    record: dict[str, Any]


@dataclass
class Scan:
    """A description file as parsed: its intact lines, and where a crash-damaged tail starts."""

    lines: list[_Line] = field(default_factory=list)
    cut_at: Optional[int] = None  # byte offset where a damaged tail starts, if any
    tail_reason: str = ""
    missing_newline: bool = False  # last line is a complete record without its "\n"


def scan_file(path: Path) -> Scan:
    """Parse every line of ``path``; locate a crash-damaged tail; raise on damage elsewhere."""
    data = path.read_bytes()
    scan = Scan()
    start = 0
    number = 0
    while start < len(data):
        end = data.find(b"\n", start)
        complete = end != -1
        raw = data[start:end] if complete else data[start:]
        number += 1
        if raw.strip():
            try:
                scan.lines.append(_Line(number, start, parse_record(raw)))
            except ValueError as err:
                if complete:
                    raise DescriptionFileError(path, number, str(err)) from None
                # A line without its newline is where a killed write stopped.
                scan.cut_at = start
                scan.tail_reason = f"torn last line {number} ({len(raw)} bytes, {err})"
                break
            if not complete:
                scan.missing_newline = True
        if not complete:
            break
        start = end + 1
    _check_units(path, scan)
    return scan


def _check_units(path: Path, scan: Scan) -> None:
    """Units must be contiguous and whole, except that the last one may be cut short by a crash."""
    open_unit: Optional[_Line] = None  # last line of the unit being read, while it is incomplete
    for line in scan.lines:
        part, parts = line.record.get("part"), line.record.get("parts")
        if open_unit is not None:
            prev = open_unit.record
            follows = (
                parts == prev["parts"]
                and part == prev["part"] + 1
                and line.record["classname"] == prev["classname"]
                and line.record.get("prompt", "") == prev.get("prompt", "")
            )
            if not follows:
                raise DescriptionFileError(
                    path,
                    line.number,
                    f"the unit ending on line {open_unit.number} has only part {prev['part']} "
                    f"of {prev['parts']} lines (a unit can only be incomplete at the end of the file)",
                )
        elif parts is not None and part != 1:
            raise DescriptionFileError(path, line.number, f"unit starts at part {part} of {parts}, not 1")
        open_unit = line if parts is not None and part < parts else None

    if open_unit is not None:
        # The file ends inside a unit (plus maybe a torn line): the whole unit goes.
        first = scan.lines[scan.lines.index(open_unit) - open_unit.record["part"] + 1]
        reason = (
            f"incomplete last unit (lines {first.number}-{open_unit.number}: "
            f"{open_unit.record['part']} of {open_unit.record['parts']} lines)"
        )
        scan.tail_reason = f"{reason}; {scan.tail_reason}" if scan.tail_reason else reason
        scan.cut_at = first.offset
        scan.lines = [ln for ln in scan.lines if ln.offset < first.offset]
        scan.missing_newline = False


def require_file(path: PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`; :class:`DescriptionFileMissing` if it is absent or a directory."""
    path = Path(path)
    if not path.exists():
        raise DescriptionFileMissing(f"description file not found: {path}")
    if path.is_dir():
        raise DescriptionFileMissing(f"description file is a directory: {path}")
    return path


def _scan_with_warning(path: PathLike) -> tuple[Path, Scan]:
    path = require_file(path)
    scan = scan_file(path)
    if scan.cut_at is not None:
        warnings.warn(
            f"{path}: ignoring {scan.tail_reason}, left by an interrupted write; "
            "rerunning the generator cuts it off and redoes that work",
            stacklevel=3,
        )
    return path, scan


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class CacheContents:
    """What a description file holds, after its unit records are taken into account.

    Attributes:
        descriptions: ``{classname: [description, ...]}``; repeats kept, classes merged by
            :func:`normalize_classname` under their first spelling.
        repeats: samples whose (class, text) appeared earlier in the same class -- kept, counted.
        rewritten_units: whole units skipped because a resumed generation wrote them again.
        rewritten_lines: the lines of those units.
    """

    descriptions: dict[str, list[str]] = field(default_factory=dict)
    repeats: int = 0
    rewritten_units: int = 0
    rewritten_lines: int = 0

    @property
    def samples(self) -> int:
        """Number of (class, description) training pairs."""
        return sum(len(v) for v in self.descriptions.values())


def _sample_lines(lines: Sequence[_Line]) -> tuple[list[_Line], int, int]:
    """Drop whole units whose key appeared before (a resumed generation's rewrite)."""
    kept: list[_Line] = []
    seen: set[tuple[str, str, str]] = set()
    skipping = False
    units = dropped = 0
    for line in lines:
        rec = line.record
        if rec.get("parts") is None:  # an unstamped line is a sample on its own
            kept.append(line)
            continue
        if rec["part"] == 1:
            key = unit_key(rec["classname"], rec.get("prompt", ""), rec.get("model", ""))
            skipping = key in seen
            seen.add(key)
            units += skipping
        if skipping:
            dropped += 1
        else:
            kept.append(line)
    return kept, units, dropped


def read_cache(path: PathLike) -> CacheContents:
    """Read a description file with its counts (see :class:`CacheContents`).

    A torn last line (or an incomplete last unit) is ignored with a warning naming the file; the
    file is never modified. An empty file gives empty contents.

    Raises:
        DescriptionFileMissing: ``path`` does not exist or is a directory.
        DescriptionFileError: malformed JSON or a missing key anywhere but the last line.
    """
    _, scan = _scan_with_warning(path)
    lines, units, dropped = _sample_lines(scan.lines)
    out = CacheContents(rewritten_units=units, rewritten_lines=dropped)
    key_of: dict[str, str] = {}  # normalised class -> first spelling
    seen: dict[str, set[str]] = {}
    for line in lines:
        rec = line.record
        norm = normalize_classname(rec["classname"])
        name = key_of.setdefault(norm, rec["classname"])
        text = rec["description"]
        out.descriptions.setdefault(name, []).append(text)
        texts = seen.setdefault(norm, set())
        out.repeats += text.strip() in texts
        texts.add(text.strip())
    return out


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """All intact lines of a description file, in file order, rewritten units included.

    This is the raw view (a damaged tail is skipped with a warning); :func:`read_cache` and
    :func:`read_descriptions` give the samples. Raises :class:`DescriptionFileError` for damage
    before the tail.
    """
    _, scan = _scan_with_warning(path)
    return [ln.record for ln in scan.lines]


def read_descriptions(path: PathLike) -> dict[str, list[str]]:
    """Read a description file into ``{classname: [description, ...]}``: every sample, repeats kept.

    Classes come in order of first appearance (names that normalise alike are one class, under the
    first spelling), descriptions in file order. A unit that a resumed generation wrote a second
    time is read once. See :func:`read_cache` for the counts and the errors raised.
    """
    return read_cache(path).descriptions
