"""Class text features for zero-shot classification, and the logits they give (ALGORITHMS.md §4).

Four ways to describe a class to CLIP's text tower:

* ``clip``: one template, ``norm(encode_text("a photo of a {class}."))``;
* ``cupl``: an ensemble of LLM descriptions, ``norm(mean_k norm(encode_text(description_k)))``;
* ``prompts``: learned context (and deep prompts) from a checkpoint, through
  :class:`~protext.prompts.PromptedTextEncoder`;
* a template ensemble (``ensemble``: ZERO's seven, ``ensemble80``: CLIP's 80 ImageNet templates),
  ``norm(mean_k norm(encode_text(template_k(class))))``.

Every function returns L2-normalised fp32 features of shape ``(n_classes, embed_dim)`` in class
order. Text is encoded in batches sorted by length and cut at each batch's longest end-of-text
token, which the causal mask makes exact (ALGORITHMS.md §3).
"""

from __future__ import annotations

import copy
from typing import Callable, ContextManager, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .amp import autocast
from .descriptions import match_classnames
from .errors import UserError
from .flops import counted_as
from .prompts import PromptedTextEncoder, clean_classname
from .text_tower import encode_tokens, eot_positions

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_TOKEN_BUDGET = 8192
"""Tokens (rows × padded length) per text batch: bounds activation memory without slowing down."""

METHODS = ("clip", "cupl", "prompts")


class ZeroShotError(UserError, ValueError):
    """The inputs cannot describe every class (missing descriptions, a bad template, ...)."""


