"""The little that evaluation needs from torch.distributed: ranks, shards and one gather.

Under ``torchrun`` the environment names the rank and world size; gloo is used on the CPU and nccl
on CUDA. Without it everything degrades to a single process with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist


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


def init_distributed(use_cuda: bool, timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group ``torchrun`` set up, if any (``WORLD_SIZE`` > 1).

    Args:
        use_cuda: pick nccl (and this rank's GPU) instead of gloo.
        timeout_minutes: how long a collective may wait; a rank that is much slower than the
            others (TPT on an unlucky shard) must not be mistaken for a dead one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def shard(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's share of ``indices``: every ``world_size``-th one, so classes stay balanced."""
    return list(indices[ctx.rank :: ctx.world_size])


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (safe to call when there is none)."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
