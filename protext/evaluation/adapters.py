"""From the ``--tta*`` flags to :mod:`protext.tta`: the method's settings, views and adapter.

The methods and their options are declared in :mod:`protext.tta.registry`; this module only hands
the evaluation's values and precision to it and records what was used.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .config import EvalConfig, EvalError
from .runtime import Runtime


def tta_config(config: EvalConfig, runtime: Optional[Runtime] = None):
    """The :class:`protext.tta.TTAConfig` of ``config`` (unset options keep the method's defaults)."""
    from ..tta import TTAConfig

    precision = {} if runtime is None else {"fp16": runtime.fp16, "image_dtype": runtime.image_dtype}
    return TTAConfig(method=config.tta, options=config.tta_values(), **precision)


def validate_tta(config: EvalConfig, dataset_name: str, runtime: Optional[Runtime] = None) -> None:
    """The method's own checks for this dataset (published defaults that exist, rules across options),
    before any model loads.

    With ``runtime`` its precision is checked too (``auto`` may have become fp16); without, an
    explicit ``--precision fp16`` is.
    """
    if not config.tta:
        return
    from ..tta import registry

    fp16 = runtime.fp16 if runtime is not None else config.precision == "fp16"
    try:
        registry.resolve(config.tta, config.tta_values(), registry.context(dataset_name, fp16))
    except registry.TTAConfigError as err:
        raise EvalError(str(err)) from None


def resolved_settings(tta_cfg, dataset_name: str) -> dict[str, Any]:
    """The settings actually used (published defaults filled in) and the precision, for the results."""
    from ..tta import registry

    out = {"method": tta_cfg.method, **registry.record(tta_cfg.method, tta_cfg.settings(dataset_name))}
    out["fp16"] = tta_cfg.fp16
    out["image_dtype"] = str(tta_cfg.image_dtype).replace("torch.", "") if tta_cfg.image_dtype is not None else None
    return out


def view_maker(tta_cfg, dataset_name: str, clip) -> Callable:
    """The picklable ``(image, generator) -> views`` of the method, with the model's preprocessing."""
    from ..tta import view_maker as make
    from ..tta.views import model_preprocess_cfg

    return make(tta_cfg, dataset_name, model_preprocess_cfg(clip.model))


def build_adapter(tta_cfg, clip, dataset_name: str, *, text_features=None, encoder=None):
    """The method's :class:`protext.tta.base.Adapter` on these class features or prompts."""
    from ..tta import build_adapter as build

    return build(tta_cfg, clip.model, dataset_name, text_features=text_features, encoder=encoder)


def image_generator(seed: int, index: int):
    """The random stream of one test image, keyed by (seed, dataset index)."""
    from ..tta.tpt import image_generator as generator

    return generator(seed, index)
