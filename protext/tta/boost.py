"""BoostAdapter (Zhang et al., NeurIPS'24): TDA plus each image's own confident views (TTA2.md §8).

TDA (:mod:`protext.tta.tda`, TTA.md §3) with two changes, both from the official code
[boost runner.py:119-169]:

* **Boosting samples**: before an image predicts, its ``⌊n · fraction⌋`` lowest-entropy views (view 0
  included) are inserted, most confident first, into a *temporary copy* of the positive cache whose
  capacity per class is ``3 + δ``. The copy scores this image only; the persistent positive cache
  never sees those views. With one view the boosting set is empty (``int(1 · 0.1) = 0``), so on
  ImageNet BoostAdapter is TDA with a FIFO negative cache.
* **FIFO negative cache**: an image in the entropy band is appended to its class's list and the
  oldest entry leaves once there are more than 2, where TDA keeps the 2 of lowest entropy.

Everything else is TDA's rule and reuses its code: the query observation (:func:`observe`), the
positive cache's insertion (:class:`TDACache`), the band, the mask and ``(α⁻, β⁻) = (0.117, 1.0)``.
The published run uses fp16 weights without autocast [boost runner.py:102; clip/model.py:430];
this runs fp32 unless ``image_dtype`` says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdaptResult, Stopwatch
from .selection import confidence_order, view_entropy
from .tda import NEGATIVE_BAND, NEGATIVE_MASK, POSITIVE_SHOTS, CacheEntry, Observation, TDAAdapter, TDACache, observe

__all__ = ["BoostAdapter", "FIFOCache", "QUERIES", "boosting_views", "n_boosting"]

QUERIES = ("view0", "selected")
"""How the image is summarised [boost runner.py:120-125; utils.py:88-107]: ``view0`` = view 0 alone
(the 10 cross-domain sets, and ImageNet's single view); ``selected`` = TDA's mean of the confident
views (ImageNet-A/V2/R/Sketch)."""


class FIFOCache(TDACache):
    """Per-class lists of at most ``shots`` entries in arrival order; the oldest leaves first.

    BoostAdapter's negative cache [boost runner.py:55-59, 63-64, 149-150: ``update_cache(..., True)`` sets
    ``include_prob_map`` and leaves ``fifo=True``]. Subclassing :class:`TDACache` keeps its affinity,
    key order (class, then list order) and ``state``/``load``, which save and restore list order, so
    a resumed stream drops the same entry next.
    """

    def update(self, label: int, entry: CacheEntry) -> None:
        """Append; if the class then holds more than ``shots`` entries, drop the oldest (entropy is not read)."""
        items = self.entries.setdefault(label, [])
        items.append(entry)
        if len(items) > self.shots:
            del items[0]


def n_boosting(n_views: int, fraction: float) -> int:
    """How many views boost the cache: ``int(n · fraction)`` as published [boost utils.py:34], with no
    floor of one (unlike :func:`~protext.tta.selection.n_confident`): a single view boosts nothing."""
    return int(n_views * fraction)


def boosting_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the boosting views, lowest entropy first [boost utils.py:32-36; runner.py:139].

    All views are candidates, view 0 included. The order is TDA's stable confidence order, so on the
    ``selected`` query these are exactly the views it averaged (the published ``argsort`` leaves ties
    unspecified; equal entropies are taken in index order here).
    """
    return confidence_order(logits)[: n_boosting(logits.shape[0], fraction)]


