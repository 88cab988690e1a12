"""Atomic file replacement: a crash or kill never leaves half a file where a whole one stood."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is flushed to disk before the rename and removed if ``write`` fails, so
    ``path`` holds either its old content or the complete new one. The result is made readable
    like an ordinary file (``mkstemp`` creates it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
