"""Options several methods share (one flag, one meaning), and the dataset groups their defaults use.

Each factory returns a settings field; a method gives it its own default. The bounds are far above
every published setting and beyond what can finish on any machine (the views of a batch of images
go through the image tower together), so a refusal comes before an out-of-memory error.
"""

from __future__ import annotations

from typing import Any, Callable

from ..declare import Context, TTAConfigError, option

MAX_VIEWS = 1024
"""Views per image (published: 64)."""
MAX_STEPS = 1000
"""Adaptation steps per image (published: 1)."""
MAX_BATCH = 1024
"""Images adapted at once."""
MAX_VIEWS_IN_FLIGHT = 16384
"""``views x batch``: 16384 images of 224x224 are 9.9 GB of fp32 pixels before the first activation."""

NATURAL_SHIFTS: frozenset[str] = frozenset({"imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"})
"""ImageNet-A/-V2/-R/-Sketch."""
IMAGENET_FAMILY: frozenset[str] = NATURAL_SHIFTS | {"imagenet"}
"""ImageNet and its natural shifts: the published runs keep AugMix off there (TPT's rule)."""


def fine_grained(context: Context) -> bool:
    """TPT's AugMix rule (``len(set_id) > 1``): AugMix on every dataset outside the ImageNet family."""
    return context.dataset not in IMAGENET_FAMILY


def natural_shift(context: Context) -> bool:
    return context.dataset in NATURAL_SHIFTS


def views(default: Any, shown: str = "64") -> Any:
    return option("--tta-views", "Views per image, the image itself included.", type=int, default=default,
                  shown=shown, low=1, high=MAX_VIEWS, aliases=("--tpt-views",), metavar="N")


def selection(default: float) -> Any:
    return option("--tta-selection", "Share of the views kept by confidence (lowest entropy).", default=default,
                  shown=str(default), low=0.0, high=1.0, low_open=True, aliases=("--tpt-selection",), metavar="P")


def steps() -> Any:
    return option("--tta-steps", "Optimiser steps per image.", type=int, default=1, shown="1", low=0, high=MAX_STEPS,
                  aliases=("--tpt-steps",), metavar="N")


def lr(default: float = 5e-3, shown: str = "5e-3") -> Any:
    return option("--tta-lr", "AdamW learning rate of the per-image step.", default=default, shown=shown, low=0.0,
                  low_open=True, aliases=("--tpt-lr",), metavar="LR")


def augmix(default: Callable[[Context], bool], shown: str) -> Any:
    return option("--augmix", "AugMix on the random views.", type=bool, default=default, shown=shown)


def batch() -> Any:
    return option("--tta-batch", "Images adapted at once (episodic methods; results equal one at a time).", type=int,
                  default=1, shown="1", low=1, high=MAX_BATCH, metavar="B")


def tune() -> Any:
    return option("--tta-tune", "all: tune the context and the deep prompts; shallow: the context only.", type=str,
                  default="all", shown="all", choices=("all", "shallow"), aliases=("--tpt-tune",))


def naive() -> Any:
    return option("--tta-naive", "Gone: the published-style TPT path is a test reference now.", type=bool,
                  default=False, shown="off", aliases=("--tpt-naive",))


def check_views_in_flight(given: dict, flag_views: int = 64) -> None:
    """``views x batch`` bounded: they go through the image tower together."""
    views_, batch_ = given.get("views") or flag_views, given.get("batch") or 1
    if views_ * batch_ > MAX_VIEWS_IN_FLIGHT:
        raise TTAConfigError(
            f"--tta-batch {batch_} x --tta-views {views_} = {views_ * batch_} views at once, more than "
            f"{MAX_VIEWS_IN_FLIGHT} (the image tower encodes them together); lower --tta-batch.")


def check_not_naive(given: dict) -> None:
    if given.get("naive"):
        raise TTAConfigError(
            "--tta-naive is gone: the published-style TPT path is a test reference "
            "(tests/reference/tpt_reference.py; benchmarks/bench_tpt.py times it); drop the flag.")
