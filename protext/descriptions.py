"""The description cache: JSONL files under ``llm_data/``, one class description per line.

Every line is a JSON object with at least ``classname`` and ``description`` (writers also set
``prompt`` and ``model``). Other fields are allowed and ignored by :func:`read_descriptions`.

Files are append-only. :func:`append_descriptions` writes one *unit* (all the lines that one
request produced, e.g. one class x one prompt) with a single ``write`` and stamps each line with
``part`` (1-based) and ``parts`` (the unit's line count). A crash can therefore damage only the end
of the file, in one of two ways, both detected here:

* a torn last line: no trailing newline and not valid JSON;
* an incomplete last unit: its last line has ``part < parts`` (the kill landed on a line boundary).

Readers ignore such a tail with a warning and never modify the file; :func:`repair_torn_tail` cuts it
off before a writer appends. Anything malformed *before* the tail cannot come from a crash, so it is
an error naming the file and line, and the file is left as it is.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .atomic import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ClassMatch",
    "Description",
    "DescriptionFileError",
    "append_descriptions",
    "import_cupl",
    "match_classnames",
    "normalize_classname",
    "read_descriptions",
    "repair_torn_tail",
]


@dataclass
class Description:
    """One line of the cache: a description of ``classname`` and where it came from."""

    classname: str
    description: str
    prompt: str = ""
    model: str = ""


class DescriptionFileError(ValueError):
    """A description file (or a CuPL JSON file) that cannot be used as it is.

    ``str(err)`` starts with ``path:line:`` (or ``path:`` when no single line is at fault).
    """

    def __init__(self, path: PathLike, line: Optional[int], reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


@dataclass
class ClassMatch:
    """How the class names a caller wants map onto the keys of a description source."""

    mapping: dict[str, str]  # wanted name -> key in available
    missing: list[str]  # wanted names with no key
    unused: list[str]  # available keys matched by no wanted name


# --------------------------------------------------------------------------------------------------
# scanning: the one parser behind reading and repairing


@dataclass
class _Line:
    number: int  # 1-based line number in the file
    offset: int  # byte offset of the line's first byte
    record: dict[str, Any]


@dataclass
class _Scan:
    lines: list[_Line] = field(default_factory=list)
    cut_at: Optional[int] = None  # byte offset where a damaged tail starts, if any
    tail_reason: str = ""
    missing_newline: bool = False  # last line is a complete record without its "\n"


def _parse_record(raw: bytes) -> dict[str, Any]:
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


def _scan(path: Path) -> _Scan:
    """Parse every line of ``path``; locate a crash-damaged tail; raise on damage elsewhere."""
    data = path.read_bytes()
    scan = _Scan()
    start = 0
    number = 0
    while start < len(data):
        end = data.find(b"\n", start)
        complete = end != -1
        raw = data[start:end] if complete else data[start:]
        number += 1
        if raw.strip():
            try:
                scan.lines.append(_Line(number, start, _parse_record(raw)))
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


def _check_units(path: Path, scan: _Scan) -> None:
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


def _require_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"description file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"description file is a directory: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# public API


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """All intact records of a description file, in file order (a damaged tail is skipped with a warning).

    The full objects are returned, extra fields included; :func:`read_descriptions` is the usual entry
    point. Raises :class:`DescriptionFileError` for damage before the tail.
    """
    path = _require_file(path)
    scan = _scan(path)
    if scan.cut_at is not None:
        warnings.warn(
            f"{path}: ignoring {scan.tail_reason}, left by an interrupted write; "
            "rerunning the generator cuts it off and redoes that work",
            stacklevel=2,
        )
    return [ln.record for ln in scan.lines]


def read_descriptions(path: PathLike) -> dict[str, list[str]]:
    """Read a description file into ``{classname: [description, ...]}``.

    Classes come in order of first appearance, descriptions in file order, with exact duplicates
    within a class dropped. A torn last line (or an incomplete last unit) is ignored with a warning
    naming the file; the file is never modified. An empty file gives ``{}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DescriptionFileError: malformed JSON or a missing key anywhere but the last line.
    """
    out: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for record in read_records(path):
        name, text = record["classname"], record["description"]
        if text in seen.setdefault(name, set()):
            continue
        seen[name].add(text)
        out.setdefault(name, []).append(text)
    return out


def repair_torn_tail(path: PathLike) -> bool:
    """Make ``path`` safe to append to: cut off a crash-damaged tail, with a warning.

    Cuts a torn last line and an incomplete last unit; adds the missing newline after a last line
    that is complete but unterminated. A missing file needs no repair. Returns True if the file
    changed. Raises :class:`DescriptionFileError` (file untouched) for damage before the tail.
    """
    path = Path(path)
    if not path.exists():
        return False
    scan = _scan(_require_file(path))
    if scan.cut_at is not None:
        size = path.stat().st_size
        warnings.warn(
            f"{path}: cutting off {scan.tail_reason} ({size - scan.cut_at} bytes), "
            "left by an interrupted write; that work will be redone",
            stacklevel=2,
        )
        with open(path, "r+b") as fh:
            fh.truncate(scan.cut_at)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    if scan.missing_newline:
        with open(path, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True
    return False


def _encode_unit(records: Sequence[Description]) -> bytes:
    """Serialise one unit: one JSON line per record, stamped ``part``/``parts``."""
    lines = []
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, Description):
            raise TypeError(f"expected Description, got {type(rec).__name__}")
        if not rec.classname.strip() or not rec.description.strip():
            raise ValueError(f"empty classname or description in record {i}: {rec!r}")
        obj = asdict(rec)
        obj["part"], obj["parts"] = i, len(records)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def _fsync_dir(path: Path) -> None:
    # A new file's directory entry is only durable once its directory is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_descriptions(path: PathLike, records: Iterable[Description]) -> None:
    """Append one unit of descriptions to ``path`` (created if needed) durably.

    All lines go out in one ``write`` followed by ``fsync``, so a kill leaves either the whole unit,
    nothing, or a damaged tail that readers skip and :func:`repair_torn_tail` cuts off. Callers that
    may follow a crash call :func:`repair_torn_tail` first. An empty ``records`` writes nothing.
    """
    path = Path(path)
    batch = list(records)
    if not batch:
        return
    payload = _encode_unit(batch)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # Never glue a record onto an unterminated last line.
            payload = b"\n" + payload
        view = memoryview(payload)
        while view:  # regular files only write short on a full disk or a signal
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent if str(path.parent) else Path("."))


def normalize_classname(name: str) -> str:
    """Canonical form for comparing class names: lowercase, ``_`` as space, single spaces, stripped."""
    return " ".join(name.lower().replace("_", " ").split())


def match_classnames(available: Iterable[str], wanted: Sequence[str]) -> ClassMatch:
    """Map the class names a caller wants onto the keys of a description source.

    An exact key wins; otherwise keys are compared through :func:`normalize_classname` (the first
    key in ``available`` order wins if several normalise alike). Nothing is guessed beyond that:
    names that still differ (``"Dodge Dakota Crew Cab 2010"`` vs ``"2010 Dodge Dakota Crew Cab"``)
    are reported in ``missing`` / ``unused`` for the caller to decide.
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


