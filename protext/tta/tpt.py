"""Test-time prompt tuning (TPT, Shu et al. NeurIPS'22) exactly as ALGORITHMS.md §5 states it.

For every test image, independently: logits of its views under the current prompts, keep the
``⌊n · 0.1⌋`` most confident views (lowest entropy), take one AdamW step that lowers the entropy of
their averaged prediction, predict from view 0 with the tuned prompts, and reset the prompts.

The implementation (the naive, published-style path it is tested against lives in
``tests/reference/tpt_reference.py``):

* it encodes the views once without gradient and reuses view 0's feature
  for the prediction; runs the text tower on class prompts batched by length, each batch cut at its
  own longest end-of-text token, with the prompt prefix (start-of-text and context, identical in
  every class prompt) computed once for all classes; and, because the prompts are reset before every image, reuses the
  text features at the initialisation (computed once) for the first step's loss. The gradient is
  then taken in two passes — ``dL/d(text features)`` from the cached features, then one batch of
  classes at a time re-encoded with gradient and back-propagated — so memory stays bounded by one
  batch whatever the number of classes;
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..amp import autocast, make_scaler
from ..flops import once_per_run
from ..prompts import PromptedTextEncoder
from ..shared_prefix import shared_prefix_features, supports_shared_prefix
from ..zeroshot import DEFAULT_TOKEN_BUDGET, ImageEncoder, length_chunks, logit_scale
from .base import AdaptResult, Adapter
from .selection import marginal_entropy, n_confident, select_confident, view_entropy  # noqa: F401 (re-exported)

TPT_INITS = ("handcrafted", "prompts", "coop")
TPT_TUNE = ("all", "shallow")
AMP_INIT_SCALE = 1000.0
"""The published code's ``GradScaler(init_scale=1000)``."""


# --------------------------------------------------------------------------------------------------
# configuration and result


@dataclass
class TPTConfig:
    """Settings of test-time prompt tuning; the defaults are the published ones (PRESETS.md).

    Attributes:
        n_views: views per test image, view 0 included.
        selection: fraction of views kept by confidence selection.
        steps: optimisation steps per image (the selection of the first step is kept for later
            steps, as published).
        lr: AdamW learning rate (other AdamW settings are PyTorch's defaults).
        tune: ``all`` tunes the context and the deep prompts; ``shallow`` the context only.
        token_budget: tokens per text batch on the fast path (bounds memory).
        shared_prefix: on the fast path, run the prompt prefix once for all classes
            (:func:`shared_prefix_features`); off only to measure what it saves.
        amp: fp16 autocast with a gradient scaler, as published on GPU (on a CPU the same
            path, emulated: for checking that arithmetic, see :mod:`protext.amp`).
        image_dtype: precision of image encoding only (``torch.bfloat16`` on CPUs that have it,
            or on CUDA: a bf16 copy of the image tower, see :class:`ImageEncoder`); ``None`` for
            the model's own precision.
    """

    n_views: int = 64
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    tune: str = "all"
    token_budget: int = DEFAULT_TOKEN_BUDGET
    shared_prefix: bool = True
    amp: bool = False
    image_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError(f"--tpt-views must be at least 1, got {self.n_views}.")
        if not 0.0 < self.selection <= 1.0:
            raise ValueError(f"--tpt-selection must be in (0, 1], got {self.selection}.")
        if self.steps < 0:
            raise ValueError(f"--tpt-steps must be >= 0, got {self.steps}.")
        if self.lr <= 0:
            raise ValueError(f"--tpt-lr must be positive, got {self.lr}.")
        if self.tune not in TPT_TUNE:
            raise ValueError(f"--tpt-tune must be one of {', '.join(TPT_TUNE)}, got '{self.tune}'.")


@dataclass
class TPTOutput:
    """What tuning on one image produced.

    Attributes:
        logits: view 0's logits under the tuned prompts, fp32 on the CPU, shape (n_classes,).
        selected: indices of the confident views chosen at the first step (empty for 0 steps).
        losses: the marginal entropy before each step.
        tuned: the prompt vectors after the last step (only when asked for).
        timings: seconds spent per phase (``images``, ``text``, ``step``, ``predict``).
        scales: with ``amp``, the gradient scaler's scale (before, after) each step: ``(1000.0,
            500.0)`` is a step skipped because a gradient overflowed fp16; empty without ``amp``.
    """

    logits: torch.Tensor
    selected: torch.Tensor
    losses: list[float]
    tuned: Optional[dict[str, torch.Tensor]] = None
    timings: dict[str, float] = field(default_factory=dict)
    scales: list[tuple[float, float]] = field(default_factory=list)


