"""Output paths checked before any work: a long run never finds out at the end that it cannot write.

:func:`check_output_file` and :func:`check_output_dir` refuse, with one line naming the flag, an
output that is a directory (or a file, for a directory), that lies under a regular file, that is one
of the run's own inputs, or whose directory cannot be created or written. Writability is tested by
creating and removing a probe file in the nearest existing directory, so read-only file systems are
caught even for root, for whom permission bits say nothing. Nothing is created for good.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError


class OutputPathError(UserError):
    """An output path that the run could not write; names the flag and the way out."""


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def _check_writable_dir(directory: Path, flag: str, shown: Path) -> None:
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise OutputPathError(f"{flag} {shown}: {base} is a file, not a directory; choose a path in a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".protext-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputPathError(
            f"{flag} {shown}: cannot write in {base} ({err.strerror or err}); choose a writable location."
        ) from None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (the same path, or hard links / symlinks to one file)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(
    path: str | os.PathLike,
    flag: str,
    inputs: Iterable[tuple[str, Optional[str | os.PathLike]]] = (),
    suffix: Optional[str] = None,
) -> Path:
    """Refuse an output file that cannot be written, before the work that produces it.

    Args:
        path: the file to be written.
        flag: the flag that named it (``--out``), for the message.
        inputs: ``(flag, path)`` of the run's inputs, which an output must never replace.
        suffix: a required file suffix (``.safetensors``), or None.

    Raises:
        OutputPathError: a directory, under a file, an input of the run, or not writable.
    """
    path = Path(path)
    if path.is_dir():
        example = path / f"NAME{suffix or ''}"
        raise OutputPathError(f"{flag} {path} is a directory; give a file name such as {example}.")
    if suffix and path.suffix != suffix:
        raise OutputPathError(f"{flag} {path}: the file name must end in {suffix}.")
    for input_flag, input_path in inputs:
        if input_path is not None and same_file(path, Path(input_path)):
            raise OutputPathError(
                f"{flag} {path} is the run's own input ({input_flag} {input_path}); writing it would destroy "
                "that input. Choose another output path."
            )
    _check_writable_dir(path.parent, flag, path)
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output directory that is a file or cannot be created or written in."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a file, not a directory; give a directory.")
    _check_writable_dir(path, flag, path)
    return path
