"""The little that evaluation needs from torch.distributed: ranks, shards, one gather, no hung ranks.

Under ``torchrun`` the environment names the rank and world size; gloo is used on the CPU and nccl
on CUDA. Without it everything degrades to a single process with no process group.

A rank must never outlive its job. Two things guard it:

* a watchdog thread exits the rank as soon as its parent (the torchrun agent) is gone: a SIGKILLed
  agent cannot tell its workers, and they would otherwise wait in a collective until its timeout;
* ranks meet only at the end, and only once every rank has said it is finished (a counter in the
  job's store, polled), so the collective itself never waits long and its timeout can be short.
  A rank that dies makes the agent stop the others (torchrun's own rule).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .launch import launched_world_size  # noqa: F401  (re-exported: one definition, torch-free)

#: collectives run only once all ranks are ready, so they never need long (see :func:`wait_for_peers`)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
#: how often the watchdog looks at the parent process and :func:`wait_for_peers` at the store
POLL_SECONDS = 0.5
#: exit status of a rank whose agent vanished
EXIT_ORPHANED = 3


@dataclass
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


_watchdog: list[threading.Thread] = []


def start_parent_watchdog(poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    """Exit this process (status 3) as soon as its parent process is gone.

    A process whose parent dies is re-parented (to init or a subreaper), so ``getppid`` changes;
    ``os._exit`` is used because a rank blocked in a collective cannot run Python cleanup anyway.
    """
    if _watchdog:
        return _watchdog[0]
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(EXIT_ORPHANED)
            time.sleep(poll_seconds)

    thread = threading.Thread(target=watch, name="protext-parent-watchdog", daemon=True)
    thread.start()
    _watchdog.append(thread)
    return thread


def init_distributed(use_cuda: bool, timeout: timedelta = COLLECTIVE_TIMEOUT) -> DistContext:
    """Join the process group ``torchrun`` set up, if any (``WORLD_SIZE`` > 1), and watch the agent.

    Args:
        use_cuda: pick nccl (and this rank's GPU) instead of gloo.
        timeout: how long one collective may wait. Short on purpose: ranks enter collectives only
            after :func:`wait_for_peers`, so no rank waits for a slow peer's work inside one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    start_parent_watchdog()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def shard(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's share of ``indices``: every ``world_size``-th one, so classes stay balanced."""
    return list(indices[ctx.rank :: ctx.world_size])


def _store() -> Optional[Any]:
    try:  # the job's key-value store; private in torch, hence the fallback to a plain barrier
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


_rounds = [0]


def wait_for_peers(ctx: DistContext, poll_seconds: float = POLL_SECONDS) -> None:
    """Return once every rank has called this for the same time (each adds 1 to a counter of this
    round; all poll until it reaches the world size). Waiting here, outside any collective, is what
    lets the collective timeout be short: a rank that finishes an hour before its peers just polls,
    watched by the parent watchdog."""
    if not ctx.active:
        return
    _rounds[0] += 1  # every rank calls this in the same order, so the round names agree
    key = f"protext/finished/{_rounds[0]}"
    store = _store()
    if store is None:
        dist.barrier()
        return
    store.add(key, 1)
    while store.add(key, 0) < ctx.world_size:
        time.sleep(poll_seconds)


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (after :func:`wait_for_peers`)."""
    if not ctx.active:
        return [obj]
    wait_for_peers(ctx)
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (safe to call when there is none)."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def shutdown_all(meet: bool = False) -> None:
    """Leave the process group if this process is in one (the command's last step).

    ``meet``: after a run that every rank finished, the ranks meet once more first; gloo can abort a
    rank (SIGABRT) whose peer tears its connections down while the last collective's bytes are
    still in flight, which was seen once after the final gather.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if meet:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# for commands that run many evaluations in one job (``reproduce``): one process drives, the others follow


@contextmanager
def single_process() -> Iterator[None]:
    """Inside it, :func:`init_distributed` sees no torchrun job and returns a one-process context.

    For work that must not be split over ranks (an online TTA stream) but is run by one rank of a
    torchrun job: the code it calls (``protext.evaluation.evaluate``) asks the environment whether
    it runs under torchrun, so the answer is changed there, and only for the duration of the call.
    The process group itself stays as it was; nothing inside may use it.
    """
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


#: how often a rank waiting for the next step of a driven job looks at the store: steps often follow
#: each other within a second (a tiny cell), and a store read is cheap beside any step
STEP_POLL_SECONDS = 0.1


def exchange(obj: Any, ctx: DistContext, poll_seconds: float = STEP_POLL_SECONDS) -> list[Any]:
    """:func:`gather` for the steps of a driven job: every rank's ``obj`` in rank order, on every rank,
    after waiting (outside any collective, so for as long as it takes) for every rank to call it."""
    if not ctx.active:
        return [obj]
    wait_for_peers(ctx, poll_seconds)
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, ctx: DistContext, poll_seconds: float = STEP_POLL_SECONDS) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None). Like :func:`exchange`,
    it waits outside any collective, so a follower may wait here for hours while rank 0 trains."""
    return exchange(obj, ctx, poll_seconds)[0]
