"""Learned prompts on disk: safetensors (no pickle) with JSON metadata, and CoOp's ``.pth`` format.

A protext checkpoint holds ``ctx`` (n_ctx × width) and, for depth > 1, ``deep_prompts``
((depth−1) × n_ctx × width), plus metadata describing how they were learned. Writes are atomic
(temporary file, then rename), so an interrupted save never destroys the previous checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .prompts import PromptedTextEncoder

FORMAT = "protext-prompts/1"


class CheckpointError(ValueError):
    """A prompt checkpoint is missing, unreadable or not a protext/CoOp prompt file."""


@dataclass
class PromptCheckpoint:
    """Learned prompt vectors and what is known about how they were made.

    ``meta`` holds at least ``n_ctx``, ``depth``, ``width``, ``ctx_init`` (or None) and ``template``;
    protext training adds the model, pretrained weights, class names, preset, hyper-parameters,
    description-file hash, final loss and protext version.
    """

    ctx: torch.Tensor
    deep_prompts: Optional[torch.Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def width(self) -> int:
        return int(self.ctx.shape[1])

    @property
    def depth(self) -> int:
        return 1 if self.deep_prompts is None else int(self.deep_prompts.shape[0]) + 1

    @property
    def ctx_init(self) -> Optional[str]:
        return self.meta.get("ctx_init")

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors as :meth:`PromptedTextEncoder.load_prompt_state` takes them."""
        state = {"ctx": self.ctx}
        if self.deep_prompts is not None:
            state["deep_prompts"] = self.deep_prompts
        return state

    def build_encoder(self, model, tokenizer, classnames, template: Optional[str] = None) -> PromptedTextEncoder:
        """A :class:`PromptedTextEncoder` for ``classnames`` carrying these prompts.

        The prompt layout (n_ctx, depth, init phrase) comes from the checkpoint, so the frozen token
        positions around the context are the ones the prompts were learned with.
        """
        encoder = PromptedTextEncoder(
            model,
            tokenizer,
            classnames,
            n_ctx=self.n_ctx,
            depth=self.depth,
            ctx_init=self.ctx_init,
            template=template or self.meta.get("template") or "{}.",
        )
        encoder.load_prompt_state(self.state())
        return encoder


def save_prompts(path: str | os.PathLike, encoder: PromptedTextEncoder, meta: Mapping[str, Any] | None = None) -> None:
    """Write the encoder's prompts and metadata to ``path`` (safetensors), atomically."""
    full = {
        "format": FORMAT,
        "n_ctx": encoder.n_ctx,
        "depth": encoder.depth,
        "width": encoder.width,
        "ctx_init": encoder.ctx_init,
        "template": encoder.template,
        **(meta or {}),
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.prompt_state().items()}
    header = {k: json.dumps(v) for k, v in full.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_prompts(path: str | os.PathLike) -> PromptCheckpoint:
    """Read a protext checkpoint (``.safetensors``); CoOp/TPT ``.pth`` files go to :func:`load_coop`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such prompt checkpoint.")
    if path.suffix in (".pth", ".pt", ".tar"):
        return load_coop(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors prompt checkpoint ({err}).") from None
    if "ctx" not in tensors:
        raise CheckpointError(f"{path}: has no 'ctx' tensor; tensors found: {sorted(tensors)}.")
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return PromptCheckpoint(tensors["ctx"], tensors.get("deep_prompts"), meta)


def export_coop(checkpoint: PromptCheckpoint, path: str | os.PathLike) -> None:
    """Write ``{'state_dict': {'ctx': tensor}}``, which the official CoOp/TPT code ``--load``s.

    Only the shallow context survives: CoOp and TPT have no deep prompts.
    """
    payload = {"state_dict": {"ctx": checkpoint.ctx.detach().float().cpu().clone()}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_coop(path: str | os.PathLike) -> PromptCheckpoint:
    """Read a CoOp/TPT ``.pth`` (``{'state_dict': {'ctx': ...}}``) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such CoOp checkpoint.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors differ by torch version
        raise CheckpointError(f"{path}: not a loadable CoOp checkpoint ({type(err).__name__}: {err}).") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    ctx = state.get("ctx") if isinstance(state, dict) else None
    if not isinstance(ctx, torch.Tensor):
        raise CheckpointError(f"{path}: expected {{'state_dict': {{'ctx': tensor}}}} (CoOp format); no 'ctx' tensor found.")
    if ctx.ndim == 3:  # class-specific contexts (CSC) are not a shared prompt
        raise CheckpointError(f"{path}: holds class-specific contexts {tuple(ctx.shape)}; protext needs a shared context.")
    meta = {"format": "coop", "n_ctx": int(ctx.shape[0]), "depth": 1, "width": int(ctx.shape[1]), "ctx_init": None}
    return PromptCheckpoint(ctx.float(), None, meta)
