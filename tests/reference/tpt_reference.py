"""Naive (published-style) TPT and C-TPT: the path the fast tuner of :mod:`protext.tta.tpt` is proved equal to.

What the published code does (ALGORITHMS.md §5): the views are re-encoded at every step and view 0
again for the prediction; every class prompt runs through all 77 positions, all classes in one
autograd graph. ``naive_class_chunk`` splits that graph for large class counts (a first pass
without gradient for the loss, then the graph one chunk at a time), which costs one extra text
forward; the benchmark reports that pass apart.

``TPTConfig(naive=True)`` with this module's :class:`PromptTuner`/:class:`CTPTTuner` runs the naive
path; ``naive=False`` runs production's fast path, so tests and ``benchmarks/bench_tpt.py`` can
compare the two through one interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from protext.tta import ctpt as _ctpt
from protext.tta import tpt as _tpt
from protext.tta.tpt import TPTOutput, _autocast, image_generator  # noqa: F401  (re-exported for tests)

__all__ = ["CTPTTuner", "PromptTuner", "TPTConfig", "image_generator"]


@dataclass
class TPTConfig(_tpt.TPTConfig):
    """Production's settings plus the naive path's switch and its optional class chunking."""

    naive: bool = False
    naive_class_chunk: Optional[int] = None


class _NaivePath:
    """Mixin: ``config.naive`` replaces the fast path by the published-style one."""

    def _run(self, views: torch.Tensor, return_tuned: bool) -> TPTOutput:
        if not getattr(self.config, "naive", False):
            return super()._run(views, return_tuned)
        return self._adapt_naive(views, return_tuned)

    def _adapt_naive(self, views: torch.Tensor, return_tuned: bool) -> TPTOutput:
        timings: dict[str, float] = {}
        n_classes = self.encoder.tokens.shape[0]
        chunk = self.config.naive_class_chunk
        chunks = None
        if chunk is not None and chunk < n_classes:
            chunks = list(torch.arange(n_classes, device=self.device).split(chunk))
        optimiser, scaler = self._optimiser()
        selected, losses = None, []
        for _ in range(self.config.steps):
            start = time.perf_counter()
            image_features = self._images(views)  # re-encoded at every step, as published
            timings["images"] = timings.get("images", 0.0) + time.perf_counter() - start
            text = None
            if chunks is not None:  # memory-bounded: a first pass for the loss, without gradient
                start = time.perf_counter()
                text = self._text_full(chunks)
                timings["text"] = timings.get("text", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            selected, loss = self._step(image_features, text, selected, optimiser, scaler, chunks or [], False)
            timings["step"] = timings.get("step", 0.0) + time.perf_counter() - start
            losses.append(loss)

        start = time.perf_counter()
        view0 = self._images(views[:1])  # the published code encodes the test image again
        text = self._text_full(chunks or [torch.arange(n_classes, device=self.device)])
        logits = self._logits(view0, text)[0]
        timings["predict"] = time.perf_counter() - start
        return self._output(logits, selected, losses, return_tuned, timings)

    def _text_full(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw class features through all 77 positions, no gradient."""
        with torch.no_grad(), _autocast(self.device, self.config.amp):
            parts = [self.encoder(chunk, truncate=False) for chunk in chunks]
        return torch.cat(parts)


class PromptTuner(_NaivePath, _tpt.PromptTuner):
    """Production's :class:`protext.tta.tpt.PromptTuner`, or the naive path with ``naive=True``."""


class CTPTTuner(_NaivePath, _ctpt.CTPTTuner):
    """Production's :class:`protext.tta.ctpt.CTPTTuner`, or the naive path with ``naive=True``."""
