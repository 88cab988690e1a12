"""A uniform view of a frozen CLIP text tower, and a plain text encoder that runs it cut short.

open_clip keeps the text modules on the model itself for the built-in-text ``CLIP`` and on
``model.text`` for ``CustomTextCLIP``. :class:`TextTower` hides that difference so the prompt
encoder and the description encoder run the very same modules as ``model.encode_text``.

Only causal towers pooled at the end-of-text token are supported: prompts are spliced in at fixed
positions and features are read at EOT, which is what makes cutting a batch at its longest EOT exact
(ALGORITHMS.md §3). Bidirectional towers (SigLIP) or class-token pooling (CoCa) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UserError
from .flops import count_flops, counted_as


class UnsupportedTextTowerError(UserError, ValueError):
    """The model's text tower is not a causal transformer pooled at the EOT token."""


@dataclass
class TextTower:
    """The modules of a causal CLIP text tower, borrowed (not copied) from an open_clip model."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    blocks: nn.ModuleList
    ln_final: nn.Module
    text_projection: Optional[nn.Module | torch.Tensor]
    attn_mask: torch.Tensor
    batch_first: bool

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def depth(self) -> int:
        """Number of residual attention blocks."""
        return len(self.blocks)

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the blocks compute in (fp16 for OpenAI JIT-converted fp16 models, else fp32)."""
        block = self.blocks[0]
        return block.get_weight_dtype() if hasattr(block, "get_weight_dtype") else self.token_embedding.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``E[tokens]`` in the tower's compute dtype, shape (n, L, width)."""
        return self.token_embedding(tokens).to(self.dtype)

    @counted_as("text")  # every full text forward goes through here (the shared-prefix one is marked too)
    def run(
        self,
        x: torch.Tensor,
        eot: torch.Tensor,
        inject: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Run the tower on embedded sequences ``x`` (n, L, width) and return projected EOT features.

        ``L`` may be shorter than the context length: positions are added for the first ``L`` slots
        and the causal mask is cut to ``L × L``. ``inject(i, x)`` is called before every block ``i``
        and may return a modified ``x`` (deep prompts); it is not called for block 0's input, which
        the caller has already built.
        """
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = self.attn_mask[:length, :length]
        for i, block in enumerate(self.blocks):
            if inject is not None and i > 0:
                x = inject(i, x)
            if self.batch_first:
                x = block(x, attn_mask=mask)
            else:  # open_clip < 2.24 kept the text tower sequence-first
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = self.ln_final(x)
        return self.project(x[torch.arange(x.shape[0], device=x.device), eot])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text projection applied to pooled EOT states (n, width) -> (n, embed_dim).

        The one place it is applied: open_clip stores it as a matrix, an ``nn.Linear`` or not at all.
        """
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    @property
    def embed_dim(self) -> int:
        """Width of the projected features."""
        proj = self.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else int(proj.shape[1])


def text_tower(model: nn.Module) -> TextTower:
    """Return the :class:`TextTower` of an open_clip ``CLIP`` or ``CustomTextCLIP``.

    Raises :class:`UnsupportedTextTowerError` for towers whose output is not read at a causal EOT
    token (SigLIP's bidirectional tower, CoCa's class token, Hugging Face text encoders).
    """
    owner = model.text if hasattr(model, "text") else model
    name = type(model).__name__
    if not all(hasattr(owner, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise UnsupportedTextTowerError(
            f"{name}: its text tower ({type(owner).__name__}) is not a CLIP-style token transformer; "
            "protext prompts need open_clip's built-in causal text transformer (e.g. ViT-B-16, ViT-L-14)."
        )
    attn_mask = getattr(owner, "attn_mask", None)
    pool = getattr(owner, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
    if attn_mask is None:
        raise UnsupportedTextTowerError(
            f"{name}: its text tower is bidirectional (no causal mask, as in SigLIP); prompt positions "
            "and end-of-text pooling would not mean what protext assumes. Use an OpenAI-style CLIP model."
        )
    if getattr(owner, "cls_emb", None) is not None or pool != "argmax":
        raise UnsupportedTextTowerError(
            f"{name}: its text tower pools with '{pool}'"
            f"{' and a class token' if getattr(owner, 'cls_emb', None) is not None else ''}, "
            "not at the end-of-text token; protext supports EOT ('argmax') pooling only."
        )
    return TextTower(
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        blocks=owner.transformer.resblocks,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        attn_mask=attn_mask,
        batch_first=getattr(owner.transformer, "batch_first", True),
    )


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token of each row: the largest token id, as CLIP pools it."""
    return tokens.argmax(dim=-1)


def encode_tokens(model: nn.Module, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """Plain CLIP text features of tokenised text, equal to ``model.encode_text(tokens)``.

    With ``truncate`` the tower runs only up to the longest EOT of the batch; the causal mask makes
    the later positions irrelevant to the EOT features, so the result is the same, much sooner.
    """
    tower = text_tower(model)
    eot = eot_positions(tokens)
    if truncate:
        tokens = tokens[:, : int(eot.max()) + 1]
    return tower.run(tower.embed(tokens), eot)


def encode_in_length_batches(
    lengths: torch.Tensor | Sequence[int],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    on_batch: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Encode items in batches of similar length and return the features in input order.

    ``lengths[i]`` is item ``i``'s length (e.g. its EOT position); ``encode(indices)`` returns the
    features of those items (rows in the order given), typically cut at their longest EOT, so
    sorting by length wastes little padding. Rows are scattered back to input order, as fp32 on the
    device ``encode`` returned them on. ``on_batch(n)`` is called after each batch (progress bars).

    Batches hold a fixed number of rows (``batch_size``); description targets
    (:func:`protext.targets.encode_texts`) are encoded with it. Zero-shot class features and the
    prompt tuners' text features are batched by :func:`protext.zeroshot.length_chunks` instead: the
    same stable sort by length, cut by a token budget (rows x padded length) rather than a row count.
    """
    lengths = torch.as_tensor(lengths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.argsort(lengths, stable=True)
    out: Optional[torch.Tensor] = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        feats = encode(rows)
        if out is None:
            out = feats.new_empty((len(order), feats.shape[1]), dtype=torch.float32)
        out[rows.to(out.device)] = feats.float()
        if on_batch is not None:
            on_batch(len(rows))
    if out is None:
        raise ValueError("nothing to encode: no items given")
    return out


def text_gflops(model: nn.Module, n_tokens: Optional[int] = 77) -> float:
    """GFLOPs of one prompt of ``n_tokens`` tokens (end-of-text included) through the text tower.

    The prompt runs through :func:`encode_tokens`, protext's own text call, which
    stops the tower at the end-of-text token: ``n_tokens`` below the context length is the cost of a
    shorter prompt as protext runs it. ``None`` means the whole context (77 for CLIP).
    """
    tower = text_tower(model)
    context = tower.context_length
    n = context if n_tokens is None else n_tokens
    if not 1 <= n <= context:
        raise ValueError(f"n_tokens must be in 1..{context} (the context length), got {n_tokens!r}")
    device = tower.token_embedding.weight.device
    tokens = torch.zeros(1, context, dtype=torch.long, device=device)
    tokens[0, :n] = 1
    tokens[0, n - 1] = tower.token_embedding.num_embeddings - 1  # the end-of-text token: the largest id
    with torch.no_grad():
        return count_flops(encode_tokens, model, tokens) / 1e9
