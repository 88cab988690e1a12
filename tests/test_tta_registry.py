"""The TTA registry: an option's checks and words, defaults per dataset, what a method takes, the
record, and the rule that one flag means one thing everywhere (all without torch)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from protext.tta import registry
from protext.tta.registry import NO_DEFAULT, Context, Method, Option, TTAConfigError, ViewRecipe, option, per_dataset


@pytest.mark.parametrize(
    "opt,good,bad",
    [
        (Option("--n", "", type=int, low=1, high=4), [1, 4], [0, 5, 2.0, True, "3"]),
        (Option("--p", "", low=0.0, high=1.0, low_open=True), [1e-9, 1.0, 1], [0.0, 1.0000001, math.nan, math.inf, "x", False]),
        (Option("--w", "", low=0.0), [0.0, 1e9], [-1e-9, math.inf, -math.inf]),
        (Option("--b", "", low=0.0, low_open=True), [1e-12], [0.0, -1.0]),
        (Option("--s", "", type=str, choices=("a", "b")), ["a", "b"], ["c", ""]),
        (Option("--f", "", type=bool), [True, False], [1, 0, "yes", None]),
        (Option("--h", "", high=2.0), [-5.0, 2.0], [2.5]),
    ],
)
def test_an_option_accepts_its_range_and_refuses_the_rest_naming_its_flag(opt, good, bad):
    for value in good:
        opt.check(value)
    for value in bad:
        with pytest.raises(TTAConfigError, match=opt.flag) as err:
            opt.check(value)
        assert "\n" not in str(err.value)


def test_ranges_in_words():
    assert Option("--n", "", type=int, low=1, high=4).range_text() == "between 1 and 4"
    assert Option("--p", "", low=0.0, high=1.0, low_open=True).range_text() == "in (0, 1]"
    assert Option("--p", "", low=0.5, high=1.5).range_text() == "in [0.5, 1.5]"
    assert Option("--w", "", low=0.0).range_text() == "a finite number >= 0"
    assert Option("--b", "", low=0.0, low_open=True).range_text() == "a finite number > 0"
    assert Option("--k", "", type=int, low=3).range_text() == "a whole number >= 3"
    assert Option("--h", "", high=2.0).range_text() == "a finite number <= 2"
    assert Option("--x", "").range_text() == "a finite number"
    with pytest.raises(TTAConfigError, match=r"--n must be between 1 and 4, got 9\."):
        Option("--n", "", type=int, low=1, high=4).check(9)


def test_messages_list_the_choices():
    with pytest.raises(TTAConfigError, match=r"^--s must be one of a, b, got 'c'\.$"):
        Option("--s", "", type=str, choices=("a", "b")).check("c")
    with pytest.raises(TTAConfigError, match=r"^--tta must be one of tpt, ctpt, otpt, zero, tda, mta, dmn, "):
        registry.get("nope")


def test_a_settings_field_is_not_given_until_resolved_and_has_help():
    for name in registry.names():
        method = registry.get(name)
        empty = method.settings()  # every field defaults to None: "not given"
        assert all(getattr(empty, f.name) is None for f in dataclasses.fields(empty))
        assert all(opt.help and opt.flag.startswith("--") for _, opt in registry.options(method)), name


def test_defaults_constant_callable_and_per_dataset():
    ctx = Context("dtd", "DTD")
    assert Option("--a", "", default=3.0).resolve(ctx) == 3.0
    assert Option("--a", "", default=lambda c: c.dataset.upper()).resolve(ctx) == "DTD"
    table = per_dataset({"dtd": 1.5, "eurosat": 2.5})
    assert table(ctx) == 1.5 and table(Context("eurosat")) == 2.5 and table(Context("x")) is NO_DEFAULT
    assert per_dataset({"dtd": 1}, fallback=7)(Context("x")) == 7
    assert table.table == {"dtd": 1.5, "eurosat": 2.5}


def test_dest_and_dataset_keys():
    assert registry.dest("--tda-alpha") == "tda_alpha" and registry.dest("--augmix") == "augmix"
    assert registry.dataset_key("ImageNet-A") == "imagenet_a" and registry.dataset_key("My Folder") == "my_folder"
    assert registry.dataset_key(" My-Own-Set ") == "my_own_set"
    ctx = registry.context("Oxford-Pets", fp16=True)
    assert (ctx.dataset, ctx.dataset_name, ctx.fp16) == ("oxford_pets", "Oxford-Pets", True)


def test_every_declared_method_resolves_and_records_its_views():
    names = registry.names()
    assert names[:3] == ("tpt", "ctpt", "otpt") and {"zero", "tda", "mta", "dmn", "dmn-oracle", "dpe", "boost", "tps"} <= set(names)
    for name in names:
        method = registry.get(name)
        settings = registry.resolve(name, {}, registry.context("imagenet_r"))
        record = registry.record(name, settings)
        recipe = method.views(settings)
        assert record["views"] == recipe.views and record["augmix"] == recipe.augmix
        assert ("crop_scale" in record) == (recipe.crop_scale != (0.08, 1.0))
        assert all(getattr(settings, f.name) is not None for f in dataclasses.fields(settings)), name


def test_resolve_checks_what_a_method_takes_and_fills_the_rest():
    with pytest.raises(TTAConfigError, match=r"^--dpe-align does not apply to --tta tda \(it is for --tta dpe\); drop it\.$"):
        registry.resolve("tda", {"dpe_align": 0.1}, registry.context("dtd"))
    with pytest.raises(TTAConfigError, match=r"^--no-such-flag does not apply to --tta tda; drop it\.$"):
        registry.check_given("tda", {"no_such_flag": 1})
    with pytest.raises(TTAConfigError, match="--tta must be one of"):
        registry.get("nope")
    settings = registry.resolve("tda", {"tta_views": 3, "tda_alpha": None, "tda_beta": None}, registry.context("eurosat"))
    assert (settings.views, settings.tda_alpha, settings.tda_beta) == (3, 4.0, 8.0)
    given = registry.check_given("dmn", {"dmn_beta": 2.0, "tta_views": None})
    assert given == {"dmn_beta": 2.0}
    with pytest.raises(TTAConfigError, match="--dpe-align"):  # a None before it skips only itself
        registry.check_given("tda", {"tta_views": None, "dpe_align": 0.1})
    with pytest.raises(TTAConfigError, match=r"\(it is for --tta tda, boost\)"):
        registry.check_given("zero", {"tda_alpha": 1.0})
    with pytest.raises(TTAConfigError, match="--tta dpe has no published --dpe-alpha for dataset 'Mine'"):
        registry.resolve("dpe", {}, registry.context("Mine"))


def test_the_dataset_dependent_checks_wait_for_the_dataset():
    registry.check_given("tda", {})  # no dataset yet: the published pair is not asked for
    with pytest.raises(TTAConfigError, match="--tda-alpha and --tda-beta go together"):
        registry.check_given("tda", {"tda_alpha": 1.0})
    registry.check_given("tpt", {"tta_batch": 4})  # fp16 unknown without the run's context
    with pytest.raises(TTAConfigError, match="--tta-batch with --precision fp16"):
        registry.resolve("tpt", {"tta_batch": 4}, registry.context("dtd", fp16=True))
    with pytest.raises(TTAConfigError, match="for --tta otpt"):
        registry.resolve("otpt", {"tta_batch": 4}, registry.context("dtd", fp16=True))


def test_one_flag_means_one_thing_everywhere():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        views: float = option("--tta-views", "another type")

    clash = Method("clash", "", Clash, online=False, views=lambda s: ViewRecipe(1, False), build=lambda *a, **k: None)
    with pytest.raises(ValueError, match="--tta-views"):
        registry.register(clash)
    assert "clash" not in registry.names()

    @dataclasses.dataclass(frozen=True)
    class Renamed:
        n_views: int = option("--tta-views", "same flag, other field", type=int, low=1, high=1024)

    with pytest.raises(ValueError, match="--tta-views"):
        registry.register(Method("renamed", "", Renamed, online=False, views=lambda s: ViewRecipe(1, False),
                                 build=lambda *a, **k: None))


def test_a_new_method_registers_and_shares_a_flag_that_means_the_same():
    @dataclasses.dataclass(frozen=True)
    class Fresh:
        views: int = option("--tta-views", "same meaning", type=int, low=1, high=1024)
        fresh_k: int = option("--fresh-k", "its own", type=int, default=2, low=0)

    fresh = Method("fresh", "", Fresh, online=False, views=lambda s: ViewRecipe(s.views, False), build=lambda *a, **k: None)
    try:
        assert registry.register(fresh) is fresh and registry.get("fresh") is fresh
        assert registry.shared_flags()["--fresh-k"][1] == ("fresh",) and "fresh" in registry.shared_flags()["--tta-views"][1]
        settings = registry.resolve("fresh", {"tta_views": 3}, registry.context("dtd"))
        assert (settings.views, settings.fresh_k) == (3, 2) and registry.record("fresh", settings) == {"views": 3, "fresh_k": 2, "augmix": False}

        @dataclasses.dataclass(frozen=True)
        class OtherRange:
            views: int = option("--tta-views", "same name and type, other range", type=int, low=1, high=8)

        with pytest.raises(ValueError, match="--tta-views"):
            registry.register(Method("other-range", "", OtherRange, online=False, views=lambda s: ViewRecipe(1, False),
                                     build=lambda *a, **k: None))
    finally:
        registry._REGISTRY.pop("fresh", None)
    assert "fresh" not in registry.names()
    dmn = registry.record("dmn", registry.resolve("dmn", {}, registry.context("dtd")))
    assert dmn["crop_scale"] == [0.5, 1.0] and dmn["views"] == 32


def test_shared_flags_list_every_user_in_declaration_order():
    flags = registry.shared_flags()
    opt, users = flags["--tta-views"]
    assert opt.type is int and users[:3] == ("tpt", "ctpt", "otpt") and "dmn" in users
    assert flags["--dmn-beta2"][1] == ("dmn",) and flags["--tda-alpha"][1] == ("tda", "boost")


def test_the_registry_needs_no_torch():
    code = ("import sys; from protext.tta import registry; registry.resolve('dpe', {}, registry.context('dtd')); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