def length_chunks(eot: torch.Tensor, token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[torch.Tensor]:
    """Split sequence indices into batches of similar length, each within ``token_budget`` tokens.

    Sequences are sorted by end-of-text position (stable, so ties keep their order) and cut into
    consecutive runs whose padded size ``rows × (longest EOT + 1)`` stays within the budget. Each
    batch is then run only up to its own longest EOT, so short names do not pay for long ones.

    Returns a list of index tensors (on ``eot``'s device) that together cover every index once.

    Zero-shot class features (:func:`encode_texts`, :func:`prompt_features`) and the prompt tuners
    (TPT and its batched form) batch with it. Description targets use
    :func:`protext.text_tower.encode_in_length_batches`, which visits rows in the same sorted order
    but cuts it every ``batch_size`` rows.
    """
    if eot.numel() == 0:
        return []
    lengths = eot.to("cpu") + 1
    order = torch.sort(lengths, stable=True).indices
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        length = int(lengths[index])
        # sorted ascending, so the newcomer is the longest of the batch it joins
        if current and (len(current) + 1) * max(longest, length) > token_budget:
            chunks.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    chunks.append(current)
    return [torch.tensor(c, dtype=torch.long, device=eot.device) for c in chunks]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    return autocast(device, dtype)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    texts: Sequence[str],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """Plain CLIP features of ``texts`` (``model.encode_text``, unnormalised fp32), batched by length.

    Texts longer than the context are truncated by the tokenizer, which keeps EOT last.
    """
    device = _model_device(model)
    tokens = tokenizer(list(texts)).to(device)
    out: Optional[torch.Tensor] = None
    for chunk in length_chunks(eot_positions(tokens), token_budget):
        feats = encode_tokens(model, tokens[chunk], truncate=True).float()
        if out is None:
            out = feats.new_empty(len(texts), feats.shape[1])
        out[chunk] = feats
    if out is None:
        raise ZeroShotError("no texts to encode.")
    return out


def clip_text_features(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """``norm(encode_text(template.format(name)))`` per class (names written with ``_`` as spaces)."""
    if "{}" not in template:
        raise ZeroShotError(f"--template '{template}' has no '{{}}' where the class name goes.")
    prompts = [template.format(clean_classname(name)) for name in classnames]
    return F.normalize(encode_texts(model, tokenizer, prompts, token_budget), dim=-1)


def cupl_text_features(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
    source: str = "the description file",
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """CuPL ensemble: ``norm(mean_k norm(encode_text(description_k)))`` per class.

    Class names are matched to the description keys case-insensitively with ``_`` as a space
    (:func:`protext.descriptions.match_classnames`). All descriptions of all classes are encoded
    together in length-sorted batches.

    Raises:
        ZeroShotError: some classes have no descriptions; the message lists them and the unused
            keys of ``source`` (often the same classes spelled differently).
    """
    match = match_classnames(descriptions.keys(), classnames)
    empty = [name for name, key in match.mapping.items() if not descriptions[key]]
    if match.missing or empty:
        lacking = match.missing + empty
        shown = ", ".join(repr(n) for n in lacking[:10]) + (f", … ({len(lacking)} in all)" if len(lacking) > 10 else "")
        hint = ""
        if match.unused:
            unused = ", ".join(repr(k) for k in match.unused[:10]) + (" …" if len(match.unused) > 10 else "")
            hint = f" Keys in {source} that match no class: {unused}."
        raise ZeroShotError(
            f"{source} has no descriptions for {len(lacking)} of {len(classnames)} classes: {shown}.{hint} "
            "Every class needs at least one description; regenerate or re-key the descriptions."
        )
    texts: list[str] = []
    owner: list[int] = []
    for label, name in enumerate(classnames):
        for text in descriptions[match.mapping[name]]:
            texts.append(text)
            owner.append(label)
    per_text = F.normalize(encode_texts(model, tokenizer, texts, token_budget), dim=-1)
    owner_t = torch.tensor(owner, device=per_text.device)
    sums = per_text.new_zeros(len(classnames), per_text.shape[1]).index_add_(0, owner_t, per_text)
    counts = torch.bincount(owner_t, minlength=len(classnames)).to(per_text.dtype)
    return F.normalize(sums / counts[:, None], dim=-1)


def ensemble_text_features(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """Template ensemble: ``norm(mean_k norm(encode_text(template_k(name))))`` per class.

    Every (class, template) sentence is encoded in one length-sorted pass; names are written with
    ``_`` as spaces. This is how CLIP, ZERO+Ensemble and TDA build ensemble class features.

    Raises:
        ZeroShotError: no templates, or a template without ``{}``.
    """
    if not templates:
        raise ZeroShotError("a template ensemble needs at least one template.")
    for template in templates:
        if "{}" not in template:
            raise ZeroShotError(f"ensemble template '{template}' has no '{{}}' where the class name goes.")
    texts = [template.format(clean_classname(name)) for name in classnames for template in templates]
    per_text = F.normalize(encode_texts(model, tokenizer, texts, token_budget), dim=-1)
    per_class = per_text.reshape(len(classnames), len(templates), per_text.shape[1]).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def template_ensemble_features(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    name: str,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """:func:`ensemble_text_features` over a named ensemble of :data:`protext.templates.TEMPLATE_ENSEMBLES`
    (``ensemble``: ZERO's seven templates; ``ensemble80``: CLIP's 80 ImageNet templates)."""
    from .templates import ensemble_templates

    return ensemble_text_features(model, tokenizer, classnames, ensemble_templates(name), token_budget)


def prompt_features(
    encoder: PromptedTextEncoder,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    normalize: bool = True,
) -> torch.Tensor:
    """Features of every class prompt of ``encoder``, batched by length; keeps the autograd graph
    only if called with gradients enabled (use :func:`torch.no_grad` for inference)."""
    out: Optional[torch.Tensor] = None
    for chunk in length_chunks(encoder.eot, token_budget):
        feats = encoder(chunk, truncate=True)
        if out is None:
            out = feats.new_zeros(encoder.tokens.shape[0], feats.shape[1])
        out = out.index_copy(0, chunk, feats)
    assert out is not None  # an encoder always has at least one class
    return F.normalize(out, dim=-1) if normalize else out


@torch.no_grad()
def prompt_text_features(encoder: PromptedTextEncoder, token_budget: int = DEFAULT_TOKEN_BUDGET) -> torch.Tensor:
    """Normalised fp32 class features from learned prompts (no gradient)."""
    return prompt_features(encoder, token_budget).float()


@torch.no_grad()
def encode_images(
    model: nn.Module,
    images: torch.Tensor,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``norm(model.encode_image(images))`` in fp32; ``autocast_dtype`` (bf16/fp16) speeds it up."""
    device = _model_device(model)
    with _autocast(device, autocast_dtype):
        feats = model.encode_image(images.to(device, non_blocking=True))
    return F.normalize(feats.float(), dim=-1)


class ImageEncoder:
    """Normalised fp32 image features in the precision asked for.

    * ``None``/fp32: the model as it is;
    * fp16: autocast (the published mixed precision on GPU);
    * bf16: a bfloat16 *copy* of the image tower. On the CPU, autocast re-casts every weight and
      activation on every call and ends up slower than fp32, while a converted tower runs ~3-5x
      faster on CPUs with bf16 instructions (measured in ``benchmarks/bench_tpt.py``). The copy
      costs 2 bytes per image-tower parameter; the text tower and the prompts stay fp32.
    """

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
        self.model = model
        self.dtype = None if dtype == torch.float32 else dtype
        self.visual: Optional[nn.Module] = None
        if self.dtype == torch.bfloat16:
            self.visual = copy.deepcopy(model.visual).to(torch.bfloat16).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from .feature_memo import active_memo

        memo = active_memo()
        if memo is not None:  # inside remember_image_features(): the same bytes are encoded once
            return memo.features(self.model, str(self.dtype), images, self._encode)
        return self._encode(images)

    @counted_as("image_tower")  # every image encoding of every method goes through here
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.visual is None:
            return encode_images(self.model, images, autocast_dtype=self.dtype)
        device = _model_device(self.visual)
        feats = self.visual(images.to(device, dtype=torch.bfloat16, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)


def logit_scale(model: nn.Module) -> torch.Tensor:
    """CLIP's temperature ``exp(logit_scale)`` as a detached fp32 scalar."""
    return model.logit_scale.detach().float().exp()


def zeroshot_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``scale · norm(image) @ norm(text)ᵀ``: (n_images, n_classes). Inputs are normalised here too,
    so unnormalised features are fine."""
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
