"""MTA (Zanella & Ben Ayed, CVPR'24): a MeanShift mode of the view features, weighted by inlierness (TTA.md §4).

Per image, no backward and no text work: each view gets a Gaussian kernel whose bandwidth comes
from its nearest other views; inlierness scores ``y`` (a softmax over views that favours views near
the mode and views whose predictions agree) and the mode ``m`` are updated in turn, five outer
rounds of up to five inner iterations each; the prediction is the mode's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch
from .published import NEIGHBOURS, fewest_views_with_a_neighbour, neighbour_count

__all__ = ["MTAAdapter", "MTAMode", "MTA_SETTINGS", "fewest_views_with_a_neighbour", "mta_mode", "neighbour_count", "view_bandwidths"]


@dataclass(frozen=True)
class MTASettings:
    """The published constants: neighbour share 0.3, λ_y 0.2, λ_q 4, 5 × 5 iterations, 1e-6 stops."""

    neighbours: float = NEIGHBOURS
    lambda_y: float = 0.2
    lambda_q: float = 4.0
    outer: int = 5
    inner: int = 5
    tolerance: float = 1e-6


MTA_SETTINGS = MTASettings()


@dataclass
class MTAMode:
    """The mode ``m`` (D,), the final inlierness ``y`` (n_views,), and how many inner iterations
    each outer round ran (``(inlierness, mode)`` per round, for the tests)."""

    mode: torch.Tensor
    inlierness: torch.Tensor
    iterations: list[tuple[int, int]]


def view_bandwidths(features: torch.Tensor, share: float = 0.3) -> torch.Tensor:
    """``h_v = sqrt(0.5 · mean d²)`` over the ``⌊share · (n − 1)⌋`` nearest other views (Euclidean)."""
    n = features.shape[0]
    k = neighbour_count(n, share)
    if k < 1:  # a mean over no neighbour is NaN, and so would be every logit after it
        raise ValueError(
            f"MTA's bandwidth needs at least one neighbour: {n} views with share {share} give none "
            f"(use {fewest_views_with_a_neighbour(share)} or more)."
        )
    squared = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    # a view is not its own neighbour: the diagonal goes last instead of first
    squared.fill_diagonal_(math.inf)
    nearest = torch.sort(squared, dim=1).values[:, :k]
    return torch.sqrt(0.5 * nearest.mean(dim=1))


def _kernel(features: torch.Tensor, mode: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((features - mode) ** 2).sum(-1) / (2 * bandwidth**2))


def mta_mode(features: torch.Tensor, logits: torch.Tensor, settings: MTASettings = MTA_SETTINGS) -> MTAMode:
    """MTA's mode of one image's normalised view features (n, D) given their logits (n, C).

    Computed in fp64: the early stops compare changes with 1e-6, about the size of fp32 rounding
    noise on unit vectors, so in fp32 the iteration count would depend on summation order. The
    returned mode is fp32.
    """
    features = features.double()
    n = features.shape[0]
    if n == 1:  # nothing to shift towards: the image itself
        return MTAMode(features[0].float(), torch.ones(1, device=features.device), [])
    bandwidth = view_bandwidths(features, settings.neighbours)
    probs = logits.double().softmax(-1)
    affinity = probs @ probs.t()
    y = torch.full_like(bandwidth, 1.0 / n)  # fp64, one per view, on the features' device
    mode = features[0]
    rounds: list[tuple[int, int]] = []
    for _ in range(settings.outer):
        kernel = _kernel(features, mode, bandwidth)  # fixed while the inlierness settles
        for used_y in range(1, settings.inner + 1):
            old = y
            y = torch.softmax((kernel + settings.lambda_q * affinity @ y) / settings.lambda_y, dim=0)
            if torch.linalg.norm(y - old) < settings.tolerance:
                break
        for used_m in range(1, settings.inner + 1):
            old = mode
            weights = _kernel(features, mode, bandwidth) * y
            mode = F.normalize((weights[:, None] * features).sum(0) / weights.sum(), dim=-1)
            if torch.linalg.norm(mode - old) < settings.tolerance:
                break
        rounds.append((used_y, used_m))
    return MTAMode(mode.float(), y.float(), rounds)


class MTAAdapter(FeatureAdapter):
    """MTA on fixed class features (C, D); episodic, no backward, no selection."""

    def __init__(self, model: nn.Module, class_features: torch.Tensor, image_dtype: torch.dtype | None = None) -> None:
        device = next(model.parameters()).device
        self.classes = F.normalize(class_features.detach().float(), dim=-1).to(device)
        self.scale = float(logit_scale(model))
        self.image_encoder = ImageEncoder(model, image_dtype)

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("meanshift"):
            logits = self.scale * features.float() @ self.classes.t()
            found = mta_mode(features, logits)
            final = (self.scale * found.mode @ self.classes.t()).cpu()
        return AdaptResult(final, final, watch.timings)
