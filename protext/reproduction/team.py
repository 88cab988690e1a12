"""The ranks of a torchrun table job: who checks, who computes and who writes (:class:`Team`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 drives and the other ranks follow. Every rank runs
the pre-flight and the ranks compare their outcomes and the datasets each sees (:func:`join`), so
one rank's problem stops all of them, reported once by rank 0 (the others raise
:class:`SharedError` and exit 2 quietly). A cell to evaluate is announced to every rank and all of
them evaluate it together; an online cell (one ordered stream, or replayed orders and scenarios) is
run whole by one rank as a one-process evaluation. In one process every call is a plain call on the
runner. ``torch.distributed`` loads only when a job needs it: plans and bad flags need no torch.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any, Optional

from ..devices import DeviceError, resolve_device, uses_cuda
from ..errors import UserError
from ..launch import launched_world_size
from .config import ReproduceConfig, ReproduceError
from .plan import Cell
from .run_folder import RunFolder
from .runner import CellRunner, EvalRequest

if TYPE_CHECKING:
    from ..distributed import DistContext


def _dist():
    """:mod:`protext.distributed`, imported on first use (it imports torch)."""
    from .. import distributed

    return distributed


class SharedError(ReproduceError):
    """An error every rank of a torchrun job raises at once: rank 0 reports it, the others exit 2 quietly."""


def check_torchrun(config: ReproduceConfig) -> None:
    """Refuse flags a torchrun job cannot honour, before the ranks meet and before any model loads.

    Every process of a job takes the GPU of its ``LOCAL_RANK`` (as ``protext.eval`` does), so a
    device named by index, or more processes on a node than it has GPUs, cannot be honoured.
    Checks on the flags alone raise :class:`SharedError` on ranks other than 0 (every rank finds
    them, rank 0 reports them); the GPU count is this node's own and is reported by each rank it stops.
    """
    main = os.environ.get("RANK", "0") == "0"
    error = ReproduceError if main else SharedError
    if re.fullmatch(r"cuda:\d+", config.device):
        raise error(f"--device {config.device} under torchrun: every process takes the GPU of its LOCAL_RANK; "
                    "pass --device cuda (or auto).")
    if config.device == "cpu" or not (config.device == "auto" or config.device.startswith("cuda")):
        return  # other names are refused with the model's device, like in one process
    import torch

    try:
        resolve_device(config.device)  # the one rule and message for a CUDA device without CUDA
    except DeviceError as err:
        raise error(str(err)) from None
    if not torch.cuda.is_available():  # auto on a machine without CUDA: the CPU
        return
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise ReproduceError(f"--nproc_per_node: rank {os.environ.get('RANK')} is process {local_rank} of its node, which has "
                             f"{gpus} GPU(s); start at most one process per GPU (or pass --device cpu).")


def join(config: ReproduceConfig, problem: Optional[UserError], present: Optional[list[str]]) -> DistContext:
    """Join the torchrun job (if any) and compare every rank's pre-flight; raise on every rank if one failed.

    The ranks also compare the datasets each finds under ``--root`` (``present``, sorted; None when
    its pre-flight failed): on several nodes each reads its own ``--root``, and a cell is evaluated
    by all ranks, so all must hold the same datasets.
    """
    if launched_world_size() == 1:
        return _dist().DistContext()
    ctx = _dist().init_distributed(use_cuda=uses_cuda(config.device))  # the evaluation's own rule
    reports = _dist().exchange((str(problem) if problem else None, present), ctx)
    failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message]
    if failed:
        rank, message = failed[0]
        raise_on_all(ctx, message if rank == 0 else f"rank {rank}: {message}")
    seen = [datasets for _, datasets in reports]
    for rank, datasets in enumerate(seen):
        if datasets != seen[0]:
            raise_on_all(ctx, f"--root {config.root}: rank {rank} finds the datasets {datasets}, rank 0 finds {seen[0]}; "
                               "every node must see the same datasets at the same --root.")
    return ctx


def raise_on_all(ctx: DistContext, message: str) -> None:
    """Raise ``message`` on this rank: reported by rank 0, quietly on the others (they all raise it)."""
    raise (ReproduceError if ctx.is_main else SharedError)(message)


def online(cell: Cell) -> bool:
    """Whether the cell's TTA adapts over one ordered stream (TDA), which ranks must not split, or
    replays orders or a scenario from one encoding (one process: protext.evaluation.orders)."""
    from ..evaluation.config import ONLINE_METHODS

    replays = bool(cell.runs) and cell.runs["kind"] != "order-free"
    return replays or (bool(cell.tta) and cell.tta.get("method") in ONLINE_METHODS)


def _alone(runner: CellRunner, request: Optional[EvalRequest]) -> Optional[tuple]:
    """Evaluate ``request`` in this rank as one process: ``("ok", result, seconds)`` or ``("error", message)``."""
    if request is None:
        return None
    began = time.perf_counter()
    try:
        with _dist().single_process():
            result = runner.evaluate(request)
    except UserError as err:
        return ("error", f"{request.cell.key}: {err}")
    return ("ok", result, time.perf_counter() - began)


class Team:
    """The ranks as rank 0 drives them; in one process, plain calls on the runner.

    Rank 0 says each step with :func:`~protext.distributed.from_main` (the others wait for it
    outside any collective): ``evaluate`` (all ranks evaluate one cell together), ``alone`` (each
    rank runs the cell assigned to it as one process, then the ranks send back their results),
    ``opened`` (the others check that they see the run folder), ``stop`` (an error rank 0 reports)
    and ``done``.
    """

    def __init__(self, ctx: DistContext, runner: CellRunner) -> None:
        self.ctx, self.runner = ctx, runner
        self.listening = ctx.active  # the others wait for rank 0's next step (not inside a collective)

    @property
    def active(self) -> bool:
        """Whether there are other ranks."""
        return self.ctx.active

    @property
    def size(self) -> int:
        """How many ranks take part (1 without torchrun)."""
        return self.ctx.world_size

    def evaluate(self, request: EvalRequest) -> dict[str, Any]:
        """Evaluate a cell, its images shared by every rank."""
        if self.ctx.active:
            _dist().from_main(("evaluate", request), self.ctx)
            self.listening = False  # an error inside is raised by every rank at once: nobody to tell
        result = self.runner.evaluate(request)
        self.listening = self.ctx.active
        return result

    def alone(self, requests: list[EvalRequest]) -> list[tuple[dict[str, Any], float]]:
        """Each request evaluated whole by one rank (rank ``i`` takes ``requests[i]``): results and seconds."""
        assert len(requests) <= self.size
        assignments = dict(enumerate(requests))
        _dist().from_main(("alone", assignments), self.ctx)
        replies = _dist().exchange(_alone(self.runner, assignments.get(0)), self.ctx)[: len(requests)]
        for reply in replies:
            if reply[0] == "error":
                raise ReproduceError(reply[1])
        return [(reply[1], reply[2]) for reply in replies]

    def opened(self, config: ReproduceConfig) -> None:
        """After rank 0 created the run folder: every rank must see it (on several nodes, a shared ``--out``)."""
        if not self.ctx.active:
            return
        _dist().from_main(("opened",), self.ctx)
        for problem in _dist().exchange(None, self.ctx):
            if problem:
                raise ReproduceError(problem)

    def stop(self, err: UserError) -> None:
        """Tell the waiting ranks that rank 0 stops with ``err`` (they exit 2 quietly; rank 0 reports it)."""
        if self.listening:
            self.listening = False
            _dist().from_main(("stop", str(err)), self.ctx)

    def done(self) -> None:
        """Release the other ranks: the table is written."""
        if self.listening:
            self.listening = False
            _dist().from_main(("done",), self.ctx)

    def follow(self, folder: RunFolder, config: ReproduceConfig) -> None:
        """A rank other than 0: do what rank 0 says until it says ``done``."""
        try:
            while True:
                step = _dist().from_main(None, self.ctx)
                if step[0] == "evaluate":
                    self.runner.evaluate(step[1])
                elif step[0] == "alone":
                    _dist().exchange(_alone(self.runner, step[1].get(self.ctx.rank)), self.ctx)
                elif step[0] == "opened":
                    seen = (folder.path / "run.json").is_file()
                    _dist().exchange(None if seen else (
                        f"--out {config.out or 'reproduction'}: rank {self.ctx.rank} (on {socket.gethostname()}) does not see "
                        f"{folder.path / 'run.json'}, which rank 0 wrote; on several nodes --out must be a folder they all share."), self.ctx)
                elif step[0] == "stop":
                    raise SharedError(step[1])
                else:
                    return
        except SharedError:
            raise
        except UserError as err:  # an evaluation's error: every rank raised it, rank 0 reports it
            raise SharedError(str(err)) from None
