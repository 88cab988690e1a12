"""TPT and C-TPT on several images at once (``--tta-batch B``), each image with its own prompts.

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
import torch.nn.functional as F

from ..prompts import PromptedTextEncoder
from ..shared_prefix import supports_shared_prefix
from ..zeroshot import length_chunks
from .base import AdaptResult, Adapter
from .ctpt import CTPTTuner
from .selection import select_confident
from .tpt import PromptTuner, TPTAdapter, TPTConfig

__all__ = ["BatchedTPTAdapter", "batched_prompt_features"]


def batched_prompt_features(
    encoder: PromptedTextEncoder, ctx: torch.Tensor, deep: Optional[torch.Tensor], classes: torch.Tensor
) -> torch.Tensor:
    """Raw features (B, n, D) of ``classes`` under B prompt copies.

    ``ctx`` is (B, n_ctx, width), ``deep`` (B, depth − 1, n_ctx, width) or None. Copy ``b`` gives
    ``encoder(classes)`` with ``encoder``'s prompts replaced by ``ctx[b]``/``deep[b]``.
    """
    tower, n_ctx = encoder.tower, encoder.n_ctx
    plen = 1 + n_ctx
    tokens, eot = encoder.tokens[classes], encoder.eot[classes]
    length = int(eot.max()) + 1
    copies, n = ctx.shape[0], tokens.shape[0]
    with torch.no_grad():
        sot = tower.embed(tokens[:1, :1])
        rest = tower.embed(tokens[:, plen:length])
    dtype = rest.dtype
    pos = tower.positional_embedding[:length].to(dtype)
    prefix = torch.cat([sot.expand(copies, -1, -1), ctx.to(dtype)], dim=1) + pos[:plen]
    rest = (rest + pos[plen:]).repeat(copies, 1, 1)  # row b·n + j: class j under copy b
    mask = tower.attn_mask[:length, :length]
    mask_prefix, allowed = mask[:plen, :plen], mask[plen:, :] == 0
    rows, width = rest.shape[0], rest.shape[2]
    for i, block in enumerate(tower.blocks):
        if deep is not None and 0 < i < encoder.depth:
            prefix = torch.cat([prefix[:, :1], deep[:, i - 1].to(dtype)], dim=1)
        attn: nn.MultiheadAttention = block.attn
        heads = attn.num_heads
        head_dim = width // heads

        def split(x: torch.Tensor, count: int) -> torch.Tensor:
            return x.reshape(count, -1, heads, head_dim).transpose(1, 2)

        k_pre, v_pre = F.linear(block.ln_1(prefix), attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        q, k, v = F.linear(block.ln_1(rest), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        k = torch.cat([split(k_pre, copies).repeat_interleave(n, dim=0), split(k, rows)], dim=2)
        v = torch.cat([split(v_pre, copies).repeat_interleave(n, dim=0), split(v, rows)], dim=2)
        out = F.scaled_dot_product_attention(split(q, rows), k, v, attn_mask=allowed)
        out = attn.out_proj(out.transpose(1, 2).reshape(rows, -1, width))
        rest = rest + block.ls_1(out)
        rest = rest + block.ls_2(block.mlp(block.ln_2(rest)))
        prefix = block(prefix, attn_mask=mask_prefix)
    rest = tower.ln_final(rest)
    pooled = rest[torch.arange(rows, device=rest.device), (eot - plen).repeat(copies)]
    return tower.project(pooled).reshape(copies, n, -1)


class BatchedTPTAdapter(Adapter):
    """TPT (``lam`` None) or C-TPT (``lam`` = λ) whose ``adapt_batch`` tunes B prompt copies at once.

    ``adapt`` is the one-image tuner; text towers the shared-prefix path cannot run fall back to
    one image at a time.
    """

    def __init__(self, model: nn.Module, encoder: PromptedTextEncoder, config: TPTConfig, lam: Optional[float] = None) -> None:
        self.tuner = CTPTTuner(model, encoder, config, lam) if lam is not None else PromptTuner(model, encoder, config)
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
                batched_prompt_features(self.encoder, ctx, deep, chunk).backward(grad[:, chunk])
                continue
            with torch.no_grad():
                feats = batched_prompt_features(self.encoder, ctx, deep, chunk)
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
