"""TPS (Sui et al., "Just Shift It: Test-Time Prototype Shifting"), exactly as TTA2.md §10 states it.

For every test image, independently: start from zero per-class shifts ``s`` (C × D), score the
views against ``t_c = norm(norm(P_c) + s_c)``, keep the ``⌊n · 0.1⌋`` views of lowest entropy, take
one AdamW step on ``s`` that lowers the entropy of their mean prediction, and predict from view 0
with the shifted prototypes [tps shift_classification.py:41-63, 225-261; model/learnable_shift.py:202-247;
model/shifter.py:36-76]. No text encoder runs at test time and nothing is back-propagated into the
image tower (the view features are constants), so TPS is a :class:`FeatureAdapter`: it can share
one encoding of each image's views with ZERO, TDA and MTA.

The published prototypes (``--with_concepts --with_templates``, "micro" pooling) are
``P_c = (a_c + d_c) / 2``: ``a_c`` the mean of the normalised embeddings of the 80 CLIP ImageNet
templates, ``d_c`` the mean of the normalised embeddings of ``"{c}, " + sentence(descriptor)`` over
the class's GPT-4 descriptors, neither re-normalised [tps model/learnable_shift.py:62-83;
utils/save_concepts.py:52-61, 110-125]; :func:`descriptor_sentence` and
:func:`prototypes_from_parts` build them. Any class features can be the prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..amp import autocast, make_scaler
from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch
from .selection import marginal_entropy, select_confident

__all__ = ["AMP_INIT_SCALE", "TPSAdapter", "TPSOutput", "descriptor_sentence", "prototypes_from_parts", "shifted_prototypes"]

AMP_INIT_SCALE = 1000.0
"""The published ``GradScaler(init_scale=1e3)`` [tps shift_classification.py:177-185]."""

_WHICH = ("has", "often", "typically", "may", "can")
"""Descriptor starts that take a bare ``which`` [tps utils/save_concepts.py:55-56]."""


def descriptor_sentence(classname: str, descriptor: str) -> str:
    """The text TPS encodes for one GPT-4 descriptor: ``"{classname}, " + sentence(descriptor)``.

    ``sentence`` [tps utils/save_concepts.py:52-61, 116], tested in this order on the raw string
    (case-sensitive prefixes, so "antlers" counts as starting with "a" and "Has" does not match):
    ``which is d`` if ``d`` starts with ``a``; ``which d`` if it starts with has / often / typically /
    may / can; ``which is d`` if it starts with ``used``; else ``which has d``.
    """
    if descriptor.startswith("a"):
        sentence = f"which is {descriptor}"
    elif descriptor.startswith(_WHICH):
        sentence = f"which {descriptor}"
    elif descriptor.startswith("used"):
        sentence = f"which is {descriptor}"
    else:
        sentence = f"which has {descriptor}"
    return f"{classname}, {sentence}"


def prototypes_from_parts(template_mean: torch.Tensor, descriptor_mean: torch.Tensor) -> torch.Tensor:
    """The published prototypes ``P = (a + d) / 2`` ("micro" pooling), not re-normalised.

    Args:
        template_mean: ``a`` (C, D), per class the mean of the normalised template embeddings.
        descriptor_mean: ``d`` (C, D), per class the mean of the normalised descriptor-sentence embeddings.

    [tps model/learnable_shift.py:62-83]: ``--macro_pooling`` (weighting by 80 templates against the
    number of descriptors) is not the published configuration and is not offered.
    """
    if template_mean.shape != descriptor_mean.shape or template_mean.ndim != 2:
        raise ValueError(
            "template and descriptor means must both be (n_classes, dim), got "
            f"{tuple(template_mean.shape)} and {tuple(descriptor_mean.shape)}."
        )
    return (template_mean + descriptor_mean) / 2


def shifted_prototypes(normalised: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``t_c = norm(norm(P_c) + s_c)``: the shift is added to the already normalised prototype
    [tps model/learnable_shift.py:226-247; model/shifter.py:36-76]."""
    return F.normalize(normalised + shift, dim=-1)


