"""What the machine can do, decided once: the CPU's native number formats and ``--precision auto``.

A bfloat16 matmul is fast only where the CPU executes it natively (x86 ``avx512_bf16`` or AMX,
Arm's ``bf16`` extension); elsewhere PyTorch emulates it, and on an AVX2-only x86 CPU a bf16
ViT-B/16 forward was measured 65-72x slower than fp32. So ``auto`` never assumes: on a CPU it
reads the flags the kernel reports and picks bf16 only where they name a native bf16 unit.
Every result and benchmark records :func:`cpu_capability` beside its figures, because the same
command's seconds differ by that factor between the two kinds of CPU.

This module imports no torch at import time: the decision needs only ``/proc/cpuinfo``.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any, Optional

#: CPU flags (Linux ``/proc/cpuinfo``) that mean bf16 arithmetic runs in hardware
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (read once per process); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    if fields:  # a blank line ends the first processor's block
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The first processor's ``flags`` (x86) or ``Features`` (Arm); empty where unknown."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_model_name() -> str:
    """The CPU's marketing name (``model name`` in ``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "cpu"


def native_bf16_flags() -> list[str]:
    """The flags of this CPU that provide native bf16 arithmetic (empty: bf16 is emulated, slow)."""
    flags = _cpu_flags()
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 in hardware (``avx512_bf16``, AMX, Arm ``bf16``)."""
    return bool(native_bf16_flags())


def cpu_capability() -> dict[str, Any]:
    """The CPU facts a timing depends on: name, cores, PyTorch's kernel level, native bf16 and why.

    ``torch_kernels`` is ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``, ``AVX512``, ...),
    read only when torch is already imported, so that recording the facts never pays its import.
    """
    import os
    import sys

    torch_kernels: Optional[str] = None
    if "torch" in sys.modules:
        try:
            torch_kernels = sys.modules["torch"].backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            torch_kernels = None
    return {
        "cpu": cpu_model_name(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_kernels": torch_kernels,
        "native_bf16": has_native_bf16(),
        "native_bf16_flags": native_bf16_flags(),
    }


def describe_cpu(capability: Optional[dict[str, Any]] = None) -> str:
    """One short phrase for tables and logs, e.g. ``AMD EPYC, 2 cores, AVX2, no native bf16``."""
    cap = capability if capability is not None else cpu_capability()
    bf16 = f"native bf16 ({', '.join(cap['native_bf16_flags'])})" if cap["native_bf16"] else "no native bf16"
    kernels = f", {cap['torch_kernels']}" if cap.get("torch_kernels") else ""
    return f"{cap['cpu']}, {cap['cores']} cores{kernels}, {bf16}"


def auto_precision(device_type: str) -> tuple[str, str]:
    """What ``--precision auto`` means for image encoding on ``device_type`` and why, in one line.

    CUDA: fp16 (autocast, the published mixed precision). A CPU with native bf16: a bfloat16 image
    tower (about 3x faster than fp32 there). Any other CPU: fp32, because emulated bf16 is far
    slower than fp32.
    """
    if device_type == "cuda":
        return "fp16", "CUDA: fp16 autocast, as published"
    if has_native_bf16():
        return "bf16", f"this CPU computes bfloat16 natively ({', '.join(native_bf16_flags())}): a bfloat16 image tower"
    return "fp32", "this CPU has no native bfloat16 (no avx512_bf16/AMX), where bf16 is emulated and far slower than fp32"
