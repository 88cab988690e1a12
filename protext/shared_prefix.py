"""The prompted text tower with the positions every class shares computed once.

Positions ``0 .. n_ctx`` (start-of-text and the context) hold the same vectors in every class
prompt, at every block (deep prompts overwrite them identically), and under the causal mask they
attend only to each other: their hidden states are the same for all classes. So they run once, as a
batch of one, and each class runs only its own positions ``n_ctx+1 ..``, attending to the shared
keys and values. Exact in exact arithmetic, like cutting at the EOT; training and TPT both use it,
and both test it against :meth:`PromptedTextEncoder.forward`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    tower = encoder.tower
    n_ctx = encoder.n_ctx
    prefix_len = 1 + n_ctx
    tokens, eot = encoder.tokens[classes], encoder.eot[classes]
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    with torch.no_grad():
        sot = tower.embed(tokens[:1, :1])
        rest = tower.embed(tokens[:, prefix_len:])
    dtype = rest.dtype
    pos = tower.positional_embedding[:length].to(dtype)
    prefix = torch.cat([sot, encoder.ctx.to(dtype)[None]], dim=1) + pos[:prefix_len]
    rest = rest + pos[prefix_len:]
    mask = tower.attn_mask[:length, :length]
    # a boolean mask (True = may attend) is valid for SDPA in any dtype, autocast included
    mask_prefix, allowed = mask[:prefix_len, :prefix_len], mask[prefix_len:, :] == 0
    n, width = rest.shape[0], rest.shape[2]

    for i, block in enumerate(tower.blocks):
        if encoder.deep_prompts is not None and 0 < i < encoder.depth:
            prefix = splice_context(prefix, encoder.deep_prompts[i - 1], n_ctx)
        attn: nn.MultiheadAttention = block.attn
        heads = attn.num_heads
        head_dim = width // heads
        # keys and values of the prefix: once, then shared by every class (expand does not copy)
        k_pre, v_pre = F.linear(block.ln_1(prefix), attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
        q, k, v = F.linear(block.ln_1(rest), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

        def split(x: torch.Tensor, rows: int) -> torch.Tensor:
            return x.reshape(rows, -1, heads, head_dim).transpose(1, 2)

        k = torch.cat([split(k_pre, 1).expand(n, -1, -1, -1), split(k, n)], dim=2)
        v = torch.cat([split(v_pre, 1).expand(n, -1, -1, -1), split(v, n)], dim=2)
        out = F.scaled_dot_product_attention(split(q, n), k, v, attn_mask=allowed)
        out = attn.out_proj(out.transpose(1, 2).reshape(n, -1, width))
        rest = rest + block.ls_1(out)
        rest = rest + block.ls_2(block.mlp(block.ln_2(rest)))
        prefix = block(prefix, attn_mask=mask_prefix)

    rest = tower.ln_final(rest)
    return tower.project(rest[torch.arange(n, device=rest.device), eot - prefix_len])
