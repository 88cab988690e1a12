"""Deprecated location: TPT lives in :mod:`protext.tta.tpt`; prompts to tune come from
:func:`protext.checkpoint.class_encoder`. Kept so old imports keep working."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from .checkpoint import PromptCheckpoint, class_encoder
from .prompts import DEFAULT_CTX_INIT, PromptedTextEncoder
from .tta.selection import marginal_entropy, n_confident, select_confident, view_entropy  # noqa: F401
from .tta.tpt import *  # noqa: F401,F403
from .tta.tpt import TPT_INITS, TPT_TUNE, PromptTuner, TPTConfig, TPTOutput, image_generator  # noqa: F401


def context_template(template: str, ctx_init: Optional[str]) -> str:
    """Deprecated: :func:`protext.checkpoint.class_encoder` drops the phrase the context replaced."""
    if ctx_init is None and template.lower().startswith(DEFAULT_CTX_INIT):
        return template[len(DEFAULT_CTX_INIT) :].lstrip()
    return template


def handcrafted_encoder(model: nn.Module, tokenizer, classnames: Sequence[str], template: str) -> PromptedTextEncoder:
    """Deprecated: ``class_encoder(model, tokenizer, classnames, template)``."""
    return class_encoder(model, tokenizer, classnames, template)


def checkpoint_encoder(
    checkpoint: PromptCheckpoint, model: nn.Module, tokenizer, classnames: Sequence[str], template: str
) -> PromptedTextEncoder:
    """Deprecated: ``class_encoder(model, tokenizer, classnames, template, checkpoint)``."""
    return class_encoder(model, tokenizer, classnames, template, checkpoint)
