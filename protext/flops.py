"""Machine-independent cost: FLOPs counted on the real calls with ``torch.utils.flop_counter``.

**Unit.** A FLOP here is one floating-point operation, so **one multiply-add counts as 2 FLOPs**
(a ``(m, k) @ (k, n)`` product is ``2·m·k·n``). That is PyTorch's ``FlopCounterMode`` convention
and the one of open_clip's published profile (``docs/model_profile.csv``, columns ``gflops``,
``image_gflops``, ``text_gflops``, written by ``src/open_clip_train/profiler.py`` with
``FlopCounterMode``). Counted by hand for ViT-B/16 at 224 px: patch embedding
``2·196·768·768`` + 12 blocks × (QKV ``2·197·768·2304`` + scores and mix ``2·2·197²·768`` + out
``2·197·768²`` + MLP ``2·2·197·768·3072``) + projection ``2·768·512`` = 35.1269 G, the published
35.13; one 77-token prompt through the text tower (width 512) is 5.960 G, the published 5.96. The
GMACs of fvcore/thop/timm ("17.6 GFLOPs" for ViT-B/16) are half of these figures.

Only matrix products, convolutions and attention are counted (as ``FlopCounterMode`` does):
normalisation, activations, softmax and element-wise arithmetic are left out, as in the profile.
Attention under a causal mask counts the full square, as the profile does.

**What the stock counter misses, and is added here.** ``FlopCounterMode`` has no formula for two
kernels that CPU inference runs, so it would silently count zero for them:

* ``aten._native_multi_head_attention``, the fused "fast path" of ``nn.MultiheadAttention`` taken
  in inference (no grad, batch-first), which open_clip's image tower hits: uncounted, the ViT-B/16
  tower reads 22.5 instead of 35.1 GFLOPs;
* ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, the CPU kernel behind
  ``F.scaled_dot_product_attention``: uncounted, one text prompt reads 5.81 instead of 5.96.

:func:`count_flops` registers formulas for them, so a count does not depend on which kernel ran.

**Counting by part.** :class:`PartCounter` counts the same FLOPs and splits them into the image
tower, the text tower's forwards and backwards, and the method's own arithmetic (forward and
backward), each either per call or "once per run" (work done once and reused for every image, such
as the class text features). The towers say what they are with :func:`counted_as` on the functions
that run them (``ImageEncoder._encode``, ``TextTower.run``, ``prompt_copies_features``); work reused
across images says so with :func:`once_per_run`. Both are one global read when nothing counts.
A backward is the text tower's from the moment its gradient reaches a text-tower output (a tensor
hook on that output), for the rest of that backward call; before that it is the method's (e.g.
the gradient of the loss down to the class features).
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

#: FLOPs per multiply-add in every figure of this module (and in open_clip's profile)
FLOPS_PER_MAC = 2

#: open_clip's published profile, GFLOPs (2 per multiply-add) per image at the model's resolution and
#: per text of 77 tokens, batch 1: ``docs/model_profile.csv`` of mlfoundations/open_clip, columns
#: ``image_gflops`` and ``text_gflops``.
PUBLISHED_GFLOPS: dict[str, dict[str, float]] = {
    "RN50": {"image": 12.22, "text": 5.96},
    "ViT-B-32": {"image": 8.82, "text": 5.96},
    "ViT-B-16": {"image": 35.13, "text": 5.96},
    "ViT-L-14": {"image": 162.03, "text": 13.3},
}


def _native_mha_flop(
    query_shape: Any, key_shape: Any, value_shape: Any, embed_dim: int, num_head: int, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``aten._native_multi_head_attention`` (batch-first, shapes (B, L, E)): the Q, K and V
    projections, the scores ``Q·Kᵀ`` and the mix ``A·V`` over all heads, and the output projection."""
    batch, n_query, _ = query_shape
    _, n_key, _ = key_shape
    _, n_value, _ = value_shape
    e = embed_dim
    projections = 2 * batch * (n_query + n_key + n_value) * e * e
    attention = 2 * batch * n_query * n_key * e + 2 * batch * n_query * n_value * e
    output = 2 * batch * n_query * e * e
    return projections + attention + output


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention forward: torch's own SDPA formula, (B, H, L, D) shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU flash-attention backward: torch's own SDPA backward formula."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_formulas() -> dict[Any, Callable[..., int]]:
    """The formulas :func:`count_flops` adds to ``FlopCounterMode`` (see the module text), keyed by op."""
    aten = torch.ops.aten
    return {
        aten._native_multi_head_attention: _native_mha_flop,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    }


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 per multiply-add) of everything ``fn(*args, **kwargs)`` runs: forwards, and backwards
    if it calls them, exactly as called (grad mode, dtype, kernels and batch of the caller)."""
    counter = FlopCounterMode(display=False, custom_mapping=extra_formulas())
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _first_parameter(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def image_tower_gflops(model: nn.Module, resolution: int = 224) -> float:
    """GFLOPs of one image through ``model.visual`` (or ``model`` itself when it has no ``visual``),
    at ``resolution`` px square, in inference (no grad), on the model's device and dtype."""
    tower = getattr(model, "visual", model)
    weight = _first_parameter(tower)
    image = torch.ones(1, 3, resolution, resolution, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        return count_flops(tower, image) / 1e9


# --------------------------------------------------------------------------------------------------
# counting by part

#: the parts :class:`PartCounter` splits FLOPs into (GFLOPs tables list them in this order)
PARTS = ("image_tower", "image_tower_backward", "text_forward", "text_backward", "method", "method_backward")

#: what :func:`counted_as` accepts: the towers whose calls are told apart
TOWERS = ("image_tower", "text")

_F = TypeVar("_F", bound=Callable[..., Any])

# the counter running now: one at a time, as FlopCounterMode itself is not reentrant
_active: Optional["PartCounter"] = None
# the tower whose call is running (the outermost one), and whether the work is reused across images
_tower: ContextVar[Optional[str]] = ContextVar("protext_flops_tower", default=None)
_once: ContextVar[bool] = ContextVar("protext_flops_once", default=False)


def counted_as(tower: str) -> Callable[[_F], _F]:
    """Mark a function as one call of ``tower`` (one of :data:`TOWERS`) for :class:`PartCounter`.

    Only the outermost marked call counts (a tower call inside another is part of it). When the
    result needs a gradient, its backward is the tower's too (see the module text).
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")

    def mark(fn: _F) -> _F:
        @functools.wraps(fn)
        def marked(*args: Any, **kwargs: Any) -> Any:
            counter = _active
            if counter is None or _tower.get() is not None:
                return fn(*args, **kwargs)
            token = _tower.set(tower)
            try:
                out = fn(*args, **kwargs)
            finally:
                _tower.reset(token)
            counter.watch_backward(out, tower)
            return out

        return marked  # type: ignore[return-value]

    return mark


def once_per_run(fn: _F) -> _F:
    """Mark a function whose work is done once and reused for every image (a cache filled on the
    first call): :class:`PartCounter` puts its FLOPs under ``once`` instead of the calling image."""

    @functools.wraps(fn)
    def marked(*args: Any, **kwargs: Any) -> Any:
        if _active is None:
            return fn(*args, **kwargs)
        token = _once.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _once.reset(token)

    return marked  # type: ignore[return-value]


class PartCounter(FlopCounterMode):
    """``FlopCounterMode`` (with :func:`extra_formulas`) that also splits its total by part.

    After the ``with`` block, ``per_call`` and ``once`` map every name of :data:`PARTS` to integer
    FLOPs; their sums equal :meth:`get_total_flops`. ``all_once=True`` puts everything under
    ``once`` (a call that is itself once per run, such as computing the class features).
    """

    def __init__(self, all_once: bool = False) -> None:
        super().__init__(display=False, custom_mapping=extra_formulas())
        self.all_once = all_once
        self.per_call: dict[str, int] = dict.fromkeys(PARTS, 0)
        self.once: dict[str, int] = dict.fromkeys(PARTS, 0)
        self._backward_of: dict[int, str] = {}  # autograd graph task id -> the tower its gradient reached
        self._once_token: Any = None

    def __enter__(self) -> "PartCounter":
        global _active
        if _active is not None:
            raise RuntimeError("a PartCounter is already counting: counters do not nest")
        super().__enter__()
        _active = self
        if self.all_once:
            self._once_token = _once.set(True)
        return self

    def __exit__(self, *exc: Any) -> Any:
        global _active
        _active = None
        if self._once_token is not None:
            _once.reset(self._once_token)
            self._once_token = None
        return super().__exit__(*exc)

    def watch_backward(self, out: Any, tower: str) -> None:
        """Count the backward through ``out`` (a tower's output) as the tower's, from the moment its
        gradient arrives to the end of that backward call."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self._gradient_reached, tower))

    def _gradient_reached(self, tower: str, grad: torch.Tensor) -> None:
        if _active is self:  # a backward after the count ended is not this counter's
            self._backward_of[torch._C._current_graph_task_id()] = tower
        return None  # the gradient passes unchanged

    def _part(self) -> str:
        task = torch._C._current_graph_task_id()
        if task != -1:  # inside a backward call: the tower whose output the gradient has reached, if any
            tower = self._backward_of.get(task)
            return {"image_tower": "image_tower_backward", "text": "text_backward"}.get(tower or "", "method_backward")
        return {"image_tower": "image_tower", "text": "text_forward"}.get(_tower.get() or "", "method")

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # the same formula FlopCounterMode applies (it is called again just below for its own table),
        # added to the part that is running now
        if func_packet in self.flop_registry:
            flops = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
            bucket = self.once if _once.get() else self.per_call
            bucket[self._part()] += flops
        return super()._count_flops(func_packet, out, args, kwargs)
