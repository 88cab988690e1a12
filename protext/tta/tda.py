"""TDA (Karmanov et al., CVPR'24): a training-free dynamic cache over the test stream (TTA.md §3).

Online: every image first updates a positive cache (≤ 3 low-entropy features per predicted class)
and, when its normalised entropy lies in the band ``0.2 < h < 0.5``, a negative cache (≤ 2 per
class, with the sample's probabilities); its prediction then adds the positive cache's affinity
to its class and subtracts the negative cache's from the classes it was unsure about. The result
depends on the order of the stream; ``state_dict`` saves the caches so a stream can resume.

The cache sizes 3 and 2 are TDA's published ones; OGA's runs use 5 and 3 (TTA2.md §11.1), so the
adapter takes them as ``positive_shots``/``negative_shots``. The two halves of an image's step are
also offered apart, :meth:`TDAAdapter.observe` (the caches take the image) and
:meth:`TDAAdapter.predict` (the read-out with the caches as they are), for OGA's batch rule: a
whole batch is observed before any of its images is predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch
from .published import TDA_NEGATIVE
from .selection import marginal_entropy, select_confident

__all__ = ["CacheEntry", "Observation", "TDAAdapter", "TDACache", "observe"]

POSITIVE_SHOTS = 3
"""Entries per class of the positive cache, as published (TDA's default; OGA runs 5)."""
NEGATIVE_SHOTS = 2
"""Entries per class of the negative cache, as published (TDA's default; OGA runs 3)."""
NEGATIVE_BAND = (0.2, 0.5)
"""``h = H / log₂ C`` must lie strictly inside this band for the negative cache (as published)."""
NEGATIVE_MASK = (0.03, 1.0)
"""A cached probability marks its class for the negative logits when strictly inside this range."""


@dataclass
class Observation:
    """What TDA reads from one image: feature ``f``, logits ``z``, probabilities ``p``, entropy ``H`` (nats)."""

    feature: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    entropy: float

    @property
    def prediction(self) -> int:
        return int(self.logits.argmax())


@dataclass
class CacheEntry:
    feature: torch.Tensor
    entropy: float
    probs: Optional[torch.Tensor] = None


def observe(image_features: torch.Tensor, class_features: torch.Tensor, scale: float, fraction: float) -> Observation:
    """TDA's view of one image from its normalised view features (n_views, D) (TTA.md §3.1).

    The ``⌊n · fraction⌋`` views (at least one) of lowest entropy: ``f`` the mean of their
    (normalised, not re-normalised) features, ``z`` and ``p`` the means of their logits and
    softmaxes, ``H`` TPT's marginal entropy. One view needs no branch of its own: the means of one
    row are that row, bit for bit, and the marginal entropy of one row is its entropy, so this is
    ``f = f_0``, ``z = scale·f_0·tᵀ``, ``p = softmax(z)``, ``H`` its entropy.
    """
    logits = scale * image_features.float() @ class_features.float().t()
    kept = select_confident(logits, fraction)
    chosen = logits[kept]
    return Observation(
        image_features[kept].float().mean(0), chosen.mean(0), chosen.softmax(-1).mean(0), float(marginal_entropy(chosen))
    )


class TDACache:
    """Per-class lists of at most ``shots`` entries, kept sorted by entropy (lowest first)."""

    def __init__(self, shots: int) -> None:
        self.shots = shots
        self.entries: dict[int, list[CacheEntry]] = {}

    def update(self, label: int, entry: CacheEntry) -> None:
        """Append while there is room, else replace the worst entry if the new one is better; re-sort."""
        items = self.entries.setdefault(label, [])
        if len(items) < self.shots:
            items.append(entry)
        elif entry.entropy < items[-1].entropy:
            items[-1] = entry
        items.sort(key=lambda e: e.entropy)  # stable, as the published sorted()

    def __bool__(self) -> bool:
        return any(self.entries.values())

    def affinity_logits(self, feature: torch.Tensor, beta: float, values: torch.Tensor) -> torch.Tensor:
        """``Σ_j exp(−β(1 − f·k_j)) · values_j`` over the cached keys in class order."""
        keys = torch.stack([e.feature for label in sorted(self.entries) for e in self.entries[label]])
        affinity = keys.to(feature.device) @ feature
        return torch.exp(-beta * (1.0 - affinity)) @ values.to(feature.device)

    def keys_in_order(self) -> list[tuple[int, CacheEntry]]:
        return [(label, e) for label in sorted(self.entries) for e in self.entries[label]]

    def state(self) -> dict[str, Any]:
        # no list is ever empty: ``update`` creates a class's list with its first entry and ``load``
        # only restores what ``state`` saved
        out = {}
        for label, items in self.entries.items():
            out[str(label)] = {
                "features": torch.stack([e.feature.cpu() for e in items]),
                "entropy": torch.tensor([e.entropy for e in items], dtype=torch.float64),
            }
            if items[0].probs is not None:
                out[str(label)]["probs"] = torch.stack([e.probs.cpu() for e in items])
        return out

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.entries = {}
        for label, saved in state.items():
            probs = saved.get("probs")
            self.entries[int(label)] = [
                CacheEntry(saved["features"][i].to(device), float(saved["entropy"][i]), None if probs is None else probs[i].to(device))
                for i in range(saved["features"].shape[0])
            ]


class TDAAdapter(FeatureAdapter):
    """TDA on fixed class features (C, D): online, no backward.

    Args:
        model: the CLIP model (image tower and temperature).
        class_features: (n_classes, embed_dim), normalised here.
        alpha, beta: the positive cache's (α⁺, β⁺); the negative cache uses (0.117, 1.0).
        fraction: share of views kept when there are several (0.1).
        image_dtype: image-encoding precision.
        positive_shots, negative_shots: entries per class of the two caches (TDA's 3 and 2;
            OGA's 5 and 3).
    """

    online = True

    def __init__(
        self,
        model: nn.Module,
        class_features: torch.Tensor,
        alpha: float,
        beta: float,
        fraction: float = 0.1,
        image_dtype: torch.dtype | None = None,
        positive_shots: int = POSITIVE_SHOTS,
        negative_shots: int = NEGATIVE_SHOTS,
    ) -> None:
        for name, shots in (("positive_shots", positive_shots), ("negative_shots", negative_shots)):
            if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
                raise ValueError(f"TDAAdapter {name} must be a positive int, got {shots!r}")
        self.classes = F.normalize(class_features.detach().float(), dim=-1).to(next(model.parameters()).device)
        self.scale = float(logit_scale(model))
        self.alpha, self.beta = alpha, beta
        self.neg_alpha, self.neg_beta = TDA_NEGATIVE
        self.fraction = fraction
        self.image_encoder = ImageEncoder(model, image_dtype)
        self.positive = TDACache(positive_shots)
        self.negative = TDACache(negative_shots)
        self.seen = 0

    def normalised_entropy(self, entropy: float) -> float:
        """``h = H / log₂ C``: nats over bits, as published (the band's units)."""
        return entropy / math.log2(self.classes.shape[0])

    def step(self, obs: Observation) -> torch.Tensor:
        """Update the caches with ``obs`` and return its final logits (TTA.md §3.3–3.5)."""
        self.update(obs)
        return self.read(obs)

    def update(self, obs: Observation) -> None:
        """The caches take ``obs`` under its zero-shot pseudo-label (TTA.md §3.3–3.4)."""
        label = obs.prediction
        self.positive.update(label, CacheEntry(obs.feature, obs.entropy))
        h = self.normalised_entropy(obs.entropy)
        if NEGATIVE_BAND[0] < h < NEGATIVE_BAND[1]:
            self.negative.update(label, CacheEntry(obs.feature, obs.entropy, obs.probs))
        self.seen += 1

    def read(self, obs: Observation) -> torch.Tensor:
        """``obs``'s final logits from the caches as they are, which it leaves alone (TTA.md §3.5)."""
        final = obs.logits.clone()
        n_classes = self.classes.shape[0]
        if self.positive:
            labels = torch.tensor([label for label, _ in self.positive.keys_in_order()])
            onehot = F.one_hot(labels, n_classes).float()
            final = final + self.alpha * self.positive.affinity_logits(obs.feature, self.beta, onehot)
        if self.negative:
            probs = torch.stack([e.probs for _, e in self.negative.keys_in_order()])
            mask = ((probs > NEGATIVE_MASK[0]) & (probs < NEGATIVE_MASK[1])).float()
            final = final - self.neg_alpha * self.negative.affinity_logits(obs.feature, self.neg_beta, mask)
        return final

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("cache"):
            # the image encoder returns features on the model's device, where the classes already are
            obs = observe(features, self.classes, self.scale, self.fraction)
            final = self.step(obs)
        logits = final.detach().float().cpu()
        return AdaptResult(logits, logits, watch.timings)

    def observe(self, features: torch.Tensor) -> None:
        """The first half of :meth:`adapt_features`: the caches take the image (normalised view
        features (n_views, D)), nothing is predicted. ``observe(f)`` then ``predict(f)`` is
        ``adapt_features(f)``, bit for bit; OGA's batch rule observes a whole batch first."""
        self._own_split()
        self.update(observe(features, self.classes, self.scale, self.fraction))

    def predict(self, features: torch.Tensor) -> AdaptResult:
        """The second half of :meth:`adapt_features`: the image's final logits from the caches as
        they are; the caches are left alone."""
        self._own_split()
        watch = Stopwatch()
        with watch("cache"):
            final = self.read(observe(features, self.classes, self.scale, self.fraction))
        logits = final.detach().float().cpu()
        return AdaptResult(logits, logits, watch.timings)

    def _own_split(self) -> None:
        """The split is TDA's own step: a subclass with another per-image rule (BoostAdapter, whose
        cache also takes the image's boosting views) has no such halves."""
        if type(self).adapt_features is not TDAAdapter.adapt_features:
            raise TypeError(f"{type(self).__name__} adapts each image by its own rule; observe/predict split TDA's")

    def state_dict(self) -> dict[str, Any]:
        return {"positive": self.positive.state(), "negative": self.negative.state(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.classes.device
        self.positive.load(state.get("positive", {}), device)
        self.negative.load(state.get("negative", {}), device)
        self.seen = int(state.get("seen", 0))
