"""Deprecated location: TPT lives in :mod:`protext.tta.tpt` (kept so old imports keep working)."""

from .tta.selection import marginal_entropy, n_confident, select_confident, view_entropy  # noqa: F401
from .tta.tpt import *  # noqa: F401,F403
from .tta.tpt import (  # noqa: F401
    TPT_INITS,
    TPT_TUNE,
    PromptTuner,
    TPTConfig,
    TPTOutput,
    checkpoint_encoder,
    context_template,
    handcrafted_encoder,
    image_generator,
)