def load_cupl_json(json_path: PathLike) -> dict[str, list[str]]:
    """Load a CuPL/ProText description file ``{classname: [description, ...]}`` and check its shape.

    Raises :class:`DescriptionFileError` naming the file (and line, for bad JSON).
    """
    json_path = _require_file(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DescriptionFileError(json_path, None, f"not UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DescriptionFileError(json_path, err.lineno, f"malformed JSON ({err.msg})") from None
    shape = 'expected a CuPL file: a JSON object {"classname": ["description", ...], ...}'
    if not isinstance(data, dict):
        raise DescriptionFileError(json_path, None, f"{shape}, got a JSON {type(data).__name__}")
    for name, descs in data.items():
        if not name.strip():
            raise DescriptionFileError(json_path, None, "empty class name")
        if not isinstance(descs, list) or not all(isinstance(d, str) for d in descs):
            raise DescriptionFileError(
                json_path, None, f"{shape}; class {name!r} does not hold a list of strings"
            )
    return data


def import_cupl(json_path: PathLike, out_path: PathLike, model: str = "cupl", *, overwrite: bool = False) -> int:
    """Convert a CuPL JSON file into a description JSONL file; return the number of lines written.

    One line per distinct (whitespace-stripped, non-empty) description per class, in the source
    order; each class is one unit. The output appears atomically (temporary file + rename), so a
    failed import leaves nothing behind. Refuses to replace a non-empty ``out_path`` unless
    ``overwrite`` is set, so no cached descriptions are lost by accident.
    """
    data = load_cupl_json(json_path)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise IsADirectoryError(f"output is a directory: {out_path}")
    if out_path.exists() and out_path.stat().st_size > 0 and not overwrite:
        raise FileExistsError(f"{out_path} already holds descriptions; refusing to overwrite it")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    units = []
    for name, descs in data.items():
        distinct = dict.fromkeys(d.strip() for d in descs if d.strip())
        if distinct:
            units.append([Description(name, d, "", model) for d in distinct])

    payload = b"".join(_encode_unit(unit) for unit in units)
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(payload))
    _fsync_dir(out_path.parent)
    return sum(len(u) for u in units)
