"""Test-time adaptation of CLIP on any class features: TPT, C-TPT, O-TPT, ZERO, TDA, MTA, DMN-ZS,
DPE, BoostAdapter and TPS (TTA.md, TTA2.md).

The evaluation loop needs three things from here:

* the registry (:mod:`.registry`): one declaration per method in ``methods/`` (settings, flags,
  checks, published defaults), from which ``eval``'s flags, validation and records come;
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

from typing import Any

# The names below load on first use (PEP 562): the registry and the method declarations import no
# torch, so ``eval --help`` and every bad flag are answered without it; the adapters need it.
_LAZY = {
    "build_adapter": ".api",
    "view_maker": ".api",
    "AdaptResult": ".base",
    "Adapter": ".base",
    "FeatureAdapter": ".base",
    "EPISODIC": ".config",
    "METHODS": ".config",
    "TTAConfig": ".config",
    "TTAConfigError": ".registry",
    "model_preprocess_cfg": ".views",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
