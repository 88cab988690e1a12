"""The learning-rate schedule of ALGORITHMS.md §3 and the presets of PRESETS.md."""

from __future__ import annotations

import math
import re

import pytest
import torch

from protext.presets import CROSS_DATASET_TEMPLATES, PRESETS, cross_dataset_template, get_preset
from protext.schedule import WarmupCosine


def closed_form(e: int, base: float, epochs: int, warmup: int) -> float:
    """§3 written out: 1e-5 during warm-up, then base·½·(1+cos(π(e−W)/E))."""
    return 1e-5 if e < warmup else base * 0.5 * (1 + math.cos(math.pi * (e - warmup) / epochs))


@pytest.mark.parametrize("base,epochs,warmup", [(0.03, 10, 5), (0.0025, 200, 5), (0.03, 30, 5), (0.002, 7, 0), (0.1, 3, 5)])
def test_every_epoch_matches_closed_form(base, epochs, warmup):
    sched = WarmupCosine(base, epochs, warmup)
    rates = sched.rates()
    assert len(rates) == epochs
    for e, rate in enumerate(rates):
        assert rate == pytest.approx(closed_form(e, base, epochs, warmup), rel=1e-12, abs=0)


def test_cosine_runs_over_all_epochs_and_never_reaches_zero():
    sched = WarmupCosine(0.03, 10, 5)
    assert sched.lr(4) == 1e-5
    assert sched.lr(5) == 0.03  # the cosine starts at the base rate right after warm-up
    last = sched.lr(9)
    assert last == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 4 / 10)))
    assert last > 0.01  # over E, not E − W: far from zero at the end


def test_apply_sets_every_group_and_returns_the_rate():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    rate = WarmupCosine(0.5, 8, 2).apply(opt, 3)
    assert rate == pytest.approx(closed_form(3, 0.5, 8, 2))
    assert all(g["lr"] == rate for g in opt.param_groups)


@pytest.mark.parametrize("kwargs", [dict(base_lr=0.1, epochs=0), dict(base_lr=-1, epochs=3), dict(base_lr=0.1, epochs=3, warmup_epochs=-1)])
def test_invalid_schedules_are_refused(kwargs):
    with pytest.raises(ValueError):
        WarmupCosine(**kwargs)


def _table_rows(text: str, heading_start: str) -> list[list[str]]:
    section = text[text.index(heading_start):]
    rows = []
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_presets_are_the_published_table(shared_dir):
    """Every row of PRESETS.md's table, read from the file itself, is a preset with its values."""
    text = (shared_dir / "design" / "PRESETS.md").read_text()
    rows = _table_rows(text, "| setting | dataset |")
    setting = None
    seen = set()
    for cells in rows:
        label, dataset, n_ctx, lr, epochs, cupl = cells
        if label:
            setting = "cross_dataset" if label.startswith("cross") else "text_only" if label.startswith("text-only") else "base2novel"
        name = "cross_dataset" if setting == "cross_dataset" else f"{setting}/{dataset}"
        preset = get_preset(name)
        assert (preset.dataset, preset.n_ctx, preset.lr, preset.epochs) == (dataset, int(n_ctx), float(lr), int(epochs)), name
        assert preset.cupl_file.startswith(cupl + "_prompts"), name
        assert (shared_dir / "cupl" / preset.cupl_file).is_file()
        assert (shared_dir / "classnames" / preset.classnames_file).is_file()
        seen.add(name)
    assert seen == set(PRESETS) and len(seen) == 23


def test_common_values_and_base2novel_split():
    for preset in PRESETS.values():
        assert (preset.depth, preset.batch_size, preset.warmup_epochs, preset.warmup_lr) == (9, 256, 5, 1e-5)
        assert (preset.ctx_init, preset.loss, preset.loss_weight) == ("a photo of a", "mse", 1000.0)
        assert preset.betas == (0.9, 0.98) and preset.weight_decay == 0.1
        assert preset.split == ("base" if preset.setting == "base2novel" else "all")


def test_cross_dataset_templates(shared_dir):
    text = (shared_dir / "design" / "PRESETS.md").read_text()
    for dataset, template in _table_rows(text, "| dataset | template |"):
        template = template.strip("`")
        if dataset.startswith("all others"):
            assert cross_dataset_template("imagenet") == template == cross_dataset_template("sun397")
        else:
            assert CROSS_DATASET_TEMPLATES[dataset] == template


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match=re.escape("text_only/dtd")):
        get_preset("text_only/textures")


def test_resolve_applies_overrides_over_the_preset():
    from protext.presets import resolve

    plain = resolve(None, {})
    assert (plain.n_ctx, plain.lr, plain.epochs, plain.split, plain.preset_values) == (4, 0.03, 10, "all", {})
    b2n = resolve("base2novel/dtd", {"epochs": 3, "ctx_init": "none", "lr": None})
    assert (b2n.n_ctx, b2n.lr, b2n.epochs, b2n.ctx_init, b2n.split) == (4, 0.03, 3, None, "base")
    assert b2n.preset_values["epochs"] == 200 and b2n.trains_nothing  # 3 epochs <= 5 warm-up epochs
    assert resolve("text_only/dtd", {"split": "novel"}).split == "novel"
    assert resolve(None, {"loss": "l1"}).loss_weight == 1.0  # the published factor of the loss asked for
    assert resolve(None, {"loss": "l1", "loss_weight": 4.0}).loss_weight == 4.0
    assert not resolve(None, {"epochs": 6}).trains_nothing


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"n_ctx": 0}, "--n-ctx must be at least 1"),
        ({"warmup_epochs": -1}, "--warmup-epochs must be 0 or more"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"loss": "huber"}, "--loss must be one of mse, l1"),
        ({"width": 3}, "cannot override width"),
    ],
)
def test_resolve_errors_name_the_flag(overrides, message):
    from protext.errors import UserError
    from protext.presets import resolve

    with pytest.raises(UserError, match=re.escape(message)):
        resolve(None, overrides)


# ---- written against surviving mutants (mutmut): bad schedules name the value that is wrong


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_lr": 0.03, "epochs": 0}, "epochs must be at least 1, got 0."),
        ({"base_lr": 0.03, "epochs": 5, "warmup_epochs": -1}, "warmup epochs must be >= 0, got -1."),
        ({"base_lr": 0.0, "epochs": 5}, "learning rates must be positive (lr 0.0, warm-up lr 1e-05)."),
        ({"base_lr": 0.03, "epochs": 5, "warmup_lr": -1.0}, "learning rates must be positive (lr 0.03, warm-up lr -1.0)."),
        ({"base_lr": 0.03, "epochs": 5, "warmup_lr": 0.0}, "learning rates must be positive (lr 0.03, warm-up lr 0.0)."),
    ],
)
def test_bad_schedules_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError) as info:
        WarmupCosine(**kwargs)
    assert str(info.value) == message


def test_negative_epoch_is_refused():
    with pytest.raises(ValueError) as info:
        WarmupCosine(base_lr=0.03, epochs=5).lr(-1)
    assert str(info.value) == "epoch must be >= 0, got -1."
