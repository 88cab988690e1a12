"""TPT (Shu et al., NeurIPS'22): tune the prompts on each image's confident views, reset after it
(ALGORITHMS.md §5). C-TPT and O-TPT are TPT with one more loss term and reuse this builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..declare import Context, Method, TTAConfigError, ViewRecipe, register
from . import common


@dataclass(frozen=True)
class TPTSettings:
    views: int = common.views(64)
    selection: float = common.selection(0.1)
    steps: int = common.steps()
    lr: float = common.lr()
    tune: str = common.tune()
    augmix: bool = common.augmix(common.fine_grained, "on outside the ImageNet family")
    batch: int = common.batch()
    naive: bool = common.naive()


def prompt_tuner_views(settings: Any) -> ViewRecipe:
    return ViewRecipe(settings.views, settings.augmix)


def check_prompt_tuner(name: str, given: Mapping[str, Any], context: Optional[Context]) -> None:
    """The rules every prompt tuner shares."""
    common.check_not_naive(given)
    common.check_views_in_flight(given)
    if context is not None and context.fp16 and (given.get("batch") or 1) > 1:
        # one gradient scaler for the batch would skip every image's step when one overflows
        which = "tpt/ctpt" if name in ("tpt", "ctpt") else name
        raise TTAConfigError(f"--tta-batch with --precision fp16 is not supported for --tta {which}; use one or the other.")


def build_prompt_tuner(settings: Any, model: Any, *, encoder: Any = None, fp16: bool = False,
                       image_dtype: Any = None, regulariser: Optional[tuple[str, float]] = None, **_: Any) -> Any:
    """TPT's adapter; ``regulariser`` is ``("ctpt", λ)`` or ``("otpt", λ)`` for C-TPT and O-TPT."""
    if encoder is None:
        raise ValueError("a prompt-tuning method needs encoder=PromptedTextEncoder (the prompts it tunes).")
    from ..tpt import PromptTuner, TPTAdapter, TPTConfig

    config = TPTConfig(n_views=settings.views, selection=settings.selection, steps=settings.steps, lr=settings.lr,
                       tune=settings.tune, amp=fp16, image_dtype=image_dtype)
    kind, lam = regulariser if regulariser is not None else (None, None)
    if settings.batch > 1:
        from ..batched import BatchedTPTAdapter

        return BatchedTPTAdapter(model, encoder, config, lam, regulariser=kind)
    if kind == "ctpt":
        from ..ctpt import CTPTTuner

        return TPTAdapter(CTPTTuner(model, encoder, config, lam))
    if kind == "otpt":
        from ..otpt import OTPTTuner

        return TPTAdapter(OTPTTuner(model, encoder, config, lam))
    return TPTAdapter(PromptTuner(model, encoder, config))


def _build(settings: TPTSettings, model: Any, **kwargs: Any) -> Any:
    return build_prompt_tuner(settings, model, **kwargs)


TPT = register(Method(
    name="tpt",
    title="TPT (Shu et al., NeurIPS'22)",
    settings=TPTSettings,
    online=False,
    tunes_prompts=True,
    views=prompt_tuner_views,
    build=_build,
    check=lambda given, context: check_prompt_tuner("tpt", given, context),
))