def image_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one test image, keyed by (seed, dataset index).

    Views therefore depend neither on the order images are processed in nor on how they are
    sharded over processes; ``SeedSequence`` mixes the pair so neighbouring indices get unrelated
    streams. One 32-bit word is the whole seed because torch's CPU generator seeds its Mersenne
    Twister from the low 32 bits only (this word is also the low half of ``SeedSequence``'s first
    64-bit word, so views recorded by runs that drew that one are the same).
    """
    (state,) = np.random.SeedSequence([int(seed), int(index)]).generate_state(1)
    generator = torch.Generator()
    generator.manual_seed(int(state))
    return generator


# --------------------------------------------------------------------------------------------------
# the tuner


def _autocast(device: torch.device, enabled: bool) -> ContextManager:
    return autocast(device, torch.float16 if enabled else None)


class PromptTuner:
    """Runs TPT image by image on one :class:`PromptedTextEncoder`, resetting it after each.

    The encoder's prompts at construction are the initialisation every image starts from.

    Args:
        model: the frozen CLIP model the encoder borrows (its image tower encodes the views).
        encoder: the prompts to tune; its parameters are switched to ``requires_grad`` per ``tune``.
        config: :class:`TPTConfig`.
    """

    def __init__(self, model: nn.Module, encoder: PromptedTextEncoder, config: TPTConfig) -> None:
        self.model = model
        self.encoder = encoder
        self.config = config
        self.device = encoder.ctx.device
        self.scale = logit_scale(model).to(self.device)
        self.initial = {k: v.clone() for k, v in encoder.prompt_state().items()}
        encoder.ctx.requires_grad_(True)
        if encoder.deep_prompts is not None:
            encoder.deep_prompts.requires_grad_(config.tune == "all")
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.image_encoder = ImageEncoder(model, torch.float16 if config.amp else config.image_dtype)
        self.chunks = length_chunks(encoder.eot, config.token_budget)
        self.shared_prefix = config.shared_prefix and supports_shared_prefix(encoder)
        self._initial_text: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- text and image features

    def _encode(self, chunk: torch.Tensor, truncate: bool) -> torch.Tensor:
        """Raw features of one batch of classes (the fast path shares the prompt prefix)."""
        with _autocast(self.device, self.config.amp):
            if truncate and self.shared_prefix:
                return shared_prefix_features(self.encoder, chunk)
            return self.encoder(chunk, truncate=truncate)

    def _text_fast(self) -> torch.Tensor:
        """Raw class features under the current prompts, batched by length, no gradient."""
        out = None
        with torch.no_grad():
            for chunk in self.chunks:
                feats = self._encode(chunk, truncate=True)
                if out is None:
                    out = feats.new_empty(self.encoder.tokens.shape[0], feats.shape[1])
                out[chunk] = feats
        return out

    @once_per_run  # the first image computes them for all: a cost of the run, not of that image
    def initial_text_features(self) -> torch.Tensor:
        """Raw class features at the initialisation: the same for every image, so computed once."""
        if self._initial_text is None:
            self._initial_text = self._text_fast()
        return self._initial_text

    def _images(self, views: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(views)

    def _logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.scale * image_features.float() @ F.normalize(text_features.float(), dim=-1).t()

    # ---------------------------------------------------------------- one image

    def reset(self) -> None:
        """Put the initial prompts back (after every image)."""
        self.encoder.load_prompt_state(self.initial)

    def _optimiser(self) -> tuple[torch.optim.Optimizer, Optional[torch.amp.GradScaler]]:
        # fresh state for every image: the published code reloads the optimiser's initial state dict
        optimiser = torch.optim.AdamW(self.params, lr=self.config.lr)
        # a fresh scaler too, so that a skipped step on one image cannot change the next image's run
        scaler = make_scaler(self.device, AMP_INIT_SCALE) if self.config.amp else None
        return optimiser, scaler

    def _backward_through_chunks(self, grad: torch.Tensor, chunks: Sequence[torch.Tensor], truncate: bool) -> None:
        """Second pass: re-encode each class batch with gradient and push ``grad`` (dL/dfeatures) back."""
        for chunk in chunks:
            feats = self._encode(chunk, truncate)
            feats.backward(grad[chunk].to(feats.dtype))

    def _step(
        self,
        image_features: torch.Tensor,
        text_features: Optional[torch.Tensor],
        selected: Optional[torch.Tensor],
        optimiser: torch.optim.Optimizer,
        scaler: Optional[torch.amp.GradScaler],
        chunks: Sequence[torch.Tensor],
        truncate: bool,
        scales: Optional[list[tuple[float, float]]] = None,
    ) -> tuple[torch.Tensor, float]:
        """One tuning step; returns (selected view indices, loss before the step).

        With a ``scaler``, (its scale before, after) the step is appended to ``scales``: the scale
        halves exactly when the step was skipped for an inf/NaN gradient.

        With ``text_features`` given (no gradient) the gradient goes in two passes over ``chunks``;
        with None, all classes are encoded in one autograd graph (the published way).
        """
        optimiser.zero_grad()  # set_to_none is the default: gradients from the last step or image are dropped
        if text_features is None:
            with _autocast(self.device, self.config.amp):
                text = self.encoder(truncate=truncate)
            leaf = None
        else:
            leaf = text_features.detach().float().requires_grad_(True)
            text = leaf
        logits = self._logits(image_features, text)
        if selected is None:
            selected = select_confident(logits, self.config.selection)
        loss = self._loss(logits[selected], text)
        scaled = scaler.scale(loss) if scaler is not None else loss
        if leaf is None:
            scaled.backward()
        else:
            (grad,) = torch.autograd.grad(scaled, leaf)
            self._backward_through_chunks(grad, chunks, truncate)
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimiser)  # unscales, and skips the step when a gradient is not finite
            scaler.update()
            if scales is not None:
                scales.append((before, scaler.get_scale()))
        else:
            optimiser.step()
        return selected, float(loss.detach())

    def _loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """TPT's loss: the entropy of the kept views' mean prediction (C-TPT adds a term)."""
        return marginal_entropy(selected_logits)

    def adapt(self, views: torch.Tensor, return_tuned: bool = False) -> TPTOutput:
        """Tune on the views of one image (view 0 = the image), predict from view 0, then reset.

        Args:
            views: normalised views, shape (n_views, 3, R, R); view 0 is the test image itself.
            return_tuned: also return copies of the tuned prompt vectors.
        """
        if views.ndim != 4:
            raise ValueError(f"views must be (n_views, 3, H, W), got shape {tuple(views.shape)}.")
        try:
            return self._run(views.to(self.device), return_tuned)
        finally:
            self.reset()

    def _run(self, views: torch.Tensor, return_tuned: bool) -> TPTOutput:
        """The fast path (the naive reference in ``tests/reference`` overrides this)."""
        return self._adapt_fast(views, return_tuned)

    def _adapt_fast(self, views: torch.Tensor, return_tuned: bool) -> TPTOutput:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        image_features = self._images(views)  # once: image features do not depend on the prompts
        timings["images"] = time.perf_counter() - start

        optimiser, scaler = self._optimiser()
        selected, losses, scales = None, [], []
        for step in range(self.config.steps):
            start = time.perf_counter()
            # the prompts were reset before this image, so step 0 sees the cached initial features
            text = self.initial_text_features() if step == 0 else self._text_fast()
            timings["text"] = timings.get("text", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            selected, loss = self._step(image_features, text, selected, optimiser, scaler, self.chunks, True, scales)
            timings["step"] = timings.get("step", 0.0) + time.perf_counter() - start
            losses.append(loss)

        start = time.perf_counter()
        text = self.initial_text_features() if self.config.steps == 0 else self._text_fast()
        logits = self._logits(image_features[:1], text)[0]  # view 0's feature, reused
        timings["predict"] = time.perf_counter() - start
        return self._output(logits, selected, losses, return_tuned, timings, scales)

    def _output(
        self,
        logits: torch.Tensor,
        selected: Optional[torch.Tensor],
        losses: list[float],
        return_tuned: bool,
        timings: dict[str, float],
        scales: Optional[list[tuple[float, float]]] = None,
    ) -> TPTOutput:
        tuned = {k: v.cpu() for k, v in self.encoder.prompt_state().items()} if return_tuned else None
        chosen = selected.cpu() if selected is not None else torch.empty(0, dtype=torch.long)
        return TPTOutput(logits.detach().float().cpu(), chosen, losses, tuned, timings, list(scales or []))



# --------------------------------------------------------------------------------------------------
# the common adapter interface


class TPTAdapter(Adapter):
    """TPT or C-TPT behind :class:`~protext.tta.base.Adapter`: one :class:`PromptTuner` per run.

    ``logits`` and ``calibration_logits`` are both view 0's logits under the tuned prompts.
    """

    def __init__(self, tuner: PromptTuner) -> None:
        self.tuner = tuner

    def adapt(self, views: torch.Tensor) -> AdaptResult:
        out = self.tuner.adapt(views)
        return AdaptResult(out.logits, out.logits, out.timings)
