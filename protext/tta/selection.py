"""Confident-view selection and the entropies every TTA method shares (ALGORITHMS.md §5 steps 3–4).

TPT, C-TPT and TDA (64-view path) keep ``⌊n · 0.1⌋`` views, ZERO ``⌊n · 0.3⌋``, all by lowest
entropy of the view's softmax; TPT and C-TPT then minimise the entropy of the kept views' mean
prediction, and TDA uses that same marginal entropy as its confidence.
"""

from __future__ import annotations

import math

import torch

__all__ = ["marginal_entropy", "n_confident", "select_confident", "view_entropy"]


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax, ``H = −Σ softmax(z)·log_softmax(z)``; shape (n_views,)."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def n_confident(n_views: int, fraction: float) -> int:
    """How many views confidence selection keeps: ``int(n · fraction)`` as published, at least 1."""
    return max(1, int(n_views * fraction))


def confidence_order(logits: torch.Tensor) -> torch.Tensor:
    """Every view's index, lowest entropy first (stable: equal entropies stay in index order)."""
    return torch.sort(view_entropy(logits.detach()), stable=True).indices


def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``⌊n · fraction⌋`` views of lowest entropy, most confident first.

    The sort is stable, so views of equal entropy are taken in index order (the published
    ``argsort`` leaves ties unspecified).
    """
    return confidence_order(logits)[: n_confident(logits.shape[0], fraction)]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the averaged prediction of the rows of ``logits`` (views × classes).

    ``log p̄ = logsumexp_v(log_softmax(z_v)) − log n`` (the mean of the probabilities, in log space);
    the clamp keeps ``0 · log 0`` at zero instead of NaN for classes with underflowed probability.
    """
    logp = logits.float().log_softmax(dim=-1)
    log_mean = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()
