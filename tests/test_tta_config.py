"""TTAConfig: published per-dataset defaults (typed from TTA.md) and one-line errors naming the flag."""

from __future__ import annotations

import pytest

from protext.errors import UserError
from protext.tta import METHODS, TTAConfig, TTAConfigError


def test_methods_and_error_family():
    assert METHODS[:2] == ("tpt", "ctpt") and {"zero", "tda", "mta", "dmn", "dpe", "boost", "otpt", "tps"} <= set(METHODS)
    assert issubclass(TTAConfigError, UserError)


# (alpha+, beta+) per dataset, TTA.md §3.6
TDA_TABLE = {
    "imagenet": (2, 5), "imagenet_a": (2, 5), "imagenet_v2": (1, 8), "imagenet_r": (1, 8),
    "imagenet_sketch": (2.363, 7.45), "caltech101": (5, 5), "dtd": (2, 3), "eurosat": (4, 8),
    "fgvc_aircraft": (2, 2), "food101": (1, 1), "oxford_flowers": (1, 5), "oxford_pets": (2, 7),
    "stanford_cars": (1, 7), "sun397": (2, 3), "ucf101": (3, 8),
}
SHIFTS = {"imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"}


@pytest.mark.parametrize("dataset", sorted(TDA_TABLE))
def test_published_defaults(dataset):
    shift = dataset in SHIFTS
    tda = TTAConfig(method="tda").resolved(dataset)
    assert (tda.tda_alpha, tda.tda_beta) == TDA_TABLE[dataset]
    assert tda.views == (64 if shift else 1) and tda.augmix == shift and tda.selection == 0.1
    ctpt = TTAConfig(method="ctpt").resolved(dataset)
    assert ctpt.ctpt_lambda == (20 if shift else 50) and ctpt.steps == 1 and ctpt.views == 64
    tpt = TTAConfig(method="tpt").resolved(dataset)
    assert tpt.augmix == (not dataset.startswith("imagenet")) and tpt.selection == 0.1 and tpt.lr == 5e-3
    assert ctpt.augmix == tpt.augmix  # C-TPT's natural-shift AugMix is a flag, off by default
    zero = TTAConfig(method="zero").resolved(dataset)
    assert zero.views == 64 and zero.selection == 0.3 and zero.augmix is False and zero.zero_votes == "hard"
    mta = TTAConfig(method="mta").resolved(dataset)
    assert mta.views == 64 and mta.augmix is False and mta.selection is None


def test_aliases_and_overrides():
    assert TTAConfig(method="tda").resolved("ImageNet-Sketch").tda_alpha == 2.363
    cfg = TTAConfig(method="tda", tda_alpha=0.5, tda_beta=9.0, views=64).resolved("folder")
    assert (cfg.tda_alpha, cfg.tda_beta, cfg.views) == (0.5, 9.0, 64)
    assert TTAConfig(method="ctpt", ctpt_lambda=7.0, augmix=True).resolved("imagenet_r").augmix is True
    assert TTAConfig(method="ctpt", ctpt_lambda=7.0).resolved("imagenet_r").ctpt_lambda == 7.0


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"method": "nope"}, "--tta "),
        ({"views": 0}, "--tta-views"),
        ({"selection": 0.0}, "--tta-selection"),
        ({"selection": 1.5}, "--tta-selection"),
        ({"steps": -1}, "--tta-steps"),
        ({"lr": 0.0}, "--tta-lr"),
        ({"tune": "deep"}, "--tta-tune"),
        ({"method": "zero", "steps": 1}, "--tta-steps"),
        ({"method": "mta", "steps": 2}, "--tta-steps"),
        ({"method": "tda", "batch": 4}, "--tta-batch"),
        ({"batch": 0}, "--tta-batch"),
        ({"method": "ctpt", "ctpt_lambda": -1.0}, "--ctpt-lambda"),
        ({"method": "ctpt", "ctpt_lambda": float("inf")}, "--ctpt-lambda"),
        ({"method": "tpt", "ctpt_lambda": 5.0}, "--ctpt-lambda"),
        ({"method": "tda", "tda_alpha": -1.0, "tda_beta": 5.0}, "--tda-alpha"),
        ({"method": "tda", "tda_alpha": 1.0, "tda_beta": 0.0}, "--tda-beta"),
        ({"method": "tda", "tda_alpha": 1.0}, "--tda-alpha"),
        ({"method": "zero", "tda_alpha": 1.0, "tda_beta": 1.0}, "--tda-alpha"),
        ({"method": "zero", "zero_votes": "soft"}, "--zero-votes"),
        ({"method": "tpt", "zero_votes": "fp16"}, "--zero-votes"),
        ({"method": "mta", "naive": True}, "--tta-naive"),
        ({"method": "tpt", "naive": True}, "--tta-naive"),
        ({"method": "mta", "selection": 0.2}, "--tta-selection"),
        ({"method": "mta", "views": 2}, "--tta-views"),
        ({"method": "mta", "views": 4}, "--tta-views"),
        ({"method": "tpt", "batch": 2, "fp16": True}, "--tta-batch"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(TTAConfigError, match=flag.replace("-", r"\-")) as err:
        TTAConfig(**kwargs).validate("dtd")
    assert "\n" not in str(err.value)


def test_mta_view_counts_with_a_bandwidth_are_accepted():
    """floor(0.3 (n - 1)) nearest views: 1 at n = 5 (one view is its own mode, with no bandwidth)."""
    for views in (1, 5, 64):
        TTAConfig(method="mta", views=views).validate("dtd")
    TTAConfig(method="zero", views=3).validate("dtd")  # the limit is MTA's own


def test_tda_without_published_pair_asks_for_flags():
    with pytest.raises(TTAConfigError, match="--tda-alpha and --tda-beta"):
        TTAConfig(method="tda").validate("my_folder")
    TTAConfig(method="tda", tda_alpha=1.0, tda_beta=2.0).validate("my_folder")


def test_build_adapter_refusals(tiny_clip):
    import torch

    from protext.tta import build_adapter

    features = torch.randn(3, 32)
    with pytest.raises(TTAConfigError, match="--tta-steps"):  # validated before anything is built
        build_adapter(TTAConfig(method="mta", steps=1), tiny_clip.model, "dtd", text_features=features)
    with pytest.raises(ValueError, match="encoder"):
        build_adapter(TTAConfig(method="tpt"), tiny_clip.model, "dtd", text_features=features)
    with pytest.raises(ValueError, match="class features"):
        build_adapter(TTAConfig(method="tda"), tiny_clip.model, "dtd")
    adapter = build_adapter(TTAConfig(method="tda"), tiny_clip, "dtd", text_features=features)  # a LoadedClip works too
    assert adapter.online and adapter.state_dict()["seen"] == 0
    episodic = build_adapter(TTAConfig(method="mta"), tiny_clip, "dtd", text_features=features)
    assert not episodic.online and episodic.state_dict() == {}
