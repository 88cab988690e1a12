"""Test-time adaptation of CLIP: TPT, C-TPT, ZERO, TDA and MTA on any class features (TTA.md).

The evaluation loop needs three things from here:

* :class:`TTAConfig` (validated before any model loads, errors name the ``--tta-*`` flag);
* :func:`view_maker`: the picklable per-image view function for DataLoader workers, built from the
  model's own preprocessing config;
* :func:`build_adapter`: an :class:`Adapter` whose ``adapt(views)`` returns an :class:`AdaptResult`
  (logits, calibration logits, timings); ``online`` adapters (TDA) keep state across images and
  save it with ``state_dict()``.

Modules: ``views`` (views and AugMix), ``selection`` (entropies, confident views), one module per
method (``tpt``, ``ctpt``, ``zero``, ``tda``, ``mta``).
"""

from __future__ import annotations

from .api import build_adapter, view_maker
from .base import AdaptResult, Adapter
from .config import EPISODIC, METHODS, TTAConfig, TTAConfigError
from .views import model_preprocess_cfg

__all__ = [
    "EPISODIC",
    "METHODS",
    "AdaptResult",
    "Adapter",
    "TTAConfig",
    "TTAConfigError",
    "build_adapter",
    "model_preprocess_cfg",
    "view_maker",
]
