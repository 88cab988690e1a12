"""Device, precision and the facts about the machine that every result records."""

from __future__ import annotations

import platform
import resource
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..amp import fp16_note
from ..devices import resolve_device
from ..distributed import DistContext
from ..hardware import auto_precision, cpu_model_name
from .config import EvalConfig


@dataclass
class Runtime:
    """Resolved device and numeric settings."""

    device: torch.device
    precision: str
    image_dtype: Optional[torch.dtype]

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"


def resolve_runtime(config: EvalConfig, ctx: DistContext) -> Runtime:
    """``--device``/``--precision`` to a device and dtypes.

    The device is :func:`protext.devices.resolve_device`'s (under torchrun, this rank's GPU); a
    precision of ``auto`` is decided by :func:`protext.hardware.auto_precision` (CUDA: fp16; a CPU: bf16 only where
    it computes bf16 natively, else fp32) and said in one line on stderr by the main process.
    """
    device = resolve_device(config.device)
    if device.type == "cuda" and (ctx.active or device.index is None):
        device = torch.device("cuda", ctx.local_rank if ctx.active else torch.cuda.current_device())
    precision = config.precision
    if precision == "auto":
        precision, why = auto_precision(device.type)
        if ctx.is_main and config.progress:
            print(f"precision auto: {precision} ({why})", file=sys.stderr, flush=True)
    note = fp16_note(device) if precision == "fp16" else None
    if note and ctx.is_main:  # allowed, never silently fp32; said even without progress, as a warning
        print(note, file=sys.stderr, flush=True)
    image_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Runtime(device, precision, image_dtype)


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's name, as a result should record it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process: max allocated on CUDA, peak resident set size on the CPU."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return {"kind": "cpu_peak_rss", "mib": mib}


def versions() -> dict[str, str]:
    """torch, open_clip and protext versions."""
    from .. import __version__

    try:
        import open_clip

        open_clip_version = getattr(open_clip, "__version__", "unknown")
    except ImportError:
        open_clip_version = "not installed"
    return {"protext": __version__, "torch": torch.__version__, "open_clip": open_clip_version, "python": platform.python_version()}
