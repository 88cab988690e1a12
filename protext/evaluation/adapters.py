"""From ``--tta*`` flags to :mod:`protext.tta`'s config, views and adapter.

The methods themselves live in :mod:`protext.tta`; this module only maps the evaluation settings
onto :class:`protext.tta.TTAConfig` and records what was used.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable, Optional

from .config import EvalConfig
from .runtime import Runtime

#: EvalConfig field → TTAConfig field
_FIELDS = {
    "tta_views": "views",
    "tta_selection": "selection",
    "tta_steps": "steps",
    "tta_lr": "lr",
    "tta_tune": "tune",
    "tta_batch": "batch",
    "tta_naive": "naive",
    "ctpt_lambda": "ctpt_lambda",
    "tda_alpha": "tda_alpha",
    "tda_beta": "tda_beta",
    "zero_votes": "zero_votes",
    "augmix": "augmix",
}


def tta_config(config: EvalConfig, runtime: Optional[Runtime] = None):
    """The :class:`protext.tta.TTAConfig` of ``config`` (unset options keep the method's defaults)."""
    from ..tta import TTAConfig

    values: dict[str, Any] = {"method": config.tta}
    for ours, theirs in _FIELDS.items():
        value = getattr(config, ours)
        if value is not None:  # None: the method's published default (--augmix False is a choice)
            values[theirs] = value
    if runtime is not None:
        values["fp16"] = runtime.fp16
        values["image_dtype"] = runtime.image_dtype
    return TTAConfig(**values)


def validate_tta(config: EvalConfig, dataset_name: str, runtime: Optional[Runtime] = None) -> None:
    """The method's own checks (per-dataset defaults that exist, ...), before any model loads.

    With ``runtime`` its precision is checked too (``auto`` may have become fp16); without, an
    explicit ``--precision fp16`` is.
    """
    if not config.tta:
        return
    if config.tta == "tda" and config.tda_alpha is None:
        from ..tta.config import TDA_POSITIVE, dataset_key

        if dataset_key(dataset_name) not in TDA_POSITIVE:
            from .config import EvalError

            raise EvalError(
                f"--tta tda has no published (alpha, beta) for dataset '{dataset_name}'; pass --tda-alpha and "
                "--tda-beta (ImageNet's: --tda-alpha 2 --tda-beta 5)."
            )
    # fp16's refusal (--tta-batch for TPT/C-TPT) must come before any model loads, not at build_adapter
    fp16 = runtime.fp16 if runtime is not None else config.precision == "fp16"
    replace(tta_config(config), fp16=fp16).validate(dataset_name)


def resolved_settings(tta_cfg, dataset_name: str) -> dict[str, Any]:
    """The settings actually used (published defaults filled in), for the results."""
    resolved = tta_cfg.resolved(dataset_name) if hasattr(tta_cfg, "resolved") else tta_cfg
    out = {k: v for k, v in asdict(resolved).items() if k != "image_dtype"}
    out["image_dtype"] = str(resolved.image_dtype).replace("torch.", "") if resolved.image_dtype is not None else None
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
