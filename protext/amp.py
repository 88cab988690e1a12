"""Mixed precision, one code path for every device: where CUDA and the CPU differ, one small function each.

The published GPU runs use fp16 autocast, and TPT's step a ``GradScaler`` (initial scale 1000, a
step skipped when a gradient overflows). torch runs both on the CPU too (``torch.autocast("cpu",
dtype=torch.float16)``, ``torch.amp.GradScaler("cpu")``), with the same scaling, inf checks and
skip rule, so protext takes the very same path on either device and the CPU tests exercise the
logic the GPU runs. The only device-dependent choices are the functions below; nothing else in
protext names CUDA for precision, so this module is the precision surface no CPU test can reach.

On a CPU without native fp16 arithmetic the fp16 kernels are emulated (a 256x768x768 matmul
measured ~18x slower than fp32 on an AVX2-only CPU): fp16 there is for checking the published GPU
arithmetic, not for speed, and :func:`fp16_note` says so in one line.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional

import torch

__all__ = ["AMP_DEVICES", "autocast", "autocast_device", "fp16_note", "make_scaler"]

AMP_DEVICES = ("cuda", "cpu", "mps")
"""Device types torch has autocast and a gradient scaler for; only ``cpu`` has run in protext's tests."""


def autocast_device(device: torch.device) -> str:
    """The ``device_type`` that ``torch.autocast`` and ``torch.amp.GradScaler`` take for ``device``.

    Raises:
        ValueError: a device type protext does not run mixed precision on (e.g. ``mps``), named.
    """
    if device.type not in AMP_DEVICES:
        raise ValueError(f"mixed precision (fp16/bf16 autocast) runs on {', '.join(AMP_DEVICES)}, not on '{device.type}'; use --precision fp32.")
    return device.type


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """fp16/bf16 autocast on ``device``; ``None`` or fp32: no autocast at all (the model's own dtypes)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=autocast_device(device), dtype=dtype)


def make_scaler(device: torch.device, init_scale: float) -> torch.amp.GradScaler:
    """A fresh gradient scaler on ``device`` starting at ``init_scale`` (torch's growth and backoff).

    Same rule on every device: the loss is multiplied by the scale, gradients are unscaled before
    the optimiser step, a step with an inf/NaN gradient is skipped and the scale halved, and after
    2000 clean steps it doubles.
    """
    return torch.amp.GradScaler(autocast_device(device), init_scale=init_scale)


def fp16_note(device: torch.device) -> Optional[str]:
    """One line for a user who asked for fp16 where it is emulated (a CPU); None on CUDA."""
    if device.type == "cuda":
        return None
    return (
        f"precision fp16 on the {device.type.upper()}: the published GPU arithmetic (fp16 autocast, TPT's gradient "
        "scaler) runs here as on a GPU but emulated and far slower than fp32; meant for checking that "
        "arithmetic, not for speed (use fp32 or auto here)."
    )
