"""TPS (Sui et al., arXiv 2403.12952): per-class shifts of the normalised prototypes, one AdamW step
per image, reset after it (TTA2.md §10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..declare import Method, ViewRecipe, register
from . import common


@dataclass(frozen=True)
class TPSSettings:
    views: int = common.views(64)
    selection: float = common.selection(0.1)
    steps: int = common.steps()
    lr: float = common.lr(5e-3, "5e-3 (published for the ImageNet family; unpublished elsewhere)")
    augmix: bool = common.augmix(common.fine_grained, "on outside the ImageNet family")
    batch: int = common.batch()


def _build(settings: TPSSettings, model: Any, *, text_features: Any, fp16: bool = False, image_dtype: Any = None,
           **_: Any) -> Any:
    from ..tps import TPSAdapter

    return TPSAdapter(model, text_features, lr=settings.lr, fraction=settings.selection, steps=settings.steps,
                      fp16=fp16, image_dtype=image_dtype)


TPS = register(Method(
    name="tps",
    title="TPS (Sui et al., 2024)",
    settings=TPSSettings,
    online=False,
    views=lambda s: ViewRecipe(s.views, s.augmix),
    build=_build,
    check=lambda given, context: common.check_views_in_flight(given),
    departures=("the learning rate outside the ImageNet family is not published: 5e-3 (the code's default) unless "
                "--tta-lr is given (TTA-VLM uses 1e-3 there)",),
))
