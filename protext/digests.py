"""File digests shared by every stage: the identity of an input file in metadata and results.

Kept apart from the stages and free of torch, so that evaluation can name a description file or a
checkpoint by its hash without importing the training loop.
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20
"""Files are hashed 1 MiB at a time, so a large checkpoint never sits in memory whole."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
