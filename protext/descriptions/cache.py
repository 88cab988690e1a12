"""The description cache: JSONL files under ``llm_data/``, one class description per line.

Every line is a JSON object with at least ``classname`` and ``description``. Writers also set
``prompt`` (the *query* sent to the LLM; the field keeps its old name so existing caches stay
readable) and ``model``. Other fields are allowed and ignored.

Files are append-only. :func:`append_descriptions` writes one *unit* (all the lines that one
request produced: one class x one query) with a single ``write`` and stamps each line with
``part`` (1-based) and ``parts`` (the unit's line count). A crash can therefore damage only the end
of the file, in one of two ways, both detected here:

* a torn last line: no trailing newline and not valid JSON;
* an incomplete last unit: its last line has ``part < parts`` (the kill landed on a line boundary).

Readers ignore such a tail with a warning and never modify the file; :func:`repair_torn_tail` cuts it
off before a writer appends. Anything malformed *before* the tail cannot come from a crash, so it is
an error naming the file and line, and the file is left as it is.

**Repeats are samples.** A class that holds the same description twice (CuPL's DTD file has 75 such
repeats) is trained on it twice, as the published loader does. The only line that is *not* a sample
is one that a resumed generation wrote again: that is recognised from the unit records alone (a
whole stamped unit whose key -- class, query, model -- already appeared earlier in the file), never
by comparing description texts. Class names that differ only in case, ``_`` versus space or spacing
(``Beagle`` and ``beagle``) are one class everywhere, as in training; the first spelling is kept.

Every writer of a description file (generation and ``import``) holds :func:`writer_lock` on it, so
two writers never interleave and an ``import --overwrite`` cannot replace a file that a running
generation is appending to.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Optional, Sequence, Union

from ..errors import UserError
from ..locks import exclusive_lock, open_for_lock

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "CacheContents",
    "Description",
    "DescriptionFileError",
    "DescriptionFileMissing",
    "DescriptionLockError",
    "DescriptionWriteError",
    "append_descriptions",
    "encode_unit",
    "normalize_classname",
    "read_cache",
    "read_descriptions",
    "read_records",
    "repair_torn_tail",
    "unit_key",
    "writer_lock",
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


class DescriptionLockError(UserError):
    """Another process is writing the description file."""


class DescriptionWriteError(UserError):
    """A description file that cannot be created or written where it was asked for."""


def normalize_classname(name: str) -> str:
    """Canonical form for comparing class names: lowercase, ``_`` as space, single spaces, stripped."""
    return " ".join(name.lower().replace("_", " ").split())


def _query_key(query: str) -> str:
    return " ".join(query.casefold().split())


def unit_key(classname: str, query: str, model: str) -> tuple[str, str, str]:
    """The identity of a unit: two units with this key hold the same work (the second is a rewrite)."""
    return normalize_classname(classname), _query_key(query), model


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
        raise DescriptionFileMissing(f"description file not found: {path}")
    if path.is_dir():
        raise DescriptionFileMissing(f"description file is a directory: {path}")
    return path


def _scan_with_warning(path: PathLike) -> tuple[Path, _Scan]:
    path = _require_file(path)
    scan = _scan(path)
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


# --------------------------------------------------------------------------------------------------
# writing


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


def fsync_dir(path: Path) -> None:
    """Make a new directory entry in ``path`` durable (best effort)."""
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
    payload = encode_unit(batch)
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
    if created or size == 0:
        fsync_dir(path.parent if str(path.parent) else Path("."))


# --------------------------------------------------------------------------------------------------
# the one lock discipline


# The mechanism (flock, follow a replaced file, no 0-byte leftovers) is protext.locks', shared with
# training; this module keeps the name tests and callers patch.
_open_for_lock = open_for_lock


def writer_lock(path: PathLike) -> ContextManager[None]:
    """Hold the exclusive writer lock of a description file while the block runs.

    Every writer (generation, ``import``, ``import --overwrite``) takes it, so a second writer fails
    at once with :class:`DescriptionLockError` naming the file instead of losing the first one's
    work. The lock is an advisory ``flock`` on the file itself (:func:`protext.locks.exclusive_lock`:
    released by the kernel when the process dies, even by SIGKILL, so no stale lock file is ever
    left). A file that only this call created and that is still empty when the block ends is removed
    again, so a failed run leaves no 0-byte file behind. On systems without ``fcntl`` there is no
    locking.
    """
    path = Path(path)

    def busy() -> DescriptionLockError:
        return DescriptionLockError(
            f"--out: {path} is being written by another gen_descriptions run (a generation or an import); "
            "wait for it to finish, or write to another file"
        )

    def unwritable(err: OSError) -> DescriptionWriteError:
        return DescriptionWriteError(f"--out: cannot write {path} ({err.strerror or err})")

    # ``_open_for_lock`` is looked up at call time, so a patched module attribute is used.
    return exclusive_lock(path, busy=busy, unwritable=unwritable, opener=_open_for_lock)
