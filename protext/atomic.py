"""Atomic file replacement: a crash or kill never leaves half a file where a whole one stood.

The temporary file is named ``.NAME.<pid>-<random>.tmp`` beside ``NAME``. A process killed during a
write (SIGKILL, power loss) leaves it behind; the next atomic write in that directory removes every
such file whose process is gone (:func:`clean_stale_temps`), and commands call it for their output
folders before they start.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

_TEMP = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed atomic writes left in ``directory``; return them.

    Only files named as :func:`atomic_write` names them, whose writing process no longer exists,
    are removed: a concurrent writer's file is left alone.
    """
    directory = Path(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:  # absent or unreadable: nothing of ours to clean
        return removed
    for name in names:
        match = _TEMP.match(name)
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(directory / name)
                removed.append(directory / name)
            except OSError:  # raced with another cleaner
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is flushed to disk before the rename and removed if ``write`` fails, so
    ``path`` holds either its old content or the complete new one. The result is made readable
    like an ordinary file (``mkstemp`` creates it owner-only). Leftovers of killed writers in the
    same directory are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
