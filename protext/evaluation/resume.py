"""The resume log: per-image results appended beside the results file as they finish.

``R.json`` gets ``R.json.resume-<fp>.rank<r>.jsonl`` (one per rank under torchrun; ``<fp>`` is the
first 12 hex digits of the run's settings fingerprint, so a changed command never reads another
command's log, and never destroys it either). The first line of a log is a header with the full
fingerprint; every other line is one image's :meth:`~protext.results.Prediction.record` plus its
seconds. Lines are flushed and fsynced per batch, so a SIGKILL loses at most the batch in flight;
a torn last line is cut off before anything is appended after it.

The header also records the run's inputs (:func:`protext.evaluation.data.input_identity`: the
image listing and the class names). The fingerprint covers the settings and the input files'
contents, not the images: a rerun after the image folder changed would otherwise report the old
images' predictions under the new folder. :func:`check_log_inputs` compares them before any model
loads and refuses, naming the log and what changed; ``--overwrite`` starts over instead.

Online methods (TDA) also keep ``R.json.resume-<fp>.stream<seed>.state.pt``: the adapter's state
and the stream position it belongs to, so a resumed stream continues with the caches it had.
All of these files are removed once the results file is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ..atomic import atomic_write
from ..errors import UserError
from ..results import Prediction

if TYPE_CHECKING:
    from .config import EvalConfig

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
    def open(self, settings: dict[str, Any], inputs: Optional[dict[str, Any]] = None) -> None:
        """Prepare this rank's log for appending: write the header (with the run's ``inputs``, which
        :func:`check_log_inputs` compares on a rerun), or cut a torn last line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(end)
            if end > 0:
                return
        header = {"format": FORMAT, "fingerprint": self.fingerprint, "rank": self.rank, "stream": self.stream, "settings": settings,
                  "inputs": inputs}
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


def _header(path: Path) -> Optional[dict[str, Any]]:
    """The first complete line of a log as a dict; None for a log cut before its header was whole
    (it is started afresh) or one that vanished meanwhile (another rank starting over)."""
    try:
        with open(path, "rb") as handle:
            line = handle.readline()
    except FileNotFoundError:
        return None
    if not line.endswith(b"\n"):
        return None
    return ResumeLog._parse(path, line, 1)


def describe_input_change(old: Optional[dict[str, Any]], new: dict[str, Any], config: "EvalConfig") -> str:
    """What differs between the inputs a run started on and today's, in a few words."""
    if not isinstance(old, dict):
        return "it records no inputs (an older protext), so they cannot be compared"
    changes = []
    if old.get("folder") != new["folder"]:
        changes.append(f"--root was {old.get('folder')} and is now {new['folder']}")
    if old.get("images") != new["images"]:
        changes.append(f"--root {config.root} held {old.get('images')} images then and {new['images']} now")
    elif old.get("listing_sha256") != new["listing_sha256"]:
        changes.append(f"images under --root {config.root} were replaced, renamed or relabelled since "
                       f"(the same {new['images']} files in number, other paths, sizes or modification times)")
    if old.get("classes") != new["classes"] or old.get("classes_sha256") != new["classes_sha256"]:
        changes.append(f"the class names changed ({old.get('classes')} then, {new['classes']} now)")
    return "; ".join(changes) or "they differ"


def check_log_inputs(out: Path, fingerprint: str, inputs: dict[str, Any], config: "EvalConfig") -> bool:
    """Refuse to resume from a log started on other images or classes; returns whether this run has
    a log to resume (its summary files beside the results may then be its own).

    With ``config.overwrite`` such a log (and its stream state) is removed instead and the run
    starts over; a log that matches is kept and resumed either way.

    Raises:
        ResumeLogError: a log of this command whose recorded inputs differ from ``inputs``,
            naming the log, what changed and the two ways out.
    """
    out = Path(out)
    found = False
    for path in sorted(out.parent.glob(f"{out.name}.resume-{fingerprint[:12]}*.jsonl")):
        header = _header(path)
        if header is None or header.get("fingerprint") != fingerprint:
            continue  # a torn header is rewritten; another evaluation's log is refused when read
        if header.get("inputs") == inputs:
            found = True
            continue
        if config.overwrite:
            # --overwrite asks for a fresh result: this log's images are not this run's any more
            path.unlink(missing_ok=True)
            stream = header.get("stream")
            ResumeLog(out, fingerprint, 0, stream).state_path.unlink(missing_ok=True)
            continue
        raise ResumeLogError(
            f"{path} was started on other inputs ({describe_input_change(header.get('inputs'), inputs, config)}); its "
            "finished images would be reported for the wrong files. Restore the inputs to resume, or pass --overwrite "
            "to start over (the log is then replaced)."
        )
    return found


def remove_logs(out: Path, fingerprint: str) -> None:
    """Remove every log and state file of this run (its results are written)."""
    out = Path(out)
    for path in out.parent.glob(f"{out.name}.resume-{fingerprint[:12]}*"):
        path.unlink(missing_ok=True)
