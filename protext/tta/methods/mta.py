"""MTA (Zanella & Ben Ayed, CVPR'24): the mode of the views' features, weighed by inlierness (TTA.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..declare import Context, Method, TTAConfigError, ViewRecipe, register
from ..published import NEIGHBOURS, fewest_views_with_a_neighbour, neighbour_count  # noqa: F401  (re-exported)
from . import common


@dataclass(frozen=True)
class MTASettings:
    views: int = common.views(64)
    batch: int = common.batch()


def _check(given: Mapping[str, Any], context: Optional[Context]) -> None:
    common.check_views_in_flight(given)
    views = given.get("views")
    if views is not None and views > 1 and neighbour_count(views) < 1:
        fewest = fewest_views_with_a_neighbour()
        raise TTAConfigError(
            f"--tta mta needs --tta-views 1 or at least {fewest}, got {views}: its kernel bandwidth averages the "
            f"distances to the nearest 30% of the other views, which is no view with 2 to {fewest - 1} (published: 64).")


def _build(settings: MTASettings, model: Any, *, text_features: Any, image_dtype: Any = None, **_: Any) -> Any:
    from ..mta import MTAAdapter

    return MTAAdapter(model, text_features, image_dtype)


MTA = register(Method(
    name="mta",
    title="MTA (Zanella & Ben Ayed, CVPR'24)",
    settings=MTASettings,
    online=False,
    views=lambda s: ViewRecipe(s.views, False),
    build=_build,
    check=_check,
))
