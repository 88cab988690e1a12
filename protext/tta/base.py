"""What every test-time adaptation method returns and offers to the evaluation loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["AdaptResult", "Adapter", "FeatureAdapter", "Stopwatch", "cosines"]


@dataclass
class AdaptResult:
    """The outcome of adapting to one image.

    Attributes:
        logits: the method's scores, fp32 on the CPU, shape (n_classes,); ``argmax`` is its
            prediction (for ZERO: the vote counts, the tie winner's raised by one).
        calibration_logits: the logits whose softmax is the reported confidence (TTA.md §5): the
            same as ``logits`` except for ZERO, whose votes are not a probability (view 0's logits).
        timings: seconds per phase; ``images`` is image encoding, every other key the rest.
        extras: per-image tensors a method keeps for a decision taken after the stream (DMN-ZS's
            text and memory probabilities, from which its oracle variant picks β₂); empty otherwise.
    """

    logits: torch.Tensor
    calibration_logits: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Adapter:
    """Base of the five methods: ``adapt`` one image's views, or ``adapt_batch`` several.

    ``online`` methods (TDA) carry state from image to image; ``state_dict``/``load_state_dict``
    save and restore it so an interrupted stream resumes exactly.
    """

    online: bool = False

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        """Adapt to one image's views (n_views, 3, H, W), view 0 = the image itself."""
        raise NotImplementedError

    def adapt_batch(self, batch: Sequence[torch.Tensor]) -> list[AdaptResult]:
        """Adapt to several images; each result equals what :meth:`adapt` gives for that image alone."""
        return [self.adapt(views) for views in batch]

    def state_dict(self) -> dict[str, Any]:
        """The state carried across images (empty for the episodic methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a no-op for the episodic methods)."""
        if state:
            raise ValueError(f"{type(self).__name__} carries no state across images, got keys {sorted(state)}")


class FeatureAdapter(Adapter):
    """A method that reads only its views' image features: no backward through the image tower.

    Subclasses set ``image_encoder`` (a :class:`protext.zeroshot.ImageEncoder`) and implement
    :meth:`adapt_features`. Because the features are all such a method sees, several of them can
    share one encoding of each image's views (``eval --tta zero,tda,mta``), each fed the same
    normalised fp32 features it would have computed itself.
    """

    image_encoder: Any

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        """Adapt to one image from its normalised view features (n_views, D), view 0 first."""
        raise NotImplementedError

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("images"):
            features = self.image_encoder(views)
        result = self.adapt_features(features)
        result.timings = {**watch.timings, **result.timings}
        return result

    def adapt_batch(self, batch: Sequence[torch.Tensor]) -> list[AdaptResult]:
        """Every image's views through the image tower in one forward, then each image on its own
        (online methods too: the images are still taken in order)."""
        watch = Stopwatch()
        with watch("images"):
            features = self.image_encoder(torch.cat(list(batch)))
        share = {k: v / len(batch) for k, v in watch.timings.items()}
        results = [self.adapt_features(part) for part in features.split([v.shape[0] for v in batch])]
        for result in results:
            result.timings = {**share, **result.timings}
        return results


class Stopwatch:
    """Accumulates seconds per phase: ``with watch("images"): ...``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._phase = ""
        self._start = 0.0

    def __call__(self, phase: str) -> "Stopwatch":
        self._phase = phase
        return self

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        self.timings[self._phase] = self.timings.get(self._phase, 0.0) + elapsed


def cosines(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """``norm(f) · norm(t)ᵀ`` in fp32: (n_views, n_classes)."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(class_features.float(), dim=-1).t()
