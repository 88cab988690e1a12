"""What the launcher told this process, read from the environment alone (no torch).

A command checks its flags for a multi-process run before anything heavy is imported; the process
group itself is :mod:`protext.distributed`'s.
"""

from __future__ import annotations

import os

__all__ = ["launched_world_size"]


def launched_world_size() -> int:
    """How many processes ``torchrun`` started for this job (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
