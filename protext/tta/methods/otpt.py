"""O-TPT (Sharifdeen et al., CVPR'25): TPT plus λ times the non-orthogonality of the class features
(TTA2.md §9), in the O(C²) closed form (equal to the official Householder computation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..declare import Context, Method, option, register
from . import common
from .tpt import TPTSettings, build_prompt_tuner, check_prompt_tuner, prompt_tuner_views

OTPT_LAMBDA = {"default": 18.0, "natural_shift": 2.0}
"""λ: 18 on ImageNet and the fine-grained sets, 2 on A/V2/R/Sketch [otpt scripts/test_tpt_otpt_{fg,ds}.sh]."""


def _augmix(context: Context) -> bool:
    # the fine-grained script keeps TPT's rule; the natural-shift script passes --I_augmix [otpt l.411-416]
    return common.fine_grained(context) or common.natural_shift(context)


@dataclass(frozen=True)
class OTPTSettings(TPTSettings):
    """TPT's settings, O-TPT's AugMix rule and λ."""

    augmix: bool = common.augmix(_augmix, "on everywhere but ImageNet itself")
    otpt_lambda: float = option(
        "--otpt-lambda", "O-TPT's weight of the orthogonality term.", low=0.0, metavar="L",
        default=lambda c: OTPT_LAMBDA["natural_shift" if common.natural_shift(c) else "default"],
        shown="18; 2 on ImageNet-A/-V2/-R/-Sketch")


def _build(settings: OTPTSettings, model: Any, **kwargs: Any) -> Any:
    return build_prompt_tuner(settings, model, regulariser=("otpt", settings.otpt_lambda), **kwargs)


OTPT = register(Method(
    name="otpt",
    title="O-TPT (Sharifdeen et al., CVPR'25)",
    settings=OTPTSettings,
    online=False,
    tunes_prompts=True,
    views=prompt_tuner_views,
    build=_build,
    check=lambda given, context: check_prompt_tuner("otpt", given, context),
    departures=("the orthogonality term in its closed form mean_i(||g_i|| - 1), equal to the official Householder "
                "computation up to fp32 rounding (O(C^2) memory instead of O(C^3): ImageNet needs no 4 GB tensors)",),
))
