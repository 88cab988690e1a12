"""TDA (Karmanov et al., CVPR'24): a training-free positive and negative cache over the stream (TTA.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..registry import Context, Method, TTAConfigError, ViewRecipe, option, per_dataset, register
from . import common

TDA_POSITIVE: dict[str, tuple[float, float]] = {
    "imagenet": (2.0, 5.0),
    "imagenet_a": (2.0, 5.0),
    "imagenet_v2": (1.0, 8.0),
    "imagenet_r": (1.0, 8.0),
    "imagenet_sketch": (2.363, 7.45),
    "caltech101": (5.0, 5.0),
    "dtd": (2.0, 3.0),
    "eurosat": (4.0, 8.0),
    "fgvc_aircraft": (2.0, 2.0),
    "food101": (1.0, 1.0),
    "oxford_flowers": (1.0, 5.0),
    "oxford_pets": (2.0, 7.0),
    "stanford_cars": (1.0, 7.0),
    "sun397": (2.0, 3.0),
    "ucf101": (3.0, 8.0),
}
"""TDA's published positive-cache (α⁺, β⁺) per dataset (TTA.md §3.6); BoostAdapter's are the same."""
TDA_NEGATIVE: tuple[float, float] = (0.117, 1.0)
"""TDA's negative-cache (α⁻, β⁻), the same everywhere."""


@dataclass(frozen=True)
class TDASettings:
    views: int = common.views(lambda c: 64 if common.natural_shift(c) else 1, "1; 64 on ImageNet-A/-V2/-R/-Sketch")
    selection: float = common.selection(0.1)
    augmix: bool = common.augmix(common.natural_shift, "on ImageNet-A/-V2/-R/-Sketch")
    tda_alpha: float = option("--tda-alpha", "TDA's positive-cache weight alpha.", low=0.0, metavar="A",
                              default=per_dataset({k: v[0] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")
    tda_beta: float = option("--tda-beta", "TDA's positive-cache sharpness beta.", low=0.0, low_open=True, metavar="B",
                             default=per_dataset({k: v[1] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")


def check_pair(name: str, given: Mapping[str, Any], context: Optional[Context], alpha: str = "tda_alpha", beta: str = "tda_beta") -> None:
    """The positive cache's (α, β) are published together, so they are given together."""
    flags = f"--{alpha.replace('_', '-')} and --{beta.replace('_', '-')}"
    if (given.get(alpha) is None) != (given.get(beta) is None):
        raise TTAConfigError(f"{flags} go together (the positive cache's pair); pass both or neither.")
    if context is not None and given.get(alpha) is None and context.dataset not in TDA_POSITIVE:
        raise TTAConfigError(f"--tta {name} has no published (alpha, beta) for dataset "
                             f"'{context.dataset_name or context.dataset}'; pass {flags} (ImageNet's: 2 and 5).")


def _build(settings: TDASettings, model: Any, *, text_features: Any, image_dtype: Any = None, **_: Any) -> Any:
    from ..tda import TDAAdapter

    return TDAAdapter(model, text_features, settings.tda_alpha, settings.tda_beta, settings.selection, image_dtype)


TDA = register(Method(
    name="tda",
    title="TDA (Karmanov et al., CVPR'24)",
    settings=TDASettings,
    online=True,
    views=lambda s: ViewRecipe(s.views, s.augmix),
    build=_build,
    check=lambda given, context: check_pair("tda", given, context),
))
