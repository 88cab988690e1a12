"""TPT, C-TPT and O-TPT on several images at once (``--tta-batch B``), each image with its own prompts.

Every image gets its own copy of the prompts and its own optimiser state: the copies are stacked
into one ``(B, …)`` tensor per prompt kind, so one text forward runs ``B × classes`` prompts and
one AdamW (an element-wise update, with the same step count for every copy) updates all of them.
An image's loss depends only on its own copy, so back-propagating the sum of the losses gives each
copy exactly its own gradient. The text forward is the shared-prefix one of
:mod:`protext.shared_prefix`, generalised to one prefix per image: the class part of every prompt
is run once per image and attends to that image's prefix.

Where this helps: on a GPU, B images fill the device that one image's 64 views and C prompts leave
idle. On a CPU it does the same arithmetic as B single images (the benchmark measures it).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..prompts import PromptedTextEncoder
from ..shared_prefix import prompt_copies_features, supports_shared_prefix
from ..zeroshot import length_chunks
from .base import AdaptResult, Adapter
from .ctpt import CTPTTuner
from .otpt import OTPTTuner
from .selection import select_confident
from .tpt import PromptTuner, TPTAdapter, TPTConfig

__all__ = ["REGULARISED", "BatchedTPTAdapter"]

REGULARISED: dict[str, type[PromptTuner]] = {"ctpt": CTPTTuner, "otpt": OTPTTuner}
"""The tuners whose loss adds a λ-weighted term of the class features to TPT's, by regulariser name."""


class BatchedTPTAdapter(Adapter):
    """TPT, or TPT plus a regulariser, whose ``adapt_batch`` tunes B prompt copies at once.

    Args:
        model, encoder, config: as for :class:`PromptTuner`.
        lam: λ; None is plain TPT.
        regulariser: with ``lam``, the loss's regulariser, a key of :data:`REGULARISED`: ``ctpt``
            (``− λ·ATFD``, the default, so ``(model, encoder, config, λ)`` stays C-TPT) or ``otpt``
            (``+ λ·O``).

    ``adapt`` is the one-image tuner, and ``adapt_batch`` uses that same tuner's loss for every copy,
    so each image's result equals its own ``adapt``; text towers the shared-prefix path cannot run
    (and fp16) fall back to one image at a time.

    Raises:
        ValueError: an unknown ``regulariser``, or one given without ``lam``.
    """

    def __init__(
        self,
        model: nn.Module,
        encoder: PromptedTextEncoder,
        config: TPTConfig,
        lam: Optional[float] = None,
        regulariser: Optional[str] = None,
    ) -> None:
        if regulariser is not None and regulariser not in REGULARISED:
            raise ValueError(f"regulariser must be one of {', '.join(REGULARISED)}, got '{regulariser}'.")
        if lam is None:
            if regulariser is not None:
                raise ValueError(f"regulariser '{regulariser}' needs its weight lam (λ); lam=None is plain TPT.")
            self.tuner = PromptTuner(model, encoder, config)
        else:
            self.tuner = REGULARISED[regulariser or "ctpt"](model, encoder, config, lam)
        self.single = TPTAdapter(self.tuner)
        self.encoder, self.config = encoder, config
        self.batchable = supports_shared_prefix(encoder) and not config.amp

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        return self.single.adapt(views)

    def _features(self, ctx: torch.Tensor, deep: Optional[torch.Tensor], grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """All copies' raw class features (no gradient); or, given ``grad`` (B, C, D), back-propagate it."""
        copies, n_classes = ctx.shape[0], self.encoder.tokens.shape[0]
        out = None
        for chunk in length_chunks(self.encoder.eot, max(1, self.config.token_budget // copies)):
            if grad is not None:
                prompt_copies_features(self.encoder, ctx, deep, chunk).backward(grad[:, chunk])
                continue
            with torch.no_grad():
                feats = prompt_copies_features(self.encoder, ctx, deep, chunk)
            if out is None:
                out = feats.new_empty(copies, n_classes, feats.shape[-1])
            out[:, chunk] = feats
        return out

    def _loss_grads(self, images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor], selected: list) -> torch.Tensor:
        """dL_b/d(text features of copy b), stacked (B, C, D); fills ``selected`` at the first step."""
        grads = []
        for b, (image, text) in enumerate(zip(images, texts)):
            leaf = text.detach().float().requires_grad_(True)
            logits = self.tuner._logits(image, leaf)
            if selected[b] is None:
                selected[b] = select_confident(logits, self.config.selection)
            (grad,) = torch.autograd.grad(self.tuner._loss(logits[selected[b]], leaf), leaf)
            grads.append(grad)
        return torch.stack(grads)

    def adapt_batch(self, batch: Sequence[torch.Tensor]) -> list[AdaptResult]:
        if len(batch) == 1 or not self.batchable:
            return [self.single.adapt(views) for views in batch]
        start = time.perf_counter()
        device = self.tuner.device
        features = self.tuner._images(torch.cat([v.to(device) for v in batch]))
        images = list(features.split([v.shape[0] for v in batch]))
        encoded = time.perf_counter()
        copies = len(batch)
        init = self.encoder.prompt_state()
        ctx = init["ctx"].to(device).unsqueeze(0).repeat(copies, 1, 1).requires_grad_(True)
        deep = init.get("deep_prompts")
        if deep is not None:
            deep = deep.to(device).unsqueeze(0).repeat(copies, 1, 1, 1).requires_grad_(self.config.tune == "all")
        params = [ctx] + ([deep] if deep is not None and self.config.tune == "all" else [])
        optimiser = torch.optim.AdamW(params, lr=self.config.lr)
        selected: list = [None] * copies
        initial = self.tuner.initial_text_features()
        for step in range(self.config.steps):
            texts = [initial] * copies if step == 0 else list(self._features(ctx, deep))
            optimiser.zero_grad(set_to_none=True)
            self._features(ctx, deep, grad=self._loss_grads(images, texts, selected))
            optimiser.step()
        texts = [initial] * copies if self.config.steps == 0 else list(self._features(ctx, deep))
        rest = (time.perf_counter() - encoded) / copies
        timing = {"images": (encoded - start) / copies, "tune": rest}
        results = []
        for image, text in zip(images, texts):
            logits = self.tuner._logits(image[:1], text)[0].detach().float().cpu()
            results.append(AdaptResult(logits, logits, dict(timing)))
        return results
