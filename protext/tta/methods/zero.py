"""ZERO (Farina et al., NeurIPS'24): votes of the confident views at zero temperature (TTA.md §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..declare import Method, ViewRecipe, option, register
from . import common


@dataclass(frozen=True)
class ZeroSettings:
    views: int = common.views(64)
    selection: float = common.selection(0.3)
    batch: int = common.batch()
    zero_votes: str = option(
        "--zero-votes", "ZERO's votes: hard (zero temperature) or fp16 (the published fp16 runs' soft votes).",
        type=str, default="hard", shown="hard", choices=("hard", "fp16"))


def _build(settings: ZeroSettings, model: Any, *, text_features: Any, image_dtype: Any = None, **_: Any) -> Any:
    from ..zero import ZeroAdapter

    return ZeroAdapter(model, text_features, settings.selection, settings.zero_votes, image_dtype)


ZERO = register(Method(
    name="zero",
    title="ZERO (Farina et al., NeurIPS'24)",
    settings=ZeroSettings,
    online=False,
    views=lambda s: ViewRecipe(s.views, False),
    build=_build,
    check=lambda given, context: common.check_views_in_flight(given),
))
