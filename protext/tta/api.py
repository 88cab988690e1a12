"""The two entry points the evaluation loop needs: a view maker and an adapter for a config."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..prompts import PromptedTextEncoder
from ..zeroshot import prompt_text_features
from . import registry
from .base import Adapter
from .config import TTAConfig
from .views import TPTViews, preprocess_settings

__all__ = ["build_adapter", "view_maker", "views_for_recipe"]


def views_for_recipe(recipe: registry.ViewRecipe, preprocess_cfg: Any = None) -> TPTViews:
    """The picklable ``(image, generator) -> Tensor[V, 3, H, W]`` of a :class:`registry.ViewRecipe`."""
    return TPTViews(n_views=recipe.views, augmix=recipe.augmix, crop_scale=recipe.crop_scale,
                    **preprocess_settings(preprocess_cfg))


def view_maker(config: TTAConfig, dataset_name: str, preprocess_cfg: Any = None) -> TPTViews:
    """The picklable ``(image, generator) -> Tensor[V, 3, H, W]`` of ``config``'s method on ``dataset_name``.

    ``preprocess_cfg`` is the model's open_clip preprocess config (``open_clip.get_model_preprocess_cfg``
    or :func:`protext.tta.views.model_preprocess_cfg`): views use its size, interpolation, resize mode,
    mean and std, so view 0 equals the model's own ``preprocess(image)``.
    """
    recipe = registry.get(config.method).views(config.settings(dataset_name))
    return views_for_recipe(recipe, preprocess_cfg)


def image_dtype(config: TTAConfig) -> Optional[torch.dtype]:
    """The precision the image tower encodes views in: fp16 under ``--precision fp16``, else the config's."""
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

    Prompt tuners (TPT, C-TPT, O-TPT) tune ``encoder``'s prompts (reset after every image); every
    other method reads fixed class features: ``text_features`` (C, D), or the features of ``encoder``
    when only that is given.

    Raises:
        protext.tta.TTAConfigError: a bad setting (see :func:`registry.resolve`).
        ValueError: the class features the method needs were not passed (a programming error).
    """
    model = getattr(model, "model", model)  # a LoadedClip works too
    settings = config.settings(dataset_name)
    method = registry.get(config.method)
    # fp16 runs on any device through protext.amp (on a CPU emulated, for checking the GPU arithmetic)
    if method.tunes_prompts:
        if encoder is None:
            raise ValueError(f"--tta {method.name} tunes prompts: build_adapter needs encoder=PromptedTextEncoder.")
        return method.build(settings, model, encoder=encoder, fp16=config.fp16, image_dtype=config.image_dtype)
    if text_features is None:
        if encoder is None:
            raise ValueError(f"--tta {method.name} needs class features: pass text_features=(C, D) or encoder=.")
        text_features = prompt_text_features(encoder)
    return method.build(settings, model, text_features=text_features, fp16=config.fp16, image_dtype=image_dtype(config),
                        dataset=registry.dataset_key(dataset_name))
