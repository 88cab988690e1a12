"""ZERO (Farina et al., NeurIPS'24): votes of the confident views at zero temperature (TTA.md §1).

No backward pass and no text work per image: the class features are computed once per dataset. Per
image, the views are ranked by the entropy of ``softmax(scale · cos)``, the ``⌊n · 0.3⌋`` most
confident vote for their arg-max class, and the most voted class wins.

Ties (several classes with the top count) are broken by walking the discarded views in ascending
entropy order and taking the first whose arg-max is a tied class; if none is, the tied class with
the largest cosine in the first discarded view wins (protext masks the non-tied classes properly;
the published fallback applies a bitwise NOT to an index tensor, which masks the wrong classes).
The winner's count is raised by one, so a top-5 read from the votes agrees with the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..templates import ENSEMBLE_TEMPLATES  # noqa: F401  (re-exported: ZERO+Ensemble's templates)
from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch, cosines
from .selection import confidence_order, n_confident

__all__ = ["ENSEMBLE_TEMPLATES", "FP16_VOTE_SCALE", "PUBLISHED_SEED", "ZeroAdapter", "ZeroVotes", "zero_votes"]


PUBLISHED_SEED = 1
"""ZERO's published default seed (TTA.md §1; its tables report 3 seeds). In protext it seeds the
per-image view streams (keyed by seed and image index), not the published code's global torch RNG,
so the same seed gives other random views than the published run."""

FP16_VOTE_SCALE = 1024.0
"""``1/ε`` of the published fp16 runs (ε = 2⁻¹⁰): their votes are ``softmax(1024 · fp16(cos))``."""


@dataclass
class ZeroVotes:
    """ZERO's decision on one image.

    Attributes:
        votes: per-class vote totals of the kept views, the winner's raised by one (n_classes,).
        prediction: the winning class.
        kept: indices of the voting views, most confident first.
        tie_broken_by: ``None`` without a tie; else the discarded view that broke it, or ``-1``
            when the fallback (largest cosine of the first discarded view) decided.
    """

    votes: torch.Tensor
    prediction: int
    kept: torch.Tensor
    tie_broken_by: int | None


def _vote_counts(cos: torch.Tensor, kept: torch.Tensor, votes: str) -> torch.Tensor:
    if votes == "hard":
        winners = cos[kept].argmax(dim=-1)
        return torch.bincount(winners, minlength=cos.shape[1]).to(torch.float32)
    # fp16: the limit is not reached there, near-ties (top cosines within ~0.02) split the vote
    soft = torch.softmax(FP16_VOTE_SCALE * cos[kept].half().float(), dim=-1)
    return soft.sum(dim=0)


def zero_votes(cos: torch.Tensor, scale: float, fraction: float = 0.3, votes: str = "hard") -> ZeroVotes:
    """ZERO on one image's cosines ``cos`` (n_views, n_classes); ``scale`` is CLIP's temperature.

    ``votes`` is ``hard`` (one vote per kept view) or ``fp16`` (the published fp16 soft votes).
    """
    cos = cos.float()
    order = confidence_order(scale * cos)
    k = n_confident(cos.shape[0], fraction)
    kept, discarded = order[:k], order[k:]
    counts = _vote_counts(cos, kept, votes)
    tied = (counts == counts.max()).nonzero().flatten()
    winner, broken_by = int(tied[0]), None
    if tied.numel() > 1:
        winner, broken_by = _break_tie(cos, tied, discarded, kept)
    counts = counts.clone()
    counts[winner] += 1.0
    return ZeroVotes(counts, winner, kept, broken_by)


def _break_tie(cos: torch.Tensor, tied: torch.Tensor, discarded: torch.Tensor, kept: torch.Tensor) -> tuple[int, int]:
    """(winner, deciding view or -1 for the fallback) among the ``tied`` classes."""
    tied_set = set(tied.tolist())
    for view in discarded.tolist():
        choice = int(cos[view].argmax())
        if choice in tied_set:
            return choice, view
    # fallback: the first discarded view's largest cosine among the tied classes only; with no
    # discarded view at all (every view kept), the most confident kept view decides instead
    reference = discarded[0] if discarded.numel() else kept[0]
    return int(tied[cos[reference, tied].argmax()]), -1


class ZeroAdapter(FeatureAdapter):
    """ZERO on fixed class features (C, D); episodic, no backward.

    Args:
        model: the CLIP model (its image tower encodes the views; its temperature ranks them).
        class_features: (n_classes, embed_dim), normalised when the cosines are taken.
        fraction: share of the views that vote (0.3).
        votes: ``hard`` or ``fp16``.
        image_dtype: image-encoding precision (None: the model's; fp16: autocast; bf16: a copy).
    """

    def __init__(
        self,
        model: nn.Module,
        class_features: torch.Tensor,
        fraction: float = 0.3,
        votes: str = "hard",
        image_dtype: torch.dtype | None = None,
    ) -> None:
        # not normalised here: ``cosines`` normalises both sides
        self.classes = class_features.detach().float().to(next(model.parameters()).device)
        self.scale = float(logit_scale(model))
        self.fraction = fraction
        self.votes = votes
        self.image_encoder = ImageEncoder(model, image_dtype)

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("vote"):
            # the image encoder returns features on the model's device, where the classes already are
            cos = cosines(features, self.classes)
            decision = zero_votes(cos, self.scale, self.fraction, self.votes)
            # the vote share is not a probability: calibration is read from view 0's logits
            calibration = self.scale * cos[0]
        return AdaptResult(decision.votes.cpu(), calibration.cpu(), watch.timings)
