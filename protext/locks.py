"""Exclusive writer locks: one process writes an output at a time, and a killed one never blocks the next.

Every command that writes a file other runs could write too takes :func:`exclusive_lock` on it first:
description files (generation and ``import``, on the file itself) and training runs (on a
``NAME.lock`` file beside the checkpoint, because the checkpoint is replaced by a rename every epoch
and a lock on a replaced file guards nothing). The lock is an advisory ``fcntl.flock``, which the
kernel releases when the holder's descriptor closes -- also when the process dies by SIGKILL -- so
no stale lock is ever left to clean up by hand. A second writer fails at once (no waiting) with the
caller's own :class:`~protext.errors.UserError`, which names the file and the way out.

On systems without ``fcntl`` there is no locking (single-writer use is then the user's job).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["OutputLockError", "exclusive_lock", "open_for_lock", "output_lock", "output_lock_path", "same_file"]

#: real path -> how many blocks of this process hold its lock now (for ``reentrant`` nesting)
_HELD: dict[str, int] = {}


def same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor ``fd`` is the file now at ``path`` (not a replaced or removed one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def open_for_lock(path: Path) -> tuple[int, bool]:
    """Open (or create) ``path`` for appending; return the descriptor and whether this call created it.

    ``O_EXCL`` tells a file this call created from one another process created at the same moment,
    so only the creator may later remove it.
    """
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_APPEND), False
        except FileNotFoundError:
            pass
        try:
            return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            continue  # another writer created it in between: open theirs


@contextmanager
def exclusive_lock(
    path: PathLike,
    *,
    busy: Callable[[], UserError],
    unwritable: Callable[[OSError], UserError],
    remove_when_empty: bool = False,
    reentrant: bool = False,
    opener: Optional[Callable[[Path], tuple[int, bool]]] = None,
) -> Iterator[None]:
    """Hold the exclusive ``flock`` of ``path`` (created if missing) while the block runs.

    Args:
        path: the file to lock.
        busy: the error to raise when another process holds the lock.
        unwritable: the error to raise when ``path`` cannot be opened or created.
        remove_when_empty: remove ``path`` at the end whenever it is empty (a lock file); without
            it, only a file that this call created and that is still empty is removed, so a failed
            run leaves no 0-byte output behind but never removes someone else's file.
        reentrant: a block nested in another that already holds this lock in this process runs
            without locking again (``flock`` on a second descriptor would refuse its own process);
            for a command that locks before the library call that locks too.
        opener: how to open the file (default :func:`open_for_lock`; tests replace it).

    Raises:
        UserError: ``busy()`` or ``unwritable(err)``.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path = Path(path)
    key = os.path.realpath(path)
    if reentrant and _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    while True:
        try:
            fd, created = (opener or open_for_lock)(path)
        except OSError as err:
            raise unwritable(err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy() from None
        if same_file(fd, path):
            break
        # The file was replaced (a rename over it) or removed (a finishing holder's clean-up)
        # between our open and our lock: the lock we hold guards nothing any more, so take the one
        # of the file now at ``path``.
        os.close(fd)
    _HELD[key] = _HELD.get(key, 0) + 1
    try:
        yield
    finally:
        _HELD[key] -= 1
        try:
            # Removed while still locked: a process that opened the old file meanwhile finds it
            # gone after locking it (same_file above) and starts over on a fresh one.
            if (created or remove_when_empty) and os.fstat(fd).st_size == 0 and same_file(fd, path):
                os.unlink(path)
        finally:
            os.close(fd)  # releases the lock


class OutputLockError(UserError):
    """Another run is writing the same output (its lock file is held)."""


def output_lock_path(out: PathLike) -> Path:
    """The lock file of the run writing ``out``: ``NAME.lock`` beside it (removed when the run ends)."""
    out = Path(out)
    return Path(f"{out.with_suffix('')}.lock")


@contextmanager
def output_lock(out: PathLike, *, flag: str, writer: str) -> Iterator[None]:
    """Hold ``NAME.lock`` beside ``out`` while a run writes ``out`` and the files beside it (reentrant).

    For outputs replaced by a rename (a checkpoint after every epoch), where a lock on the file
    itself would guard nothing. ``flag`` and ``writer`` (``--out``, ``training run``) go into the
    one-line error a second run gets. Creates ``out``'s folder, and removes the folders it created
    if they are still empty at the end, so a run refused for bad input leaves nothing behind.

    Raises:
        OutputLockError: another process holds the lock.
        UserError: the folder or the lock file cannot be created.
    """
    out = Path(out)
    lock = output_lock_path(out)

    def busy() -> OutputLockError:
        return OutputLockError(
            f"{flag} {out} is being written by another {writer} (it holds {lock}); wait for it to finish, "
            f"or choose another {flag}."
        )

    def unwritable(err: OSError) -> UserError:
        return UserError(f"{flag} {out}: cannot create its lock file {lock} ({err.strerror or err}).")

    missing = []  # the folders this call creates, deepest first
    for folder in [out.parent, *out.parent.parents]:
        if folder.exists():
            break
        missing.append(folder)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot create its folder ({err.strerror or err}).") from None
    try:
        with exclusive_lock(lock, busy=busy, unwritable=unwritable, remove_when_empty=True, reentrant=True):
            yield
    finally:
        for folder in missing:
            try:
                folder.rmdir()  # only if still empty: anything the run wrote keeps its folder
            except OSError:
                break
