"""The prompted text tower with the positions every class shares computed once.

Positions ``0 .. n_ctx`` (start-of-text and the context) hold the same vectors in every class
prompt, at every block (deep prompts overwrite them identically), and under the causal mask they
attend only to each other: their hidden states are the same for all classes. So they run once, as a
batch of one, and each class runs only its own positions ``n_ctx+1 ..``, attending to the shared
keys and values. Exact in exact arithmetic, like cutting at the EOT; training and TPT both use it,
and both test it against :meth:`PromptedTextEncoder.forward`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flops import counted_as
from .prompts import PromptedTextEncoder, splice_context


def _plain_block(block: nn.Module) -> bool:
    """A standard open_clip self-attention block whose pieces the shared-prefix path can call."""
    attn = getattr(block, "attn", None)
    return (
        all(hasattr(block, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and attn.batch_first
        and not attn.dropout
        and not getattr(block, "training", False)
    )


def supports_shared_prefix(encoder: PromptedTextEncoder) -> bool:
    """Whether :func:`shared_prefix_features` can run this encoder's tower."""
    tower = encoder.tower
    return tower.batch_first and all(_plain_block(b) for b in tower.blocks)


def shared_prefix_features(encoder: PromptedTextEncoder, classes: torch.Tensor) -> torch.Tensor:
    """``encoder(classes, truncate=True)``, computing the prompt prefix once instead of per class.

    Positions ``0 .. n_ctx`` (start-of-text and the context) hold the same vectors in every class
    prompt, at every block (deep prompts overwrite them identically), and under the causal mask
    they attend only to each other: their hidden states are the same for all classes. So they are
    run once, as a batch of one, and each class runs only its own positions ``n_ctx+1 ..``,
    attending to the prefix's keys and values. With ImageNet's names more than half of all prompt
    tokens are prefix, so this halves the text tower's work; gradients reach the context through
    the shared prefix exactly as through the per-class copies.
    """
    deep = None if encoder.deep_prompts is None else encoder.deep_prompts[None]
    return prompt_copies_features(encoder, encoder.ctx[None], deep, classes)[0]


@counted_as("text")
def prompt_copies_features(
    encoder: PromptedTextEncoder, ctx: torch.Tensor, deep: Optional[torch.Tensor], classes: torch.Tensor
) -> torch.Tensor:
    """Raw features ``(B, n, D)`` of ``classes`` under B copies of the prompts, one prefix per copy.

    ``ctx`` is ``(B, n_ctx, width)``, ``deep`` ``(B, depth − 1, n_ctx, width)`` or None; copy ``b``
    gives ``encoder(classes, truncate=True)`` with the encoder's prompts replaced by ``ctx[b]`` and
    ``deep[b]``. The class part of every prompt runs once per copy and attends to its copy's prefix
    (B = 1 is :func:`shared_prefix_features`; ``--tta-batch`` uses B images' prompts at once).
    """
    tower, n_ctx = encoder.tower, encoder.n_ctx
    prefix_len = 1 + n_ctx
    tokens, eot = encoder.tokens[classes], encoder.eot[classes]
    length = int(eot.max()) + 1
    copies, n = ctx.shape[0], tokens.shape[0]
    with torch.no_grad():
        sot = tower.embed(tokens[:1, :1])
        rest = tower.embed(tokens[:, prefix_len:length])
    dtype = rest.dtype
    pos = tower.positional_embedding[:length].to(dtype)
    prefix = torch.cat([sot.expand(copies, -1, -1), ctx.to(dtype)], dim=1) + pos[:prefix_len]
    rest = rest + pos[prefix_len:]
    if copies > 1:
        rest = rest.repeat(copies, 1, 1)  # row b·n + j: class j under copy b
    mask = tower.attn_mask[:length, :length]
    # a boolean mask (True = may attend) is valid for SDPA in any dtype, autocast included
    mask_prefix, allowed = mask[:prefix_len, :prefix_len], mask[prefix_len:, :] == 0
    rows, width = rest.shape[0], rest.shape[2]

    def per_row(x: torch.Tensor) -> torch.Tensor:
        # each copy's prefix keys/values for all n classes of that copy; one copy is shared
        # without a copy in memory (expand), several are repeated
        return x.expand(n, -1, -1, -1) if copies == 1 else x.repeat_interleave(n, dim=0)

    for i, block in enumerate(tower.blocks):
        if deep is not None and 0 < i < encoder.depth:
            prefix = splice_context(prefix, deep[:, i - 1], n_ctx)
        attn: nn.MultiheadAttention = block.attn
        heads = attn.num_heads
        head_dim = width // heads

        def split(x: torch.Tensor, count: int) -> torch.Tensor:
            return x.reshape(count, -1, heads, head_dim).transpose(1, 2)

        # keys and values of the prefix: once per copy, then shared by every class of that copy
        k_pre, v_pre = F.linear(block.ln_1(prefix), attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        q, k, v = F.linear(block.ln_1(rest), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        k = torch.cat([per_row(split(k_pre, copies)), split(k, rows)], dim=2)
        v = torch.cat([per_row(split(v_pre, copies)), split(v, rows)], dim=2)
        out = F.scaled_dot_product_attention(split(q, rows), k, v, attn_mask=allowed)
        out = attn.out_proj(out.transpose(1, 2).reshape(rows, -1, width))
        rest = rest + block.ls_1(out)
        rest = rest + block.ls_2(block.mlp(block.ln_2(rest)))
        prefix = block(prefix, attn_mask=mask_prefix)

    rest = tower.ln_final(rest)
    pooled = rest[torch.arange(rows, device=rest.device), (eot - prefix_len).repeat(copies)]
    return tower.project(pooled).reshape(copies, n, -1)
