"""Learnable context and deep text prompts spliced into a frozen CLIP text tower (ALGORITHMS.md §1–§2).

Positions ``1 .. n_ctx`` (right after start-of-text) of every class prompt hold the shared context;
with prompt depth ``d``, blocks ``1 .. d-1`` each overwrite those positions with vectors of their own
just before they run. Everything else is the frozen tower, run exactly as ``model.encode_text``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .classlists import clean_classname  # noqa: F401  (re-exported: prompts are written with it)
from .errors import UserError
from .text_tower import TextTower, eot_positions, text_tower

DEFAULT_CTX_INIT = "a photo of a"
"""TPT's and ProText's init phrase; dataset templates start with it (PRESETS.md)."""
MAX_INIT_CTX = 4
"""An init phrase is used only for short contexts (``n_ctx <= 4``), as in the published code."""


class PromptShapeError(UserError, ValueError):
    """Saved prompts do not fit this encoder (width, context length or depth differ)."""


def splice_context(hidden: torch.Tensor, vectors: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """``hidden`` (n, L, width) with positions ``1 .. n_ctx`` replaced by ``vectors``: (n_ctx, width)
    for every row, or (n, n_ctx, width), one set per row (per-image prompt copies of ``--tta-batch``).

    The one place prompts enter the tower: the input context and every deep prompt (here, in
    :mod:`protext.shared_prefix` and in TPT) go through it, so they all use the same positions.
    """
    vectors = vectors.to(hidden.dtype)
    if vectors.dim() == 2:
        vectors = vectors.unsqueeze(0).expand(hidden.shape[0], -1, -1)
    return torch.cat([hidden[:, :1], vectors, hidden[:, 1 + n_ctx :]], dim=1)


def _strip_prefix(template: str, phrase: str) -> str:
    """The part of ``template`` after a leading init phrase (templates may repeat it, PRESETS.md)."""
    if phrase and template.lower().startswith(phrase.lower()):
        return template[len(phrase):].lstrip()
    return template


class PromptedTextEncoder(nn.Module):
    """Shared context + deep prompts for a frozen open_clip text tower.

    Args:
        model: a frozen open_clip ``CLIP`` or ``CustomTextCLIP`` with a causal, EOT-pooled text tower.
        tokenizer: the model's tokenizer (``list[str] -> LongTensor (n, context_length)``).
        classnames: class names (``_`` is written as a space).
        n_ctx: number of context vectors (token positions ``1 .. n_ctx``).
        depth: prompt depth; 1 is shallow (CoOp), ProText uses 9. At most the number of blocks.
        ctx_init: init phrase; used when ``n_ctx <= 4``, its first ``n_ctx`` token embeddings start
            the context. Otherwise the context is ``N(0, 0.02²)`` and the prompt reads ``X X … X``.
        template: the class part of the prompt with ``{}`` for the name, e.g. ``"{}."`` or
            ``"a photo of a {}, a type of pet."``; a leading copy of ``ctx_init`` is dropped since
            the context takes those positions.
        replaces: the phrase the context stands in for: a template that starts with it loses it
            (``"a photo of a {}, a type of pet."`` becomes ``"X … X {}, a type of pet."``). None
            means the ``ctx_init`` phrase (also when ``n_ctx > 4`` leaves it unused); ``""`` drops
            nothing. Saved in checkpoints, so evaluation builds the prompts training meant.

    Only ``ctx`` and ``deep_prompts`` are parameters; the CLIP model is borrowed, not registered, so
    ``encoder.parameters()`` is exactly what an optimiser should take.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        classnames: Sequence[str],
        n_ctx: int = 4,
        depth: int = 9,
        ctx_init: Optional[str] = DEFAULT_CTX_INIT,
        template: str = "{}.",
        replaces: Optional[str] = None,
    ) -> None:
        super().__init__()
        tower = text_tower(model)
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}.")
        if not 1 <= depth <= tower.depth:
            raise ValueError(f"prompt depth {depth} is outside 1..{tower.depth}, the text tower's block count.")
        object.__setattr__(self, "clip", model)  # borrowed: keep CLIP out of parameters() and state_dict()
        object.__setattr__(self, "tower", tower)
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.depth = depth
        self.width = tower.width
        device = tower.token_embedding.weight.device

        phrase = " ".join(ctx_init.replace("_", " ").split()) if ctx_init else ""
        self.uses_init = bool(phrase) and n_ctx <= MAX_INIT_CTX
        if self.uses_init:
            init_ids = self._phrase_ids(phrase)
            if len(init_ids) < n_ctx:
                raise ValueError(f"ctx_init '{phrase}' has {len(init_ids)} tokens, fewer than n_ctx={n_ctx}.")
            with torch.no_grad():
                ctx = tower.token_embedding(init_ids[:n_ctx].to(device)).float().clone()
            self.prefix = phrase
        else:
            ctx = torch.randn(n_ctx, self.width, device=device) * 0.02
            self.prefix = " ".join(["X"] * n_ctx)
        self.ctx_init = phrase if self.uses_init else None
        # dropped from templates in both init modes: the context takes that phrase's place
        self.replaces = phrase if replaces is None else " ".join(replaces.split())
        self.ctx = nn.Parameter(ctx)
        if depth > 1:
            self.deep_prompts = nn.Parameter(torch.randn(depth - 1, n_ctx, self.width, device=device) * 0.02)
        else:
            self.deep_prompts = None
        self.set_classnames(classnames, template)

    def _phrase_ids(self, phrase: str) -> torch.Tensor:
        ids = self.tokenizer([phrase])[0]
        return ids[1 : int(eot_positions(ids[None])[0])]

    def set_classnames(self, classnames: Sequence[str], template: Optional[str] = None) -> None:
        """Re-tokenise for another class list (and template), keeping the learned prompts."""
        if template is not None:
            if "{}" not in template:
                raise ValueError(f"template '{template}' has no '{{}}' for the class name.")
            self.template = template
        if len(classnames) == 0:
            raise ValueError("no class names given.")
        body = _strip_prefix(self.template, self.replaces)
        self.classnames = list(classnames)
        self.prompts = [f"{self.prefix} {body.format(clean_classname(c))}" for c in self.classnames]
        tokens = self.tokenizer(self.prompts).to(self.ctx.device)
        eot = eot_positions(tokens)
        if int(eot.min()) <= self.n_ctx:
            raise ValueError("a prompt is too short to hold the context; check the template.")
        if bool((eot == tokens.shape[1] - 1).any()):
            worst = self.prompts[int(eot.argmax())]
            raise ValueError(f"a class prompt fills the {tokens.shape[1]}-token context and was truncated: '{worst[:80]}…'")
        # non-persistent buffers: they follow .to(device) but stay out of state_dict (they depend on the class list)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot, persistent=False)

    def forward(
        self,
        class_indices: Optional[torch.Tensor] = None,
        truncate: bool = True,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Text features (n, embed_dim) of all classes, or of ``class_indices`` only.

        ``truncate`` runs the tower only up to the longest EOT of the requested prompts; the causal
        mask makes this exact (tested), and it is several times faster for short prompts.
        """
        tokens, eot = self.tokens, self.eot
        if class_indices is not None:
            tokens, eot = tokens[class_indices], eot[class_indices]
        if truncate:
            tokens = tokens[:, : int(eot.max()) + 1]
        tower: TextTower = self.tower
        with torch.no_grad():
            emb = tower.embed(tokens)
        x = splice_context(emb, self.ctx, self.n_ctx)

        inject = None
        if self.deep_prompts is not None:

            def inject(block: int, h: torch.Tensor) -> torch.Tensor:
                if block >= self.depth:
                    return h
                return splice_context(h, self.deep_prompts[block - 1], self.n_ctx)

        features = tower.run(x, eot, inject)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the learned vectors: ``ctx`` and, for depth > 1, ``deep_prompts``."""
        state = {"ctx": self.ctx.detach().clone()}
        if self.deep_prompts is not None:
            state["deep_prompts"] = self.deep_prompts.detach().clone()
        return state

    def load_prompt_state(self, state: Mapping[str, torch.Tensor], require_deep: bool = True) -> None:
        """Copy saved prompts in, checking every shape; a mismatch names both shapes.

        ``require_deep=False`` accepts a context-only state (a CoOp checkpoint): the deep prompts
        then keep their current values.
        """
        if "ctx" not in state:
            raise PromptShapeError("saved prompts have no 'ctx' tensor.")
        ctx = state["ctx"]
        if ctx.ndim != 2 or ctx.shape[1] != self.width:
            raise PromptShapeError(
                f"saved context has width {ctx.shape[-1]} but this model's text tower has width {self.width} "
                "(prompts were learned for another CLIP architecture)."
            )
        if ctx.shape[0] != self.n_ctx:
            raise PromptShapeError(f"saved context has n_ctx={ctx.shape[0]} but this encoder has n_ctx={self.n_ctx}.")
        deep = state.get("deep_prompts")
        expected = (self.depth - 1, self.n_ctx, self.width)
        if deep is None:
            if self.deep_prompts is not None and require_deep:
                raise PromptShapeError(f"saved prompts are shallow (depth 1) but this encoder has depth {self.depth}.")
        elif self.deep_prompts is None or tuple(deep.shape) != expected:
            raise PromptShapeError(
                f"saved deep prompts have shape {tuple(deep.shape)} (depth {deep.shape[0] + 1}) but this encoder "
                f"has depth {self.depth} with width {self.width}."
            )
        with torch.no_grad():  # copy_ casts to the parameter's dtype and device
            self.ctx.copy_(ctx)
            if deep is not None:
                self.deep_prompts.copy_(deep)
