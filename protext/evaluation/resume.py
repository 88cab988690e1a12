"""The resume log: per-image results appended beside the results file as they finish.

``R.json`` gets ``R.json.resume-<fp>.rank<r>.jsonl`` (one per rank under torchrun; ``<fp>`` is the
first 12 hex digits of the run's settings fingerprint, so a changed command never reads another
command's log, and never destroys it either). The first line of a log is a header with the full
fingerprint; every other line is one image's :meth:`~protext.results.Prediction.record` plus its
seconds. Lines are flushed and fsynced per batch, so a SIGKILL loses at most the batch in flight;
a torn last line is cut off before anything is appended after it.

Online methods (TDA) also keep ``R.json.resume-<fp>.stream<seed>.state.pt``: the adapter's state
and the stream position it belongs to, so a resumed stream continues with the caches it had.
All of these files are removed once the results file is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..atomic import atomic_write
from ..errors import UserError
from ..results import Prediction

FORMAT = "protext-eval-log/1"


class ResumeLogError(UserError):
    """A resume log that cannot be used; the message names the file and how to start over."""


def log_prefix(out: Path, fingerprint: str, stream: Optional[int] = None) -> str:
    tag = f".stream{stream}" if stream is not None else ""
    return f"{out.name}.resume-{fingerprint[:12]}{tag}"


class ResumeLog:
    """One rank's log of one run (or of one stream of an online method)."""

    def __init__(self, out: Path, fingerprint: str, rank: int, stream: Optional[int] = None) -> None:
        self.out, self.fingerprint, self.rank, self.stream = Path(out), fingerprint, rank, stream
        self.prefix = log_prefix(self.out, fingerprint, stream)
        self.path = self.out.parent / f"{self.prefix}.rank{rank}.jsonl"
        self.state_path = self.out.parent / f"{self.prefix}.state.pt"

    # reading -------------------------------------------------------------------------------------
    def peer_paths(self) -> list[Path]:
        """Every rank's log of this run (a rerun may use another number of processes)."""
        return sorted(self.out.parent.glob(f"{self.prefix}.rank*.jsonl"))

    def read_done(self) -> dict[int, tuple[Prediction, float]]:
        """Every finished image of this run in any rank's log: index → (prediction, seconds)."""
        done: dict[int, tuple[Prediction, float]] = {}
        for path in self.peer_paths():
            for record in self._records(path):
                done[int(record["i"])] = (Prediction.from_record(record), float(record.get("s", 0.0)))
        return done

    def _records(self, path: Path) -> Iterable[dict[str, Any]]:
        # text after the last newline was cut short by a kill: not a record yet
        complete = path.read_bytes().split(b"\n")[:-1]
        if not complete:
            return []
        header = self._parse(path, complete[0], 1)
        if header.get("format") != FORMAT or header.get("fingerprint") != self.fingerprint:
            raise ResumeLogError(f"{path} belongs to another evaluation (different settings); delete it to start over.")
        return [self._parse(path, line, n) for n, line in enumerate(complete[1:], start=2)]

    @staticmethod
    def _parse(path: Path, line: bytes, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ResumeLogError(f"{path}, line {number}: not a log record; the log is damaged, delete it to start over.")
        return record

    # writing -------------------------------------------------------------------------------------
    def open(self, settings: dict[str, Any]) -> None:
        """Prepare this rank's log for appending: write the header, or cut a torn last line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(end)
            if end > 0:
                return
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "rank": self.rank, "stream": self.stream, "settings": settings}
        self._append([json.dumps(header, default=str)])

    def append(self, predictions: Iterable[Prediction], seconds_each: float) -> None:
        """Add finished images (one flush and fsync for the lot)."""
        lines = [json.dumps({**p.record(), "s": seconds_each}) for p in predictions]
        if lines:
            self._append(lines)

    def _append(self, lines: list[str]) -> None:
        with open(self.path, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    # online state --------------------------------------------------------------------------------
    def save_state(self, position: int, state: dict[str, Any]) -> None:
        """Keep an online adapter's state after ``position`` images of the stream (atomically)."""
        import torch

        atomic_write(self.state_path, lambda tmp: torch.save({"fingerprint": self.fingerprint, "position": position, "state": state}, tmp))

    def load_state(self) -> Optional[tuple[int, dict[str, Any]]]:
        """(position, adapter state) saved by :meth:`save_state`, or None."""
        if not self.state_path.exists():
            return None
        import torch

        try:
            saved = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file: unpickling errors differ by torch version
            raise ResumeLogError(f"{self.state_path}: unreadable stream state ({type(err).__name__}); delete it to restart the stream.") from None
        if saved.get("fingerprint") != self.fingerprint:
            raise ResumeLogError(f"{self.state_path} belongs to another evaluation; delete it to restart the stream.")
        return int(saved["position"]), saved["state"]


def remove_logs(out: Path, fingerprint: str) -> None:
    """Remove every log and state file of this run (its results are written)."""
    out = Path(out)
    for path in out.parent.glob(f"{out.name}.resume-{fingerprint[:12]}*"):
        path.unlink(missing_ok=True)