@dataclass
class TPSOutput:
    """What shifting on one image produced.

    Attributes:
        logits: view 0's logits under the shifted prototypes, fp32 on the CPU, (n_classes,).
        shift: the shifts ``s`` after the last step, fp32 on the CPU, (n_classes, dim).
        selected: per step, the indices of the views kept (lowest entropy first); chosen again at
            every step, as published.
        losses: the marginal entropy before each step.
        scales: with ``fp16``, the gradient scaler's scale (before, after) each step: ``(1000.0,
            500.0)`` is a step skipped because a gradient overflowed; empty in fp32.
        timings: seconds per phase (``shift``, ``predict``).
    """

    logits: torch.Tensor
    shift: torch.Tensor
    selected: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    scales: list[tuple[float, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class TPSAdapter(FeatureAdapter):
    """TPS on fixed prototypes (C, D); episodic: the shifts start at zero for every image.

    Args:
        model: the CLIP model (image tower and temperature ``exp(logit_scale)``).
        prototypes: the class prototypes ``P`` (C, D), any norm (normalised here, per class).
        lr: AdamW learning rate; every other AdamW setting is PyTorch's default [tps
            shift_classification.py:177-185].
        fraction: share of the views kept by confidence selection (``--selection_p 0.1``).
        steps: AdamW steps per image (``--tta_steps 1``); 0 is zero-shot on the prototypes.
        fp16: the published mixed precision: the forward under fp16 autocast and a fresh
            ``GradScaler(init_scale=1000)`` per image (a step with an inf/NaN gradient is skipped);
            on a CPU the same path, emulated (:mod:`protext.amp`). Images are encoded under fp16
            autocast too. The published script makes one scaler per dataset and keeps it across
            images [tps shift_classification.py:177-185], so after an overflow its later images
            start at a halved scale; here, as in TPT, no image depends on the images before it.
        image_dtype: image-encoding precision when ``fp16`` is off (see :class:`ImageEncoder`).
    """

    def __init__(
        self,
        model: nn.Module,
        prototypes: torch.Tensor,
        *,
        lr: float = 5e-3,
        fraction: float = 0.1,
        steps: int = 1,
        fp16: bool = False,
        image_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if prototypes.ndim != 2:
            raise ValueError(f"prototypes must be (n_classes, dim), got shape {tuple(prototypes.shape)}.")
        if not lr > 0:
            raise ValueError(f"TPS lr must be positive, got {lr}.")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"TPS selection fraction must be in (0, 1], got {fraction}.")
        if steps < 0:
            raise ValueError(f"TPS steps must be >= 0, got {steps}.")
        self.device = next(model.parameters()).device
        # norm(P_c), fp32 (the shifts are fp32 too) [tps model/learnable_shift.py:226-247]
        self.prototypes = F.normalize(prototypes.detach().float(), dim=-1).to(self.device)
        self.scale = logit_scale(model).to(self.device)
        self.lr, self.fraction, self.steps, self.fp16 = lr, fraction, steps, fp16
        self.image_encoder = ImageEncoder(model, torch.float16 if fp16 else image_dtype)

    # ------------------------------------------------------------------ one image

    def _logits(self, features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``z_v = scale · t · f_v`` for every row of ``features`` (or for one feature vector), under
        autocast when ``fp16``; the scale multiplies the prototypes before the matmul, as published
        [tps model/learnable_shift.py:226-247]."""
        with autocast(self.device, torch.float16 if self.fp16 else None):
            text = shifted_prototypes(self.prototypes, shift)
            return features @ (self.scale * text).t()

    def tune(self, features: torch.Tensor) -> TPSOutput:
        """Shift the prototypes on one image's normalised view features (n_views, D), view 0 first,
        and predict from view 0. Nothing carries over to the next image."""
        if features.ndim != 2 or features.shape[1] != self.prototypes.shape[1]:
            raise ValueError(
                f"view features must be (n_views, {self.prototypes.shape[1]}), got shape {tuple(features.shape)}."
            )
        features = features.to(self.device).float()
        watch = Stopwatch()
        # reset: s = 0 and a fresh AdamW (the published code reloads its initial state) and scaler
        # [tps shift_classification.py:243-248]
        shift = torch.zeros_like(self.prototypes, requires_grad=True)
        optimiser = torch.optim.AdamW([shift], lr=self.lr)
        scaler = make_scaler(self.device, AMP_INIT_SCALE) if self.fp16 else None
        selected: list[torch.Tensor] = []
        losses: list[float] = []
        scales: list[tuple[float, float]] = []
        for _ in range(self.steps):
            with watch("shift"):
                # selection and loss anew at every step [tps shift_classification.py:41-49]
                optimiser.zero_grad()
                logits = self._logits(features, shift)
                kept = select_confident(logits, self.fraction)
                loss = marginal_entropy(logits[kept])
                if scaler is None:
                    loss.backward()
                    optimiser.step()
                else:
                    scaler.scale(loss).backward()
                    before = scaler.get_scale()
                    scaler.step(optimiser)  # unscales; skipped when a gradient is not finite
                    scaler.update()
                    scales.append((before, scaler.get_scale()))
                selected.append(kept.cpu())
                losses.append(float(loss.detach()))
        with watch("predict"), torch.no_grad():
            # view 0 under the tuned shifts [tps shift_classification.py:253-258]
            logits = self._logits(features[0], shift).float().cpu()
        return TPSOutput(logits, shift.detach().float().cpu(), selected, losses, scales, watch.timings)

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        out = self.tune(features)
        return AdaptResult(out.logits, out.logits, out.timings)
