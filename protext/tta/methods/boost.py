"""BoostAdapter (Zhang et al., NeurIPS'24): TDA plus the image's own low-entropy views as temporary
cache entries, and a FIFO negative cache (TTA2.md §8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..declare import Context, Method, ViewRecipe, option, per_dataset, register
from . import common
from .tda import TDA_POSITIVE, check_pair

BOOST_DELTA: dict[str, int] = {
    "imagenet": 0, "imagenet_a": 3, "imagenet_v2": 1, "imagenet_r": 3, "imagenet_sketch": 1, "caltech101": 2,
    "dtd": 0, "eurosat": 0, "fgvc_aircraft": 2, "food101": 3, "oxford_flowers": 0, "oxford_pets": 0,
    "stanford_cars": 3, "sun397": 1, "ucf101": 0,
}
"""δ: the boosted cache holds 3 + δ entries per class [boost configs/*.yaml]; ImageNet has none (one view)."""


@dataclass(frozen=True)
class BoostSettings:
    views: int = common.views(lambda c: 1 if c.dataset == "imagenet" else 64, "64; 1 on ImageNet")
    selection: float = common.selection(0.1)
    augmix: bool = common.augmix(lambda c: False, "off")
    tda_alpha: float = option("--tda-alpha", "TDA's positive-cache weight alpha.", low=0.0, metavar="A",
                              default=per_dataset({k: v[0] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")
    tda_beta: float = option("--tda-beta", "TDA's positive-cache sharpness beta.", low=0.0, low_open=True, metavar="B",
                             default=per_dataset({k: v[1] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")
    boost_delta: int = option("--boost-delta", "Extra entries per class the image's boosting views may take.",
                              type=int, low=0, high=10_000, metavar="D", default=per_dataset(BOOST_DELTA),
                              shown="published per dataset")
    boost_query: str = option("--boost-query", "The image's query: view0 (the image itself) or selected (the mean "
                              "of its confident views).", type=str, choices=("view0", "selected"),
                              default=lambda c: "selected" if common.natural_shift(c) else "view0",
                              shown="selected on ImageNet-A/-V2/-R/-Sketch, view0 elsewhere")


def _build(settings: BoostSettings, model: Any, *, text_features: Any, image_dtype: Any = None, **_: Any) -> Any:
    from ..boost import BoostAdapter

    return BoostAdapter(model, text_features, alpha=settings.tda_alpha, beta=settings.tda_beta,
                        delta=settings.boost_delta, fraction=settings.selection, query=settings.boost_query,
                        image_dtype=image_dtype)


def _check(given: Any, context: Optional[Context]) -> None:
    check_pair("boost", given, context)


BOOST = register(Method(
    name="boost",
    title="BoostAdapter (Zhang et al., NeurIPS'24)",
    settings=BoostSettings,
    online=True,
    views=lambda s: ViewRecipe(s.views, s.augmix),
    build=_build,
    check=_check,
    departures=("fp32 throughout; the published run keeps fp16 weights",
                "the random crops are TPT's (bilinear, torchvision's bounds) rather than the vendored copy in "
                "BoostAdapter's repository; the cross-domain sets' extra CLIP preprocess of a 224 crop is a no-op",),
))
