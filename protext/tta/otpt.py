"""O-TPT (Sharifdeen et al., CVPR'25): TPT whose loss also asks the class features to be orthogonal (TTA2.md §9).

``L = H(p̄_selected) + λ·O`` [otpt otpt_classification.py:225-296], with ``O`` the orthogonality
regulariser of the L2-normalised class features ``T`` (C×D) of the same forward. The official code
builds ``G = T Tᵀ``, one Householder reflection per row of ``G`` (a C×C×C batch) and takes the mean
norm of the residuals ``H_i g_i − e_i`` [otpt otpt_classification.py:225-288;
clip/custom_clip_iptp_bas.py:318-348]. Because ``G`` is symmetric, that reflection maps ``g_i`` to
``‖g_i‖ e_i`` exactly, so

    ``O = mean_i (‖g_i‖₂ − 1) = mean_i (sqrt(1 + Σ_{j≠i} cos²(t_i, t_j)) − 1)``,

the same function (value and gradient) in O(C²) memory instead of O(C³) (≈ 4 GB per C×C×C fp32
tensor on ImageNet's 1000 classes), and without the official NaN when the features are already
exactly orthogonal (a zero Householder vector). :func:`orthogonality` computes it; the hand-written
Householder version lives in ``tests/test_tta_otpt.py``.

As published, the regulariser runs outside autocast [otpt otpt_classification.py:225], in fp32.
Everything else is TPT (:mod:`protext.tta.tpt`): views, confident-view selection, one AdamW step,
the fp16 gradient-scaler path, the per-image reset. λ is 18 on ImageNet and the fine-grained sets,
2 on the natural shifts (scripts/test_tpt_otpt_fg.sh, scripts/test_tpt_otpt_ds.sh).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..prompts import PromptedTextEncoder
from .selection import marginal_entropy
from .tpt import PromptTuner, TPTConfig

__all__ = ["OTPTTuner", "orthogonality"]


def orthogonality(text_features: torch.Tensor) -> torch.Tensor:
    """O-TPT's orthogonality regulariser of raw class features (C, D), in closed form.

    ``T`` = the rows of ``text_features`` L2-normalised, ``G = T Tᵀ``, result ``mean_i (‖g_i‖₂ − 1)``
    (a scalar, ≥ 0, zero iff the classes are mutually orthogonal). Computed outside any autocast, in
    fp32 (fp16/bf16 features are promoted; float64 stays float64, for exact checks); differentiable.
    """
    if text_features.ndim != 2:
        raise ValueError(f"text_features must be (n_classes, dim), got shape {tuple(text_features.shape)}.")
    dtype = torch.promote_types(text_features.dtype, torch.float32)
    with torch.autocast(device_type=text_features.device.type, enabled=False):
        normed = F.normalize(text_features.to(dtype), dim=-1)
        gram = normed @ normed.t()
        return (torch.linalg.vector_norm(gram, dim=-1) - 1.0).mean()


class OTPTTuner(PromptTuner):
    """TPT with O-TPT's loss ``H(p̄_selected) + λ·O``; ``lam`` is λ (18 on ImageNet and fine-grained
    sets, 2 on natural shifts). λ = 0 is TPT."""

    def __init__(self, model: nn.Module, encoder: PromptedTextEncoder, config: TPTConfig, lam: float) -> None:
        super().__init__(model, encoder, config)
        self.lam = float(lam)

    def _loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return marginal_entropy(selected_logits) + self.lam * orthogonality(text_features)
