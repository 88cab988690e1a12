"""C-TPT (Yoon et al., ICLR'24): TPT whose loss also rewards spread-out class features (TTA.md §2).

``L = H(p̄_selected) − λ·ATFD`` with ``ATFD = (1/C) Σ_c ‖t_c − μ‖₂``, ``t_c`` the normalised class
features of the same forward and ``μ`` their mean (not re-normalised). The gradient flows through
the normalisation into the prompts; everything else is TPT (:mod:`protext.tta.tpt`), and the
naive reference of ``tests/reference/tpt_reference.py`` covers C-TPT too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..prompts import PromptedTextEncoder
from .selection import marginal_entropy
from .tpt import PromptTuner, TPTConfig

__all__ = ["CTPTTuner", "atfd"]


def atfd(text_features: torch.Tensor) -> torch.Tensor:
    """Average text feature dispersion of raw class features (C, D): mean distance to the centroid
    of the normalised features."""
    normed = F.normalize(text_features.float(), dim=-1)
    centre = normed.mean(dim=0)
    return torch.linalg.vector_norm(normed - centre, dim=-1).mean()


class CTPTTuner(PromptTuner):
    """TPT with C-TPT's loss; ``lam`` is λ (50 on ImageNet and fine-grained sets, 20 on natural shifts)."""

    def __init__(self, model: nn.Module, encoder: PromptedTextEncoder, config: TPTConfig, lam: float) -> None:
        super().__init__(model, encoder, config)
        self.lam = float(lam)

    def _loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return marginal_entropy(selected_logits) - self.lam * atfd(text_features)
