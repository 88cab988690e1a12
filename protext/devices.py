"""``--device`` to a torch device: one rule for training, evaluation and reproduction.

``auto`` is CUDA where torch sees a GPU and the CPU elsewhere; any other name is parsed by torch
(``cpu``, ``cuda``, ``cuda:N``, ``mps``), and a CUDA device asked for on a machine without one is
one line naming ``--device`` and the way out, not a torch traceback minutes later.

A module of its own rather than a part of :mod:`protext.hardware`: that module reads what the CPU
can compute from ``/proc/cpuinfo`` and never imports torch, while this one turns a flag into a
torch device and refuses bad input (a :class:`~protext.errors.UserError`). It sits low, next to
:mod:`protext.errors`, so that ``training``, ``evaluation`` and ``reproduction`` ask it rather than one
another. torch is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch

#: what ``--device`` accepts, as every message says it
DEVICE_NAMES = "auto, cpu, mps, cuda or cuda:N"


class DeviceError(UserError, ValueError):
    """``--device`` names no device, or a CUDA device on a machine without CUDA."""


def _concrete(name: str) -> str:
    """``name`` with ``auto`` decided: ``cuda`` where torch sees a GPU, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_device(name: str) -> "torch.device":
    """The torch device ``--device name`` runs on.

    Args:
        name: ``auto`` (CUDA where available, else the CPU) or a torch device name.

    Raises:
        DeviceError: ``name`` is no device name, or names CUDA on a machine without it.
    """
    import torch

    try:
        device = torch.device(_concrete(name))
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device must be {DEVICE_NAMES}, got {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto.")
    return device


def uses_cuda(name: str) -> bool:
    """Whether ``--device name`` means CUDA (``auto``: where available), without checking that it
    exists: what a process group needs to pick its backend before :func:`resolve_device` refuses a
    missing GPU with its message."""
    return _concrete(name).startswith("cuda")
