"""The processes of a run, read from ``/proc``: who belongs to a process group, who is a child of
whom, and reaping and killing a whole group (the kill campaign's process control, Linux only)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

def _live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live (non-zombie) process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if fields[0] != "Z":
            found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [pid for pid, _, group in _live_processes() if group == pgid]


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (torchrun's ranks)."""
    return sorted(child for child, parent, _ in _live_processes() if parent == pid)


def reap(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """Wait for ``proc``; on timeout kill its whole group and return None."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        return None


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group, ignoring a group already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Poll until no process of the group lives; return the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    left = group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = group_members(pgid)
    return left
