"""The description cache: JSONL files under ``llm_data/``, one class description per line; this module writes them.

The line format (one *unit* of stamped lines per request) is :mod:`.cache_format`'s; reading,
with a crash-damaged tail skipped and repeats kept as samples, is :mod:`.cache_reader`'s. Here is
the resumable writer and the one lock every writer holds.

Files are append-only. :func:`append_descriptions` writes one unit (all the lines that one request
produced: one class x one query) with a single ``write`` + ``fsync``, so a crash can damage only the
end of the file (a torn last line, or an incomplete last unit); readers skip such a tail with a
warning, and :func:`repair_torn_tail` cuts it off before a writer appends. Anything malformed
*before* the tail cannot come from a crash, so it is an error naming the file and line, and the
file is left as it is.

Every writer of a description file (generation and ``import``) holds :func:`writer_lock` on it, so
two writers never interleave and an ``import --overwrite`` cannot replace a file that a running
generation is appending to.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import ContextManager, Iterable

from ..errors import UserError
from ..locks import exclusive_lock, open_for_lock
from .cache_format import Description, PathLike, encode_unit
from .cache_reader import read_cache, read_records, require_file, scan_file

__all__ = [
    "DescriptionLockError",
    "DescriptionWriteError",
    "append_descriptions",
    "fsync_dir",
    "repair_torn_tail",
    "writer_lock",
    # the format's and the reader's, read here by tests and older callers:
    "encode_unit",
    "read_cache",
    "read_records",
]


class DescriptionLockError(UserError):
    """Another process is writing the description file."""


class DescriptionWriteError(UserError):
    """A description file that cannot be created or written where it was asked for."""


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
    scan = scan_file(require_file(path))
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
