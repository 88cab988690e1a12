"""The two entry points the evaluation loop needs: a view maker and an adapter for a config."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..prompts import PromptedTextEncoder
from ..zeroshot import prompt_text_features
from .base import Adapter
from .config import TTAConfig
from .views import TPTViews, preprocess_settings

__all__ = ["build_adapter", "view_maker"]


def view_maker(config: TTAConfig, dataset_name: str, preprocess_cfg: Any = None) -> TPTViews:
    """The picklable ``(image, generator) -> Tensor[V, 3, H, W]`` of ``config``'s method on ``dataset_name``.

    ``preprocess_cfg`` is the model's open_clip preprocess config (``open_clip.get_model_preprocess_cfg``
    or :func:`protext.tta.views.model_preprocess_cfg`): views use its size, interpolation, resize mode,
    mean and std, so view 0 equals the model's own ``preprocess(image)``.
    """
    resolved = config.resolved(dataset_name)
    return TPTViews(n_views=resolved.views, augmix=bool(resolved.augmix), **preprocess_settings(preprocess_cfg))


def _image_dtype(config: TTAConfig) -> Optional[torch.dtype]:
    return torch.float16 if config.fp16 else config.image_dtype


def build_adapter(
    config: TTAConfig,
    model: nn.Module,
    dataset_name: str,
    *,
    text_features: Optional[torch.Tensor] = None,
    encoder: Optional[PromptedTextEncoder] = None,
) -> Adapter:
    """The adapter of ``config.method`` for ``dataset_name``, with the dataset's published defaults.

    TPT and C-TPT tune ``encoder``'s prompts (reset after every image); ZERO, TDA and MTA use fixed
    class features: ``text_features`` (C, D), or the features of ``encoder`` when only that is given.

    Raises:
        protext.tta.TTAConfigError: a bad setting (see :meth:`TTAConfig.validate`).
        ValueError: the class features the method needs were not passed (a programming error).
    """
    model = getattr(model, "model", model)  # a LoadedClip works too
    resolved = config.resolved(dataset_name)
    # fp16 runs on any device through protext.amp (on a CPU emulated, for checking the GPU arithmetic)
    method = resolved.method
    if method in ("tpt", "ctpt"):
        if encoder is None:
            raise ValueError(f"--tta {method} tunes prompts: build_adapter needs encoder=PromptedTextEncoder.")
        return _prompt_tuner(resolved, model, encoder)
    if text_features is None:
        if encoder is None:
            raise ValueError(f"--tta {method} needs class features: pass text_features=(C, D) or encoder=.")
        text_features = prompt_text_features(encoder)
    dtype = _image_dtype(resolved)
    if method == "zero":
        from .zero import ZeroAdapter

        return ZeroAdapter(model, text_features, resolved.selection, resolved.zero_votes, dtype)
    if method == "tda":
        from .tda import TDAAdapter

        return TDAAdapter(model, text_features, resolved.tda_alpha, resolved.tda_beta, resolved.selection, dtype)
    from .mta import MTAAdapter

    return MTAAdapter(model, text_features, dtype)


def _prompt_tuner(config: TTAConfig, model: nn.Module, encoder: PromptedTextEncoder) -> Adapter:
    from .ctpt import CTPTTuner
    from .tpt import PromptTuner, TPTAdapter, TPTConfig

    tpt = TPTConfig(
        n_views=config.views,
        selection=config.selection,
        steps=config.steps,
        lr=config.lr,
        tune=config.tune,
        amp=config.fp16,
        image_dtype=config.image_dtype,
    )
    if config.batch > 1:
        from .batched import BatchedTPTAdapter

        return BatchedTPTAdapter(model, encoder, tpt, config.ctpt_lambda if config.method == "ctpt" else None)
    if config.method == "ctpt":
        return TPTAdapter(CTPTTuner(model, encoder, tpt, config.ctpt_lambda))
    return TPTAdapter(PromptTuner(model, encoder, tpt))
