"""TDA (Karmanov et al., CVPR'24): a training-free positive and negative cache over the stream (TTA.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..declare import Context, Method, TTAConfigError, ViewRecipe, option, per_dataset, register
from ..published import TDA_NEGATIVE, TDA_POSITIVE  # noqa: F401  (TDA_NEGATIVE re-exported)
from . import common

STREAM_UPDATES = ("image", "batch")
"""How ``--stream-runs`` feeds a batch of its orders to a method whose step splits into a write and a
read-out: ``image`` (each image updates the state, then is predicted) or ``batch`` (OGA, TTA2.md
§11.1: the whole batch updates the state, then each of its images is predicted)."""


def stream_update() -> Any:
    """The ``--stream-update`` option, declared alike by every method with the write/read split
    (TDA here, DMN-ZS in :mod:`.dmn`); the others refuse the flag."""
    return option("--stream-update", "How --stream-runs feeds each batch of 32: image (each image updates the state, "
                  "then is predicted) or batch (OGA's rule: the whole batch updates the state, then each of its images "
                  "is predicted, so a batch's later images act on its earlier ones); batch needs --stream-runs.",
                  type=str, choices=STREAM_UPDATES, default="image", shown="image", metavar="RULE")


@dataclass(frozen=True)
class TDASettings:
    views: int = common.views(lambda c: 64 if common.natural_shift(c) else 1, "1; 64 on ImageNet-A/-V2/-R/-Sketch")
    selection: float = common.selection(0.1)
    augmix: bool = common.augmix(common.natural_shift, "on ImageNet-A/-V2/-R/-Sketch")
    tda_alpha: float = option("--tda-alpha", "TDA's positive-cache weight alpha.", low=0.0, metavar="A",
                              default=per_dataset({k: v[0] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")
    tda_beta: float = option("--tda-beta", "TDA's positive-cache sharpness beta.", low=0.0, low_open=True, metavar="B",
                             default=per_dataset({k: v[1] for k, v in TDA_POSITIVE.items()}), shown="published per dataset")
    tda_positive_shots: int = option("--tda-positive-shots", "Entries per class of TDA's positive cache (TDA's "
                                     "published 3; OGA's runs use 5).", type=int, default=3, shown="3", low=1,
                                     high=10_000, metavar="N")
    tda_negative_shots: int = option("--tda-negative-shots", "Entries per class of TDA's negative cache (TDA's "
                                     "published 2; OGA's runs use 3).", type=int, default=2, shown="2", low=1,
                                     high=10_000, metavar="N")
    stream_update: str = stream_update()


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

    return TDAAdapter(model, text_features, settings.tda_alpha, settings.tda_beta, settings.selection, image_dtype,
                      positive_shots=settings.tda_positive_shots, negative_shots=settings.tda_negative_shots)


TDA = register(Method(
    name="tda",
    title="TDA (Karmanov et al., CVPR'24)",
    settings=TDASettings,
    online=True,
    views=lambda s: ViewRecipe(s.views, s.augmix),
    build=_build,
    check=lambda given, context: check_pair("tda", given, context),
))
