"""Fixtures shared by every test module: a tiny random CLIP and the shared real data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# PROTEXT_SHARED lets a copy of the tree (mutmut runs the tests from mutants/) find the same data
SHARED = Path(os.environ.get("PROTEXT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repo: real CuPL descriptions and class-name lists (never copied in)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests need the shared data folder beside the repository.")
    return SHARED


@pytest.fixture(scope="session")
def tiny_clip():
    """The registered ``tiny-clip`` with seed-0 random weights (same weights in every process)."""
    from protext.models import load_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip("tiny-clip", "random")


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch) -> Path:
    """An empty folder where the pre-flight's probe file cannot be created, as on a read-only file
    system: tests run as root here, for whom chmod cannot make a folder read-only."""
    import errno
    import tempfile

    import protext.preflight as preflight

    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", mkstemp)
    return folder
