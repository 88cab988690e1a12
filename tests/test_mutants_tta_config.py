"""TTAConfig's own logic: which options count as given, the resolved copy and the record.

Written against mutants of ``protext/tta/config.py`` that ``tests/test_tta_config.py`` left alive.
Expectations are written by hand from the class docstring and the flags' names (``--tta-views`` is
kept under ``tta_views``), never computed with the module's or the registry's helpers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protext.tta import TTAConfig, TTAConfigError
from protext.tta import config as tta_config

#: the fields that are options of a method, with the flag dest each is recorded under
OPTION_DEST = {
    "views": "tta_views", "selection": "tta_selection", "steps": "tta_steps", "lr": "tta_lr", "tune": "tta_tune",
    "ctpt_lambda": "ctpt_lambda", "tda_alpha": "tda_alpha", "tda_beta": "tda_beta", "zero_votes": "zero_votes",
    "augmix": "augmix", "batch": "tta_batch", "naive": "tta_naive",
}


def test_nothing_is_given_by_default():
    assert TTAConfig().given() == {}
    # a field set to its default value is not "given" either
    assert TTAConfig(lr=5e-3, tune="all", zero_votes="hard", batch=1, naive=False).given() == {}
    assert TTAConfig(fp16=True, image_dtype=torch.bfloat16, method="zero").given() == {}  # not options


def test_given_options_are_keyed_by_flag_dest():
    config = TTAConfig(views=4, selection=0.2, steps=2, lr=1e-3, tune="shallow", ctpt_lambda=7.0, tda_alpha=1.5,
                       tda_beta=2.5, zero_votes="fp16", augmix=False, batch=2, naive=True)
    assert config.given() == {
        "tta_views": 4, "tta_selection": 0.2, "tta_steps": 2, "tta_lr": 1e-3, "tta_tune": "shallow", "ctpt_lambda": 7.0,
        "tda_alpha": 1.5, "tda_beta": 2.5, "zero_votes": "fp16", "augmix": False, "tta_batch": 2, "tta_naive": True,
    }


def test_options_join_the_fields_and_win_and_none_is_not_given():
    config = TTAConfig(views=4, options={"tta_views": 8, "dmn_beta": 5.5, "dpe_align": None})
    assert config.given() == {"tta_views": 8, "dmn_beta": 5.5}


def test_options_reach_the_checks():
    with pytest.raises(TTAConfigError, match="--dpe-align does not apply to --tta tda"):
        TTAConfig(method="tda", tda_alpha=1.0, tda_beta=1.0, options={"dpe_align": 0.2}).validate("dtd")
    with pytest.raises(TTAConfigError, match="--tta-views"):
        TTAConfig(options={"tta_views": 0}).validate("dtd")


def test_amp_is_fp16_and_online_is_the_methods():
    assert TTAConfig(fp16=True).amp is True and TTAConfig().amp is False
    for method in ("tda", "dmn", "dmn-oracle", "dpe", "boost"):
        assert TTAConfig(method=method).online is True, method
    for method in ("tpt", "ctpt", "otpt", "zero", "mta", "tps"):
        assert TTAConfig(method=method).online is False, method
    assert tta_config.EPISODIC == {"tpt", "ctpt", "otpt", "zero", "mta", "tps"}


def test_settings_read_the_dataset_and_fp16():
    # C-TPT's lambda is 20 on the natural shifts of ImageNet, 50 elsewhere (TTA.md)
    assert TTAConfig(method="ctpt").settings("imagenet_a").ctpt_lambda == 20
    assert TTAConfig(method="ctpt").settings("dtd").ctpt_lambda == 50
    TTAConfig(method="tpt", batch=2).validate("dtd")
    with pytest.raises(TTAConfigError, match="--tta-batch"):  # batched TPT is refused under fp16 only
        TTAConfig(method="tpt", batch=2, fp16=True).validate("dtd")


def test_resolved_fills_fields_and_keeps_the_rest_in_options():
    config = TTAConfig(method="dpe", fp16=True, image_dtype=torch.float16, options={"dpe_align": 0.2})
    resolved = config.resolved("dtd")
    assert resolved is not config and config.options == {"dpe_align": 0.2} and config.views is None
    assert (resolved.method, resolved.fp16, resolved.image_dtype) == ("dpe", True, torch.float16)
    assert isinstance(resolved.views, int) and resolved.views >= 1 and resolved.selection is not None
    assert resolved.options["dpe_align"] == 0.2
    assert {key for key in resolved.options if key.startswith("dpe_")} >= {"dpe_align", "dpe_alpha", "dpe_beta"}
    assert not set(resolved.options) & set(OPTION_DEST), "a field's value must not be duplicated in options"
    tda = TTAConfig(method="tda").resolved("dtd")
    assert (tda.tda_alpha, tda.tda_beta) == (2, 3)  # TTA.md §3.6: DTD's (alpha+, beta+)
    assert not set(tda.options) & set(OPTION_DEST)


def test_record_is_every_field_and_option_as_plain_values():
    record = TTAConfig(method="zero", views=16, image_dtype=torch.bfloat16, options={"dmn_beta": 5.5}).record()
    assert record == {
        "method": "zero", "views": 16, "selection": None, "steps": None, "lr": 5e-3, "tune": "all",
        "ctpt_lambda": None, "tda_alpha": None, "tda_beta": None, "zero_votes": "hard", "augmix": None, "batch": 1,
        "naive": False, "fp16": False, "image_dtype": "bfloat16", "dmn_beta": 5.5,
    }
    assert TTAConfig().record()["image_dtype"] is None
    assert TTAConfig(image_dtype=torch.float32).record()["image_dtype"] == "float32"


def test_field_flags():
    assert tta_config.FLAGS == {
        "method": "--tta", "views": "--tta-views", "selection": "--tta-selection", "steps": "--tta-steps",
        "lr": "--tta-lr", "tune": "--tta-tune", "ctpt_lambda": "--ctpt-lambda", "tda_alpha": "--tda-alpha",
        "tda_beta": "--tda-beta", "zero_votes": "--zero-votes", "augmix": "--augmix", "batch": "--tta-batch",
        "naive": "--tta-naive", "fp16": "--precision fp16",
    }
    assert {f.name for f in dataclasses.fields(TTAConfig)} == set(tta_config.FLAGS) | {"image_dtype", "options"}