class BoostAdapter(TDAAdapter):
    """BoostAdapter on fixed class features (C, D): online, no backward.

    Args:
        model: the CLIP model (image tower and temperature).
        class_features: (n_classes, embed_dim), normalised here.
        alpha, beta: the positive cache's (α⁺, β⁺), TDA's per-dataset values; the negative cache
            uses (0.117, 1.0) [boost configs/*.yaml].
        delta: extra room per class in the temporary cache, whose capacity is ``3 + δ``
            [boost runner.py:147, reading ``cfg['delta']``; the ``--delta`` flag is unused].
        fraction: share of views kept for the ``selected`` query and for boosting (0.1 in both
            places [boost utils.py:96; runner.py:139]).
        query: ``"view0"`` or ``"selected"`` (:data:`QUERIES`).
        image_dtype: image-encoding precision.
    """

    online = True

    def __init__(
        self,
        model: nn.Module,
        class_features: torch.Tensor,
        *,
        alpha: float,
        beta: float,
        delta: int,
        fraction: float = 0.1,
        query: str = "view0",
        image_dtype: torch.dtype | None = None,
    ) -> None:
        if query not in QUERIES:
            raise ValueError(f"BoostAdapter query must be one of {QUERIES}, got {query!r}")
        if isinstance(delta, bool) or not isinstance(delta, int) or delta < 0:
            # a negative δ would let the temporary copy hold fewer entries than the persistent cache
            raise ValueError(f"BoostAdapter delta must be a non-negative int, got {delta!r}")
        super().__init__(model, class_features, alpha, beta, fraction, image_dtype)
        self.delta = delta
        self.query = query
        # the persistent positive cache is TDA's: capacity 3, entropy order [boost configs/*.yaml:3;
        # runner.py:132-136]. The negative one keeps TDA's capacity 2 and (α⁻, β⁻) = (0.117, 1.0)
        # [boost configs/*.yaml:8-10] but is FIFO [boost runner.py:149-150]
        self.negative = FIFOCache(self.negative.shots)

    @property
    def boost_shots(self) -> int:
        """The temporary cache's capacity per class, ``3 + δ`` [boost runner.py:147; configs/*.yaml:17]."""
        return POSITIVE_SHOTS + self.delta

    def boosted_cache(self, features: torch.Tensor, logits: torch.Tensor) -> TDACache:
        """A copy of the positive cache with this image's boosting views inserted (TTA2.md §8.4).

        Each boosting view ``i`` (lowest entropy first) goes to class ``argmax z_i`` with entropy
        ``H_i`` of its own softmax, by the positive cache's insertion rule at capacity ``3 + δ``
        [boost runner.py:139-147]. The lists are copied, the entries shared: no entry is ever
        modified in place, so the persistent cache is left as it was.
        """
        boosted = TDACache(self.boost_shots)
        boosted.entries = {label: list(items) for label, items in self.positive.entries.items()}
        chosen = boosting_views(logits, self.fraction)
        if chosen.numel():
            entropies = view_entropy(logits[chosen])
            labels = logits[chosen].argmax(-1)
            for j, index in enumerate(chosen.tolist()):
                boosted.update(int(labels[j]), CacheEntry(features[index].float(), float(entropies[j])))
        return boosted

    def boost_step(self, obs: Observation, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Update the persistent caches with ``obs`` and return its final logits (TTA2.md §8.3-8.6).

        ``features``/``logits`` are all the image's views (for boosting); ``obs`` is its query.
        """
        label = obs.prediction
        self.positive.update(label, CacheEntry(obs.feature, obs.entropy))  # [boost runner.py:132-136]
        boosted = self.boosted_cache(features, logits)  # after the update: the copy holds the query too
        h = self.normalised_entropy(obs.entropy)  # [boost utils.py:21-23]
        if self.in_negative_band(h):  # [boost runner.py:149-150]
            self.negative.update(label, CacheEntry(obs.feature, obs.entropy, obs.probs))
        self.seen += 1
        # [boost runner.py:152-160]: the positive cache is never empty here, it has just taken the query
        n_classes = self.classes.shape[0]
        labels = torch.tensor([cls for cls, _ in boosted.keys_in_order()])
        onehot = F.one_hot(labels, n_classes).float()
        final = obs.logits + self.alpha * boosted.affinity_logits(obs.feature, self.beta, onehot)
        if self.negative:
            probs = torch.stack([e.probs for _, e in self.negative.keys_in_order()])
            # 0.03 < p < 1.0 [boost configs/*.yaml:14-16; runner.py:83-85]
            mask = ((probs > NEGATIVE_MASK[0]) & (probs < NEGATIVE_MASK[1])).float()
            final = final - self.neg_alpha * self.negative.affinity_logits(obs.feature, self.neg_beta, mask)
        return final

    @staticmethod
    def in_negative_band(h: float) -> bool:
        """``0.2 < h < 0.5``, strict on both sides [boost configs/*.yaml:11-13; runner.py:149]."""
        return NEGATIVE_BAND[0] < h < NEGATIVE_BAND[1]

    def observe_query(self, features: torch.Tensor) -> Observation:
        """The image's query (TTA2.md §8.2): view 0 alone, or TDA's confident-view mean."""
        if self.query == "view0":
            # [boost utils.py:89-93, 104-107]: f_0, z_0, softmax(z_0), entropy of z_0
            return observe(features[:1], self.classes, self.scale, self.fraction)
        return observe(features, self.classes, self.scale, self.fraction)  # [boost utils.py:94-103]

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        """One image from its normalised view features (n_views, D), view 0 first: the query and
        every view's logits (the boosting candidates), then :meth:`boost_step`."""
        watch = Stopwatch()
        with watch("cache"):
            obs = self.observe_query(features)
            logits = self.scale * features.float() @ self.classes.float().t()  # every view's z_v [boost utils.py:81-84]
            final = self.boost_step(obs, features, logits)
        out = final.detach().float().cpu()
        return AdaptResult(out, out, watch.timings)

    def step(self, obs: Observation) -> torch.Tensor:
        """TDA's one-observation step has no views to boost with; BoostAdapter needs them all."""
        raise TypeError("BoostAdapter adapts from all of an image's views: call adapt_features(features)")
