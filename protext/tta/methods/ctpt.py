"""C-TPT (Yoon et al., ICLR'24): TPT minus λ·ATFD, the spread of the class features (TTA.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..declare import Method, option, register
from . import common
from .tpt import TPTSettings, build_prompt_tuner, check_prompt_tuner, prompt_tuner_views

CTPT_LAMBDA = {"default": 50.0, "natural_shift": 20.0}
"""C-TPT's λ: 50 on ImageNet and the fine-grained sets, 20 on the natural shifts (TTA.md §2)."""


@dataclass(frozen=True)
class CTPTSettings(TPTSettings):
    """TPT's settings and λ."""

    ctpt_lambda: float = option(
        "--ctpt-lambda", "C-TPT's weight of the feature dispersion.", low=0.0, metavar="L",
        default=lambda c: CTPT_LAMBDA["natural_shift" if common.natural_shift(c) else "default"],
        shown="50; 20 on ImageNet-A/-V2/-R/-Sketch")


def _build(settings: CTPTSettings, model: Any, **kwargs: Any) -> Any:
    return build_prompt_tuner(settings, model, regulariser=("ctpt", settings.ctpt_lambda), **kwargs)


CTPT = register(Method(
    name="ctpt",
    title="C-TPT (Yoon et al., ICLR'24)",
    settings=CTPTSettings,
    online=False,
    tunes_prompts=True,
    views=prompt_tuner_views,
    build=_build,
    check=lambda given, context: check_prompt_tuner("ctpt", given, context),
))
