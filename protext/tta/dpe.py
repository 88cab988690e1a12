"""DPE (Zhang et al., NeurIPS'24, "Dual Prototype Evolving"): evolving text and visual prototypes (TTA2.md §7).

Online. Two things carry over from image to image: the global text prototypes ``W`` (D×C, a running
mean of every confident image's adapted prototypes) and TDA's visual priority queue (≤ 3
low-entropy features per predicted class). Per image, two zero residuals, ``R_t`` on the text
prototypes (D×C) and ``R_v`` on the queue's per-class visual prototypes (D×m), take **one** AdamW
step on ``entropy(final logits) + align · InfoNCE(visual, text prototypes of the m present
classes)``; the image is then predicted with the adapted prototypes and, if that prediction is
confident, ``W`` absorbs the adapted text prototypes. The residuals are thrown away after the image.

Only the two residuals receive gradients: the image features arrive fixed, so the image tower is
never back-propagated through (the official code runs its backward through ``encode_image`` too,
for weights it never steps: wasted work, not a numerical difference [TTA2 §7.7]).

Precision: the official code runs fp16 weights inside ``torch.cuda.amp.autocast()`` [dpe
main_dpe.py:198; clip/model.py:430], so its logits and the affinities ``f·K'`` are fp16, its
residuals, gradients and AdamW updates are fp16 (an update of ~6e-4 on a prototype element of
~0.05 is quantised to a few fp16 ulps) and ``W``'s running mean is accumulated in fp16. Here
everything runs in fp32: the logits differ from the official ones at the fp16-rounding level
(≈1e-3 relative), which can flip near-ties of the prediction, of the entropy gate ``e < 0.1`` and
of the queue's entropy order, and so the stream's later state.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch
from .selection import marginal_entropy, select_confident
from .tda import CacheEntry, TDACache

__all__ = [
    "ADAMW_EPS",
    "ADAMW_WEIGHT_DECAY",
    "DPEAdapter",
    "EVOLUTION_THRESHOLD",
    "INFONCE_TEMPERATURE",
    "SHOT_CAPACITY",
    "cache_logits",
    "info_nce",
    "observe_views",
    "visual_prototypes",
]

INFONCE_TEMPERATURE = 0.01
"""[dpe main_dpe.py:37] ``InfoNCE(temperature=0.01, reduction='mean')``."""
ADAMW_EPS = 1e-3
"""[dpe main_dpe.py:249-250] both parameter groups."""
ADAMW_WEIGHT_DECAY = 0.1
"""[dpe main_dpe.py:249-250] both parameter groups (decoupled; it acts on a zero residual, so it changes nothing on the one step)."""
EVOLUTION_THRESHOLD = 0.1
"""[dpe main_dpe.py:288] the text prototypes evolve when ``avg_entropy(final) / log₂ C`` is below this."""
SHOT_CAPACITY = 3
"""[dpe configs/*.yaml] ``positive.shot_capacity`` on every dataset."""


def observe_views(
    features: torch.Tensor, text: torch.Tensor, scale: float, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One image's ``(f, z, H, ŷ)`` under the text prototypes ``text`` (D×C) (TTA2 §7.2).

    TDA's observation [dpe utils.py:132-163], kept differentiable in ``text``: the ``⌊n·fraction⌋``
    views (at least one) of lowest entropy, selected without gradient; ``f`` the mean of their
    features (not re-normalised), ``z`` the mean of their logits (carrying ``text``'s gradient),
    ``H`` TPT's marginal entropy of them in nats, ``ŷ = argmax z``. One view is the same formulas
    on one row: ``f = f_0``, ``z = scale·f_0·W``, ``H`` the entropy of ``softmax(z)``.
    """
    logits = scale * features.float() @ text
    kept = select_confident(logits.detach(), fraction)
    chosen = logits[kept]
    mean_logits = chosen.mean(0)
    entropy = float(marginal_entropy(chosen.detach()))
    return features[kept].float().mean(0), mean_logits, entropy, int(mean_logits.detach().argmax())


def info_nce(query: torch.Tensor, positive: torch.Tensor, temperature: float = INFONCE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE without explicit negatives: row ``i`` of ``query`` must pick row ``i`` of ``positive``.

    Both (m, D) are L2-normalised per row, ``logits = q·kᵀ / temperature`` (m×m), and the loss is
    the mean cross-entropy against ``arange(m)``: the other rows' positives are the negatives
    (what ``info-nce-pytorch`` does when called without ``negative_keys`` [TTA2 §7.6]). Written
    here rather than imported so no extra package is needed. With m = 1 the only logit is the
    target's, so the loss is exactly ``log 1 = 0`` and contributes no gradient.
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(positive, dim=-1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels, reduction="mean")


def visual_prototypes(queue: TDACache, n_classes: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The queue's per-class mean features ``K`` (D×m), one-hot values ``V`` (m×C) and the classes (TTA2 §7.5).

    Classes in ascending order; each prototype is accumulated as ``Σ f_i / n_c`` in the queue's
    order (lowest entropy first) into zeros of ``like``'s dtype, as the official loop does
    [dpe main_dpe.py:133-152], so the fp32 rounding follows the same sequence. The prototypes are
    not normalised here: ``R_v`` is added first, then each column is normalised.
    """
    classes = sorted(label for label, items in queue.entries.items() if items)
    columns = []
    for label in classes:
        items = queue.entries[label]
        prototype = torch.zeros_like(like)
        for entry in items:
            prototype = prototype + entry.feature.to(like) / len(items)
        columns.append(prototype)
    keys = torch.stack(columns, dim=1)
    values = F.one_hot(torch.tensor(classes, device=like.device), n_classes).to(like.dtype)
    return keys, values, classes


def cache_logits(feature: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``α · exp(−(β − β·f·K)) · V``: each present class's affinity, in the official's form [dpe main_dpe.py:154-157]."""
    affinity = feature @ keys
    return alpha * torch.exp(-(beta - beta * affinity)) @ values


class DPEAdapter(FeatureAdapter):
    """DPE on fixed class features (C, D): online, one AdamW step per image on two residuals.

    Args:
        model: the CLIP model (image tower and temperature ``exp(logit_scale)``; the official code
            hard-codes 100, which is OpenAI CLIP's value).
        class_features: (n_classes, embed_dim), normalised here; the initial ``W`` (its transpose).
        alpha, beta: the prototype cache's weight and sharpness (per dataset, ``configs/*.yaml``).
        lr_text, lr_image: AdamW learning rates of ``R_t`` and ``R_v``.
        align: λ, the weight of the InfoNCE alignment term.
        fraction: share of views kept when there are several (0.1: 6 of 64) [dpe utils.py:150].
        shot_capacity: queue entries per class (3 on every published set).
        threshold: the normalised entropy below which ``W`` evolves (0.1) [dpe main_dpe.py:288].
        temperature: InfoNCE's temperature (0.01) [dpe main_dpe.py:37].
        reselect: ImageNet-A's prediction rule: re-select the confident views under the adapted
            text prototypes and predict from their means, instead of from view 0 alone
            [dpe main_dpe.py:268-271].
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
        lr_text: float,
        lr_image: float,
        align: float,
        fraction: float = 0.1,
        shot_capacity: int = SHOT_CAPACITY,
        threshold: float = EVOLUTION_THRESHOLD,
        temperature: float = INFONCE_TEMPERATURE,
        reselect: bool = False,
        image_dtype: Optional[torch.dtype] = None,
    ) -> None:
        device = next(model.parameters()).device
        # [dpe utils.py:71-129] the classifier is D×C, one normalised column per class
        self.initial = F.normalize(class_features.detach().float(), dim=-1).t().contiguous().to(device)
        self.scale = float(logit_scale(model))
        self.alpha, self.beta = alpha, beta
        self.lr_text, self.lr_image, self.align = lr_text, lr_image, align
        self.fraction = fraction
        self.threshold = threshold
        self.temperature = temperature
        self.reselect = reselect
        self.image_encoder = ImageEncoder(model, image_dtype)
        self.queue = TDACache(shot_capacity)
        self.text = self.initial.clone()  # W, kept un-normalised after updates [TTA2 §7 State]
        self.evolved = 0  # m, how many images W has absorbed [dpe main_dpe.py:208]
        self.seen = 0

    @property
    def n_classes(self) -> int:
        return self.initial.shape[1]

    def normalised_entropy(self, entropy: float) -> float:
        """``H / log₂ C``: nats over bits, as published (TDA's quirk) [dpe utils.py:46-48]."""
        return entropy / math.log2(self.n_classes)

    def final_logits(self, feature: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``z + α·exp(−β(1 − f·K))·V`` (TTA2 §7.6, §7.8)."""
        return logits + cache_logits(feature, keys, values, self.alpha, self.beta)

    def step(self, features: torch.Tensor) -> torch.Tensor:
        """One image (TTA2 §7 steps 1-9): update the queue, take the residuals' AdamW step,
        predict, and evolve ``W`` if the prediction is confident. Returns the final logits."""
        local = self.text.clone()
        # step 1: a new zero text residual per image; W' = norm_col(W + R_t) [dpe main_dpe.py:217-219]
        text_residual = torch.zeros_like(local, requires_grad=True)
        with torch.enable_grad():
            adapted_text = F.normalize(local + text_residual, dim=0)
            # step 2: the views' logits under W' (autograd on); 6 of 64 by entropy, or view 0 alone
            feature, logits, entropy, label = observe_views(features, adapted_text, self.scale, self.fraction)
            # steps 3-4: h = H / log₂ C enters TDA's positive-cache rule [dpe main_dpe.py:224-226]
            self.queue.update(label, CacheEntry(feature, self.normalised_entropy(entropy)))
            # step 5: per-class visual prototypes and a new zero visual residual [dpe main_dpe.py:227-228]
            keys, values, classes = visual_prototypes(self.queue, self.n_classes, feature)
            image_residual = torch.zeros_like(keys, requires_grad=True)
            adapted_keys = F.normalize(keys + image_residual, dim=0)
            # step 6: entropy of the final logits plus λ·InfoNCE [dpe main_dpe.py:232-243]
            final = self.final_logits(feature, logits, adapted_keys, values)
            loss = marginal_entropy(final.unsqueeze(0))
            loss = loss + self.align * info_nce(adapted_keys.t(), adapted_text[:, classes].t(), self.temperature)
            # step 7: a new AdamW per image, one step [dpe main_dpe.py:245-262]
            optimizer = torch.optim.AdamW(
                [
                    {"params": [text_residual], "lr": self.lr_text, "eps": ADAMW_EPS, "weight_decay": ADAMW_WEIGHT_DECAY},
                    {"params": [image_residual], "lr": self.lr_image, "eps": ADAMW_EPS, "weight_decay": ADAMW_WEIGHT_DECAY},
                ]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            # step 8: predict with W'' and K'' [dpe main_dpe.py:264-280]
            final_text = F.normalize(local + text_residual, dim=0)
            final_keys = F.normalize(keys + image_residual, dim=0)
            if self.reselect:  # ImageNet-A: a new top-6 selection under W''
                feature, logits, _, _ = observe_views(features, final_text, self.scale, self.fraction)
            else:  # view 0 only
                feature = features[0].float()
                logits = self.scale * feature @ final_text
            final = self.final_logits(feature, logits, final_keys, values)
            # step 9: the running mean of W, gated on the final entropy; no re-normalisation [dpe main_dpe.py:283-294]
            e = self.normalised_entropy(float(marginal_entropy(final.unsqueeze(0))))
            if e < self.threshold:
                self.evolved += 1
                m = self.evolved
                self.text = self.text * (m / (m + 1)) + final_text * (1 / (m + 1))
        self.seen += 1
        return final

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("step"):
            # the image encoder returns features on the model's device, where W already is
            final = self.step(features)
        logits = final.detach().float().cpu()
        return AdaptResult(logits, logits, watch.timings)

    def state_dict(self) -> dict[str, Any]:
        """``W`` (D×C, fp32, as it is), the evolution count ``m``, the queue, and the images seen."""
        return {"W": self.text.detach().cpu().clone(), "m": self.evolved, "queue": self.queue.state(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; an empty state starts a fresh stream (the initial ``W``)."""
        device = self.initial.device
        text = state.get("W")
        self.text = self.initial.clone() if text is None else text.to(device=device, dtype=torch.float32).clone()
        self.evolved = int(state.get("m", 0))
        self.queue.load(state.get("queue", {}), device)
        self.seen = int(state.get("seen", 0))
