"""The training loop (ALGORITHMS.md §3): fast path equals the naive path; schedule, shuffling, resume."""

from __future__ import annotations

import copy
import json
import math
import re
import time

import pytest
import torch
import torch.nn.functional as F

import protext.training as training
from protext.descriptions import import_cupl, read_descriptions
from protext.prompts import PromptedTextEncoder
from protext.shared_prefix import shared_prefix_features
from protext.targets import description_targets, tokenize_descriptions
from protext.training import (
    NonFiniteLossError,
    ResumeStateError,
    TextPairs,
    TrainConfig,
    fast_batch_loss,
    train,
)
from tests.reference.training_reference import naive_batch_loss, train_naive


@pytest.fixture(scope="module")
def small_pairs(shared_dir) -> TextPairs:
    """8 DTD classes x 12 descriptions: 96 samples."""
    data = json.loads((shared_dir / "cupl" / "texture_prompts_full.json").read_text())
    return TextPairs.from_descriptions({name: data[name][:12] for name in list(data)[:8]})


@pytest.fixture(scope="module")
def small_targets(tiny_clip, small_pairs):
    return description_targets(tiny_clip.model, tiny_clip.tokenizer, small_pairs.texts, use_cache=False, progress=False)[0]


@pytest.fixture(scope="module")
def small_tokens(tiny_clip, small_pairs):
    return tokenize_descriptions(tiny_clip.tokenizer, small_pairs.texts, 77).tokens


def make_encoder(clip, pairs, seed=0, n_ctx=4, depth=2, model=None):
    torch.manual_seed(seed)
    return PromptedTextEncoder(model or clip.model, clip.tokenizer, pairs.classnames, n_ctx=n_ctx, depth=depth)


def grads_of(encoder):
    return [p.grad.detach().clone() for p in encoder.parameters()]


@pytest.mark.parametrize("n_ctx,loss,shared", [(4, "mse", True), (8, "mse", True), (4, "l1", True), (4, "mse", False)])
def test_fast_equals_naive_on_one_batch(tiny_clip, small_pairs, small_targets, small_tokens, n_ctx, loss, shared):
    """Same loss and same gradients (≤1e-5, relative to the gradient's scale in fp32)."""
    encoder = make_encoder(tiny_clip, small_pairs, n_ctx=n_ctx)
    config = TrainConfig(loss=loss, shared_prefix=shared)
    rows = torch.randperm(len(small_pairs), generator=torch.Generator().manual_seed(3))[:64]
    classes = small_pairs.class_index[rows]
    assert len(classes.unique()) < len(rows)  # repeated classes: the gather is exercised

    fast = fast_batch_loss(encoder, classes, small_targets[rows], config)
    fast.backward()
    g_fast = grads_of(encoder)
    encoder.zero_grad()
    naive = naive_batch_loss(encoder, classes, small_tokens[rows], config)
    naive.backward()
    g_naive = grads_of(encoder)

    assert fast.item() == pytest.approx(naive.item(), rel=1e-5)
    for a, b in zip(g_fast, g_naive):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("n_ctx,depth", [(4, 2), (16, 2), (4, 1), (8, 2)])
def test_shared_prefix_equals_the_plain_forward(tiny_clip, small_pairs, n_ctx, depth):
    """Computing start-of-text + context once per batch changes nothing: features and gradients."""
    encoder = make_encoder(tiny_clip, small_pairs, n_ctx=n_ctx, depth=depth)
    assert training.supports_shared_prefix(encoder)
    classes = torch.tensor([0, 2, 3, 7])
    plain = encoder(classes, truncate=True)
    plain.square().sum().backward()
    g_plain = grads_of(encoder)
    encoder.zero_grad()
    shared = training.shared_prefix_features(encoder, classes)
    shared.square().sum().backward()
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    for a, b in zip(grads_of(encoder), g_plain):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_fast_equals_naive_in_float64(tiny_clip, small_pairs, small_tokens):
    """In double precision the two paths agree to rounding: the equivalences are exact."""
    model = copy.deepcopy(tiny_clip.model).double()
    encoder = make_encoder(tiny_clip, small_pairs, model=model)
    targets = description_targets(model, tiny_clip.tokenizer, small_pairs.texts, use_cache=False, progress=False)[0]
    rows = torch.arange(0, 96, 2)
    config = TrainConfig()
    fast = fast_batch_loss(encoder, small_pairs.class_index[rows], targets[rows].double(), config)
    fast.backward()
    g_fast = grads_of(encoder)
    encoder.zero_grad()
    naive = naive_batch_loss(encoder, small_pairs.class_index[rows], small_tokens[rows], config)
    naive.backward()
    # targets are stored as fp32: allow that rounding in the loss, nothing more
    assert fast.item() == pytest.approx(naive.item(), rel=1e-6)
    for a, b in zip(g_fast, grads_of(encoder)):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_loss_is_the_published_formula(tiny_clip, small_pairs, small_targets):
    encoder = make_encoder(tiny_clip, small_pairs)
    rows = torch.arange(40)
    with torch.no_grad():
        pred = F.normalize(encoder(small_pairs.class_index[rows], truncate=False), dim=-1)
        for kind, weight, expected in [
            ("mse", None, F.mse_loss(pred, small_targets[rows]) * 1000),
            ("l1", None, F.l1_loss(pred, small_targets[rows])),
            ("l1", 7.0, F.l1_loss(pred, small_targets[rows]) * 7),
        ]:
            got = fast_batch_loss(encoder, small_pairs.class_index[rows], small_targets[rows], TrainConfig(loss=kind, loss_weight=weight))
            assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fast_and_naive_training_end_with_the_same_prompts(tiny_clip, small_pairs, small_targets, small_tokens):
    config = dict(lr=0.01, epochs=3, warmup_epochs=1, batch_size=32, seed=5)
    fast_enc = make_encoder(tiny_clip, small_pairs)
    naive_enc = make_encoder(tiny_clip, small_pairs)
    fast = train(fast_enc, small_pairs, TrainConfig(**config), targets=small_targets, progress=False)
    naive = train_naive(naive_enc, small_pairs, TrainConfig(**config), small_tokens, progress=False)
    assert [r.steps for r in fast.history] == [3, 3, 3]
    for a, b in zip(fast.history, naive.history):
        assert a.step_losses == pytest.approx(b.step_losses, rel=1e-4)
    for name, value in fast_enc.prompt_state().items():
        torch.testing.assert_close(value, naive_enc.prompt_state()[name], rtol=0, atol=1e-5)
    assert not torch.equal(fast_enc.ctx, make_encoder(tiny_clip, small_pairs).ctx)  # they did move


def test_only_prompts_are_optimised_with_adamw(tiny_clip, small_pairs, small_targets, monkeypatch):
    frozen = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    seen = {}
    real = torch.optim.AdamW

    def spy(params, **kwargs):
        params = list(params)
        seen.update(kwargs, n=len(params))
        return real(params, **kwargs)

    monkeypatch.setattr(training.torch.optim, "AdamW", spy)
    encoder = make_encoder(tiny_clip, small_pairs)
    train(encoder, small_pairs, TrainConfig(epochs=1, warmup_epochs=0, batch_size=48), targets=small_targets, progress=False)
    assert seen["n"] == 2 and seen["betas"] == (0.9, 0.98) and seen["weight_decay"] == 0.1
    for key, value in tiny_clip.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_schedule_and_batches_per_epoch(tiny_clip, small_pairs, small_targets):
    config = TrainConfig(lr=0.02, epochs=4, warmup_epochs=2, batch_size=40, seed=0)
    result = train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, progress=False)
    assert [r.lr for r in result.history] == config.schedule().rates()
    assert [r.steps for r in result.history] == [2] * 4  # 96 samples: the last 16 are dropped, as published
    kept = TrainConfig(lr=0.02, epochs=1, warmup_epochs=0, batch_size=40, drop_last=False)
    assert train(make_encoder(tiny_clip, small_pairs), small_pairs, kept, targets=small_targets, progress=False).history[0].steps == 3
    big = TrainConfig(lr=0.02, epochs=1, warmup_epochs=0, batch_size=256)  # fewer samples than a batch: one batch
    assert train(make_encoder(tiny_clip, small_pairs), small_pairs, big, targets=small_targets, progress=False).history[0].steps == 1


def test_shuffling_is_per_epoch_and_seeded(small_pairs):
    def orders(seed):
        gen = torch.Generator().manual_seed(seed)
        cfg = TrainConfig(batch_size=32, seed=seed)
        return [torch.cat(training._batches(len(small_pairs), cfg, gen)).tolist() for _ in range(3)]

    a, b, c = orders(1), orders(1), orders(2)
    assert a == b and a != c
    assert a[0] != a[1] != a[2]  # a new permutation every epoch
    assert all(sorted(o) == list(range(96)) for o in a)


def test_loss_falls_on_the_real_dtd_descriptions(tiny_clip, shared_dir, tmp_path):
    jsonl = tmp_path / "dtd.jsonl"
    assert import_cupl(shared_dir / "cupl" / "texture_prompts_full.json", jsonl) > 2000
    pairs = TextPairs.from_descriptions(read_descriptions(jsonl))
    assert len(pairs.classnames) == 47
    targets = description_targets(tiny_clip.model, tiny_clip.tokenizer, pairs.texts, cache_dir=tmp_path / "cache", progress=False)[0]
    config = TrainConfig(lr=0.03, epochs=4, warmup_epochs=1)
    result = train(make_encoder(tiny_clip, pairs), pairs, config, targets=targets, progress=False)
    losses = [r.loss for r in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses[1] > losses[2] > losses[3], losses


def test_resume_in_process_equals_uninterrupted(tiny_clip, small_pairs, small_targets, tmp_path):
    config = TrainConfig(lr=0.02, epochs=4, warmup_epochs=1, batch_size=32, seed=9)
    whole = make_encoder(tiny_clip, small_pairs)
    train(whole, small_pairs, config, targets=small_targets, progress=False)

    state = tmp_path / "run.resume.pt"
    first = make_encoder(tiny_clip, small_pairs)

    # stop during epoch 2's bookkeeping by raising from the epoch callback, as a crash would
    def crash(record, enc, history):
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(first, small_pairs, config, targets=small_targets, state_path=state, on_epoch_end=crash, progress=False)
    saved = training.load_resume_state(state)
    assert saved["epoch"] == 1  # the crash came before epoch 2's state was written
    resumed = make_encoder(tiny_clip, small_pairs)
    result = train(resumed, small_pairs, config, targets=small_targets, state_path=state, resume=True, progress=False)
    assert result.resumed_from == 1 and result.epochs_done == 4
    for name, value in whole.prompt_state().items():
        assert torch.equal(value, resumed.prompt_state()[name]), name


def test_resume_refuses_another_run(tiny_clip, small_pairs, small_targets, tmp_path):
    state = tmp_path / "run.resume.pt"
    config = TrainConfig(lr=0.02, epochs=2, warmup_epochs=1, batch_size=32)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, state_path=state, progress=False)
    other = TrainConfig(lr=0.05, epochs=2, warmup_epochs=1, batch_size=32)
    with pytest.raises(ResumeStateError, match=r"config\.lr \(saved 0\.02, now 0\.05\)"):
        train(make_encoder(tiny_clip, small_pairs), small_pairs, other, targets=small_targets, state_path=state, resume=True, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ResumeStateError, match="junk.pt"):
        training.load_resume_state(tmp_path / "junk.pt")


def test_nan_loss_stops_and_reports_the_epoch(tiny_clip, small_pairs, small_targets, monkeypatch):
    real = training.fast_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(training, "fast_batch_loss", poisoned)
    saved = []
    config = TrainConfig(lr=0.02, epochs=3, warmup_epochs=0, batch_size=32)
    with pytest.raises(NonFiniteLossError) as info:
        train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets,
              on_epoch_end=lambda r, e, h: saved.append(r.epoch), progress=False)
    assert (info.value.epoch, info.value.step) == (1, 1)
    assert saved == [0] and len(info.value.history) == 1


def test_input_checks(tiny_clip, small_pairs, small_targets):
    encoder = make_encoder(tiny_clip, small_pairs)
    with pytest.raises(ValueError, match="targets"):
        train(encoder, small_pairs, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="target rows"):
        train(encoder, small_pairs, TrainConfig(), targets=small_targets[:5], progress=False)
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA"):
        train(encoder, small_pairs, TrainConfig(precision="fp16"), targets=small_targets, progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="huber")
    with pytest.raises(ValueError, match="no descriptions"):
        TextPairs.from_descriptions({"a": []})


def test_bf16_autocast_on_cpu_trains(tiny_clip, small_pairs, small_targets):
    encoder = make_encoder(tiny_clip, small_pairs)
    config = TrainConfig(lr=0.02, epochs=2, warmup_epochs=0, batch_size=32, precision="bf16")
    result = train(encoder, small_pairs, config, targets=small_targets, progress=False)
    assert encoder.ctx.dtype == torch.float32  # prompts stay fp32
    assert result.history[-1].loss < result.history[0].step_losses[0]


def test_the_optimiser_steps_with_the_scheduled_rate(tiny_clip, small_pairs, small_targets, monkeypatch):
    """Every optimiser step sees the epoch's rate of ALGORITHMS.md §3 in its parameter group."""
    import math

    seen: list[float] = []
    real = torch.optim.AdamW

    class Spy(real):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(training.torch.optim, "AdamW", Spy)
    base, epochs, warmup = 0.02, 5, 2
    config = TrainConfig(lr=base, epochs=epochs, warmup_epochs=warmup, batch_size=48)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, progress=False)
    expected = []
    for e in range(epochs):  # 96 samples, batch 48: two steps per epoch
        rate = 1e-5 if e < warmup else base * 0.5 * (1 + math.cos(math.pi * (e - warmup) / epochs))
        expected += [rate, rate]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_a_resume_state_with_non_finite_prompts_is_refused(tiny_clip, small_pairs, small_targets, tmp_path):
    state = tmp_path / "run.resume.pt"
    config = TrainConfig(lr=0.02, epochs=1, warmup_epochs=0, batch_size=48)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, state_path=state, progress=False)
    saved = torch.load(state, weights_only=True)
    saved["prompts"]["ctx"][0, 0] = float("inf")
    torch.save(saved, state)
    with pytest.raises(ResumeStateError, match=r"run\.resume\.pt: the saved prompts hold non-finite values"):
        training.load_resume_state(state)


# --------------------------------------------------------------------------------------------------
# configuration: values, messages, presets


def test_config_errors_name_the_bad_value_and_the_choices():
    with pytest.raises(ValueError, match=r"^loss must be one of mse, l1, got 'huber'\.$"):
        TrainConfig(loss="huber")
    with pytest.raises(ValueError, match=r"^precision must be one of fp32, bf16, fp16, got 'fp8'\.$"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"^batch size must be at least 1, got 0\.$"):
        TrainConfig(batch_size=0)
    assert TrainConfig(batch_size=1).batch_size == 1  # one sample per step is a valid run
    betas = TrainConfig(betas=[1, 0.5]).betas  # a JSON list of ints becomes AdamW's float pair, in order
    assert betas == (1.0, 0.5) and all(type(b) is float for b in betas)


def test_config_as_dict_is_the_json_ready_hyper_parameters():
    """What checkpoints record: every field, betas as a list, the loss factor resolved, the optimiser named."""
    config = TrainConfig(lr=0.5, epochs=3, warmup_epochs=1, warmup_lr=0.25, batch_size=7, loss="l1", betas=(0.8, 0.95),
                         weight_decay=0.2, eps=1e-6, seed=4, precision="bf16", shared_prefix=False, drop_last=False)
    assert config.as_dict() == {
        "lr": 0.5, "epochs": 3, "warmup_epochs": 1, "warmup_lr": 0.25, "batch_size": 7, "loss": "l1",
        "loss_weight": 1.0, "betas": [0.8, 0.95], "weight_decay": 0.2, "eps": 1e-6, "seed": 4, "precision": "bf16",
        "shared_prefix": False, "drop_last": False, "optimizer": "adamw",
    }
    assert type(config.as_dict()["betas"]) is list  # JSON has no tuples; the metadata compares as written
    assert TrainConfig().as_dict()["loss_weight"] == 1000.0  # MSE x 1000 (ALGORITHMS.md §3)


def test_config_from_a_published_preset_and_from_every_setting():
    from protext.presets import Settings, resolve

    # PRESETS.md, text-only DTD: lr 0.03, 200 epochs, 5 warm-up epochs at 1e-5, batch 256, AdamW 0.9/0.98, wd 0.1, MSE x 1000
    assert TrainConfig.from_settings(resolve("text_only/dtd")) == TrainConfig(
        lr=0.03, epochs=200, warmup_epochs=5, warmup_lr=1e-5, batch_size=256, loss="mse", loss_weight=1000.0,
        betas=(0.9, 0.98), weight_decay=0.1, seed=1, precision="fp32", shared_prefix=True, drop_last=True,
    )
    # every value distinct, so a field read from the wrong setting shows
    settings = Settings(preset=None, n_ctx=4, depth=2, ctx_init=None, template="{}.", split="all", lr=0.07, epochs=9,
                        warmup_epochs=3, warmup_lr=2e-5, batch_size=17, loss="l1", loss_weight=3.0, betas=(0.8, 0.9),
                        weight_decay=0.2)
    got = TrainConfig.from_settings(settings, seed=6, precision="bf16", shared_prefix=False, drop_last=False)
    assert got == TrainConfig(lr=0.07, epochs=9, warmup_epochs=3, warmup_lr=2e-5, batch_size=17, loss="l1", loss_weight=3.0,
                              betas=(0.8, 0.9), weight_decay=0.2, seed=6, precision="bf16", shared_prefix=False,
                              drop_last=False)


def test_config_schedule_uses_every_rate_setting():
    """ALGORITHMS.md §3: W epochs at the warm-up rate, then lr * (1 + cos(pi * (e - W) / E)) / 2; none left at a default."""
    config = TrainConfig(lr=0.1, epochs=4, warmup_epochs=2, warmup_lr=3e-4)
    expected = [3e-4, 3e-4] + [0.1 * 0.5 * (1 + math.cos(math.pi * (e - 2) / 4)) for e in (2, 3)]
    assert config.schedule().rates() == pytest.approx(expected, rel=1e-12)


def test_auto_precision_is_bf16_only_on_a_cuda_device_that_supports_it(monkeypatch):
    from protext.training import TrainJobError, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for supported in (True, False):
        # the answer for a CPU run must not depend on what the machine's GPU could do
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert resolve_precision("auto", cpu) == "fp32"
        assert resolve_precision("auto", cuda) == ("bf16" if supported else "fp32")
        for name in ("fp32", "bf16", "fp16"):
            assert resolve_precision(name, cpu) == name
    with pytest.raises(TrainJobError, match=r"^--precision must be one of auto, fp32, bf16, fp16, got 'fp64'\.$"):
        resolve_precision("fp64", cpu)


def test_samples_are_every_description_in_class_order():
    pairs = TextPairs.from_descriptions({"banded": ["stripes", "bands"], "blotchy": [], "bubbly": ["foam"]})
    assert pairs.classnames == ["banded", "bubbly"]  # a class without descriptions is no class of the run
    assert pairs.class_index.dtype == torch.long and pairs.class_index.tolist() == [0, 0, 1]
    assert pairs.texts == ["stripes", "bands", "foam"] and len(pairs) == 3
    with pytest.raises(ValueError, match=r"^no descriptions to train on\.$"):
        TextPairs.from_descriptions({"a": [], "b": []})


# --------------------------------------------------------------------------------------------------
# the batch loss and the loop's bookkeeping


def test_each_distinct_class_is_encoded_once_per_batch_on_either_path(tiny_clip, small_pairs, small_targets, monkeypatch):
    """fast_batch_loss's contract: distinct classes encoded once, cut at the EOT; --no-shared-prefix skips the shared path."""
    encoder = make_encoder(tiny_clip, small_pairs)
    classes = torch.tensor([5, 1, 5, 3, 1, 1])
    calls = []
    real_forward = encoder.forward

    def forward(index, *args, **kwargs):
        calls.append((index.tolist(), kwargs.get("truncate")))
        return real_forward(index, *args, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward)
    monkeypatch.setattr(training, "shared_prefix_features", lambda *a: pytest.fail("shared path used with shared_prefix=False"))
    fast_batch_loss(encoder, classes, small_targets[:6], TrainConfig(shared_prefix=False))
    assert calls == [([1, 3, 5], True)]

    seen = []
    monkeypatch.setattr(training, "shared_prefix_features", lambda enc, idx: seen.append(idx.tolist()) or shared_prefix_features(enc, idx))
    fast_batch_loss(encoder, classes, small_targets[:6], TrainConfig(shared_prefix=True))
    assert seen == [[1, 3, 5]]


def test_input_errors_say_exactly_what_is_wrong(tiny_clip, small_pairs, small_targets):
    encoder = make_encoder(tiny_clip, small_pairs)
    other = TextPairs.from_descriptions({name: ["x"] for name in reversed(small_pairs.classnames)})
    with pytest.raises(ValueError, match=r"^the encoder's class list differs from the samples' class list\.$"):
        train(encoder, other, TrainConfig(), targets=small_targets[: len(other)], progress=False)
    with pytest.raises(ValueError, match=r"^training needs the description targets \(targets=\.\.\., see protext\.targets\)\.$"):
        train(encoder, small_pairs, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match=r"^5 target rows for 96 samples\.$"):
        train(encoder, small_pairs, TrainConfig(), targets=small_targets[:5], progress=False)
    with pytest.raises(ValueError, match=r"^fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU\.$"):
        train(encoder, small_pairs, TrainConfig(precision="fp16"), targets=small_targets, progress=False)


def test_prompts_made_non_finite_by_the_last_step_stop_the_run_at_that_step(tiny_clip, small_pairs, small_targets):
    """A finite loss whose gradient is NaN poisons the prompts; the end-of-epoch check names that step."""
    config = TrainConfig(lr=0.02, epochs=3, warmup_epochs=0, batch_size=32)  # 3 steps per epoch
    calls = {"n": 0}

    def nan_gradient_on_the_last_step_of_epoch_2(encoder, class_index, rows, cfg):
        calls["n"] += 1
        loss = fast_batch_loss(encoder, class_index, rows, cfg)
        if calls["n"] == 6:
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    with pytest.raises(NonFiniteLossError) as info:
        train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets,
              batch_loss=nan_gradient_on_the_last_step_of_epoch_2, progress=False)
    err = info.value
    assert (err.epoch, err.step) == (1, 2) and math.isnan(err.value)
    assert [r.epoch for r in err.history] == [0]
    assert str(err) == "the loss became nan at epoch 2, step 3"


def test_epoch_records_hold_the_rate_the_mean_step_loss_and_the_wall_time(tiny_clip, small_pairs, small_targets):
    config = TrainConfig(lr=0.02, epochs=3, warmup_epochs=1, batch_size=40, seed=3)
    began = time.perf_counter()
    result = train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, progress=False)
    wall = time.perf_counter() - began
    rates = [1e-5] + [0.02 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(2)]  # ALGORITHMS.md §3
    for epoch, (record, rate) in enumerate(zip(result.history, rates)):
        assert record.epoch == epoch and record.lr == pytest.approx(rate, rel=1e-12)
        assert record.steps == len(record.step_losses) == 2
        assert record.loss == pytest.approx(sum(record.step_losses) / 2, rel=1e-12)
        assert 0 < record.seconds <= wall
    assert result.final_loss == result.history[-1].loss and result.epochs_done == 3 and result.resumed_from == 0


def _screen(text: str) -> list[str]:
    """What a terminal shows after tqdm's output: each line as its last carriage-return redraw left it."""
    return [line.split("\r")[-1] for line in text.split("\n")]


def test_progress_bar_per_epoch_shows_the_running_loss_and_the_rate(tiny_clip, small_pairs, small_targets, capsys):
    config = TrainConfig(lr=0.02, epochs=2, warmup_epochs=1, batch_size=32)
    capsys.readouterr()
    result = train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets)  # progress by default
    lines = _screen(capsys.readouterr().err)
    assert len(lines) == 3 and lines[-1] == ""  # one finished bar per epoch, each left on its own line
    for line, record, rate in zip(lines, result.history, ["1e-05", "0.02"]):
        assert line.startswith(f"epoch {record.epoch + 1}/2: 100%") and " 3/3 " in line
        assert "step/s" in line or "s/step" in line
        assert line.endswith(f", loss={sum(record.step_losses) / 3:.4f}, lr={rate}]")

    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, progress=False)
    assert capsys.readouterr().err == ""


def test_epoch_hooks_see_the_record_the_encoder_and_the_history_around_the_state_save(
    tiny_clip, small_pairs, small_targets, tmp_path
):
    state = tmp_path / "run.resume.pt"
    encoder = make_encoder(tiny_clip, small_pairs)
    seen = []

    def hook(name):
        def called(record, enc, history):
            saved = training.load_resume_state(state)["epoch"] if state.exists() else 0
            seen.append((name, record.epoch, enc is encoder, [r.epoch for r in history], history[-1] is record, saved))
        return called

    config = TrainConfig(lr=0.02, epochs=2, warmup_epochs=1, batch_size=48)
    train(encoder, small_pairs, config, targets=small_targets, state_path=state, on_epoch_end=hook("end"),
          on_state_saved=hook("saved"), progress=False)
    assert seen == [
        ("end", 0, True, [0], True, 0), ("saved", 0, True, [0], True, 1),
        ("end", 1, True, [0, 1], True, 1), ("saved", 1, True, [0, 1], True, 2),
    ]


def test_adamw_gets_the_configured_rate_betas_decay_and_eps(tiny_clip, small_pairs, small_targets, monkeypatch):
    seen = {}
    real = torch.optim.AdamW

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(training.torch.optim, "AdamW", spy)
    config = TrainConfig(lr=0.02, epochs=1, warmup_epochs=0, batch_size=48, betas=(0.8, 0.9), weight_decay=0.3, eps=1e-4)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, progress=False)
    assert (seen["betas"], seen["weight_decay"], seen["eps"]) == ((0.8, 0.9), 0.3, 1e-4)


def test_bf16_autocast_changes_the_loss_and_fp32_is_exact(tiny_clip, small_pairs, small_targets):
    """fp32 trains without autocast (the first step is the published loss to rounding); bf16 really runs in bf16."""
    config = dict(lr=0.02, epochs=1, warmup_epochs=0, batch_size=32, seed=2)
    first = torch.randperm(96, generator=torch.Generator().manual_seed(2))[:32]  # the first batch of the seeded shuffle
    encoder = make_encoder(tiny_clip, small_pairs)
    with torch.no_grad():
        pred = F.normalize(encoder(small_pairs.class_index[first], truncate=False), dim=-1)
        expected = (F.mse_loss(pred, small_targets[first]) * 1000).item()
    fp32 = train(encoder, small_pairs, TrainConfig(**config), targets=small_targets, progress=False)
    bf16 = train(make_encoder(tiny_clip, small_pairs), small_pairs, TrainConfig(precision="bf16", **config),
                 targets=small_targets, progress=False)
    assert fp32.history[0].step_losses[0] == pytest.approx(expected, rel=1e-5)
    got = bf16.history[0].step_losses[0]
    assert got != pytest.approx(expected, rel=1e-5) and got == pytest.approx(expected, rel=0.05)


# --------------------------------------------------------------------------------------------------
# resume: what is saved, what is refused


def test_a_saved_state_without_resume_is_replaced_not_continued(tiny_clip, small_pairs, small_targets, tmp_path):
    state = tmp_path / "run.resume.pt"
    config = TrainConfig(lr=0.02, epochs=2, warmup_epochs=1, batch_size=48, seed=4)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, state_path=state, progress=False)
    again = make_encoder(tiny_clip, small_pairs)
    result = train(again, small_pairs, config, targets=small_targets, state_path=state, progress=False)  # resume left out
    assert result.resumed_from == 0 and [r.epoch for r in result.history] == [0, 1]
    fresh = make_encoder(tiny_clip, small_pairs)
    train(fresh, small_pairs, config, targets=small_targets, progress=False)
    for name, value in fresh.prompt_state().items():
        assert torch.equal(again.prompt_state()[name], value), name


def test_resume_restores_prompts_optimiser_and_history_value_by_value(tiny_clip, small_pairs, small_targets, tmp_path):
    """Stopped after epoch 2 of 4 and resumed: every prompt, AdamW moment and history entry as uninterrupted."""
    config = TrainConfig(lr=0.02, epochs=4, warmup_epochs=1, batch_size=40, seed=8)
    whole_enc = make_encoder(tiny_clip, small_pairs)
    whole_state = tmp_path / "whole.resume.pt"
    whole = train(whole_enc, small_pairs, config, targets=small_targets, state_path=whole_state, progress=False)

    state = tmp_path / "part.resume.pt"

    def stop_after_epoch_2(record, enc, history):
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, state_path=state,
              on_state_saved=stop_after_epoch_2, progress=False)
    resumed_enc = make_encoder(tiny_clip, small_pairs)
    resumed = train(resumed_enc, small_pairs, config, targets=small_targets, state_path=state, resume=True, progress=False)

    assert resumed.resumed_from == 2 and len(resumed.history) == 4
    for a, b in zip(resumed.history, whole.history):
        assert (a.epoch, a.lr, a.loss, a.steps, a.step_losses) == (b.epoch, b.lr, b.loss, b.steps, b.step_losses)
    for name, value in whole_enc.prompt_state().items():
        assert torch.equal(resumed_enc.prompt_state()[name], value), name
    got, want = training.load_resume_state(state), training.load_resume_state(whole_state)
    assert got["epoch"] == want["epoch"] == 4
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for index, moments in want["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(got["optimizer"]["state"][index][key], value), (index, key)
    assert torch.equal(got["shuffle_rng"], want["shuffle_rng"])
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in got["history"]] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in want["history"]
    ]


@pytest.fixture(scope="module")
def saved_state(tiny_clip, small_pairs, small_targets, tmp_path_factory):
    """The state of a finished 1-epoch run (n_ctx 4, depth 2, lr 0.02); tests copy it before changing it."""
    path = tmp_path_factory.mktemp("state") / "run.resume.pt"
    config = TrainConfig(lr=0.02, epochs=1, warmup_epochs=0, batch_size=48)
    train(make_encoder(tiny_clip, small_pairs), small_pairs, config, targets=small_targets, state_path=path, progress=False)
    return path, config


def _refusal(encoder, pairs, targets, config, state) -> str:
    with pytest.raises(ResumeStateError) as info:
        train(encoder, pairs, config, targets=targets, state_path=state, resume=True, progress=False)
    return str(info.value)


def test_resume_refusal_lists_every_difference_in_one_sentence(tiny_clip, small_pairs, small_targets, saved_state):
    state, config = saved_state
    other = TrainConfig(lr=0.05, epochs=2, warmup_epochs=0, batch_size=48)
    message = _refusal(make_encoder(tiny_clip, small_pairs), small_pairs, small_targets, other, state)
    assert message == (f"{state}: saved by a different run; it differs in config.epochs (saved 1, now 2); "
                       "config.lr (saved 0.02, now 0.05).")


@pytest.mark.parametrize("change", ["samples", "text_tower", "n_ctx", "depth", "ctx_init", "template", "width"])
def test_resume_refuses_a_run_that_differs_in_what_it_trains(tiny_clip, small_pairs, small_targets, saved_state, tmp_path, change):
    state, config = saved_state
    pairs, targets, model, kwargs = small_pairs, small_targets, tiny_clip.model, {}
    if change == "samples":  # same classes, one description different
        descriptions = {c: [t for t, i in zip(small_pairs.texts, small_pairs.class_index.tolist()) if small_pairs.classnames[i] == c]
                        for c in small_pairs.classnames}
        descriptions[small_pairs.classnames[0]][0] += " (edited)"
        pairs = TextPairs.from_descriptions(descriptions)
    elif change == "text_tower":
        model = copy.deepcopy(tiny_clip.model)
        with torch.no_grad():
            model.ln_final.weight.add_(0.01)
    elif change == "width":  # no tiny tower of another width exists: claim the saved one had one
        saved = torch.load(state, weights_only=True)
        saved["identity"]["prompts"]["width"] = 999
        state = tmp_path / "run.resume.pt"
        torch.save(saved, state)
    encoder = {
        "n_ctx": lambda: make_encoder(tiny_clip, pairs, n_ctx=8),
        "depth": lambda: make_encoder(tiny_clip, pairs, depth=1),
        "ctx_init": lambda: PromptedTextEncoder(model, tiny_clip.tokenizer, pairs.classnames, n_ctx=4, depth=2, ctx_init=None),
        "template": lambda: PromptedTextEncoder(model, tiny_clip.tokenizer, pairs.classnames, n_ctx=4, depth=2,
                                                template="{}, a type of texture."),
    }.get(change, lambda: make_encoder(tiny_clip, pairs, model=model))()
    expected = {
        "samples": r"samples \(saved '[0-9a-f]{64}', now '[0-9a-f]{64}'\)",
        "text_tower": r"text_tower \(saved '[0-9a-f]+', now '[0-9a-f]+'\)",
        "n_ctx": r"prompts\.n_ctx \(saved 4, now 8\)",
        "depth": r"prompts\.depth \(saved 2, now 1\)",
        "ctx_init": r"prompts\.ctx_init \(saved 'a photo of a', now None\)",
        "template": r"prompts\.prompts \(saved '[0-9a-f]{64}', now '[0-9a-f]{64}'\)",
        "width": rf"prompts\.width \(saved 999, now {encoder.width}\)",
    }[change]
    message = _refusal(encoder, pairs, targets, config, state)
    assert re.search(r"differs in (.*; )?" + expected + r"(; .*)?\.$", message), message


def test_resume_refuses_a_state_whose_identity_lacks_a_field(tiny_clip, small_pairs, small_targets, saved_state, tmp_path):
    """A state missing a field (an older format) or its whole identity is another run, never silently accepted."""
    state, config = saved_state
    saved = torch.load(state, weights_only=True)
    del saved["identity"]["config"]["eps"]
    torch.save(saved, tmp_path / "a.pt")
    message = _refusal(make_encoder(tiny_clip, small_pairs), small_pairs, small_targets, config, tmp_path / "a.pt")
    assert message.endswith("differs in config.eps (saved None, now 1e-08).")

    saved["identity"] = None
    torch.save(saved, tmp_path / "b.pt")
    message = _refusal(make_encoder(tiny_clip, small_pairs), small_pairs, small_targets, config, tmp_path / "b.pt")
    assert message.startswith(f"{tmp_path / 'b.pt'}: saved by a different run; it differs in identity (saved None, now {{")


def test_resume_state_file_checks(tmp_path):
    import fractions

    bad = tmp_path / "list.pt"
    torch.save([1, 2], bad)
    with pytest.raises(ResumeStateError, match=r"list\.pt: not a protext training state \(format protext-train-state/1 expected\)\.$"):
        training.load_resume_state(bad)
    torch.save({"format": "protext-train-state/0", "prompts": {}}, bad)
    with pytest.raises(ResumeStateError, match=r"not a protext training state \(format protext-train-state/1 expected\)"):
        training.load_resume_state(bad)
    # only tensors and plain data are read back: an arbitrary pickled object is refused, not loaded
    torch.save({"format": "protext-train-state/1", "prompts": {}, "extra": fractions.Fraction(1, 3)}, bad)
    with pytest.raises(ResumeStateError, match=r"list\.pt: not a readable protext training state \(UnpicklingError: "):
        training.load_resume_state(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(Exception) as direct:
        torch.load(junk, weights_only=True)
    with pytest.raises(ResumeStateError) as info:
        training.load_resume_state(junk)
    assert f"junk.pt: not a readable protext training state ({type(direct.value).__name__}: " in str(info.value)


def test_a_state_saved_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """Tensors recorded as cuda:0 (as a GPU run saves them) come back on the CPU, not on a missing GPU."""
    import torch.serialization

    state = tmp_path / "gpu.resume.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"format": "protext-train-state/1", "prompts": {"ctx": torch.ones(2, 3)}}, state)
    loaded = training.load_resume_state(state)
    assert loaded["prompts"]["ctx"].device.type == "cpu" and torch.equal(loaded["prompts"]["ctx"], torch.ones(2, 3))


# --------------------------------------------------------------------------------------------------
# history file and class selection


def test_history_file_is_indented_json_with_epochs_counted_from_one(tmp_path):
    from protext.training import EpochRecord, write_history

    path = tmp_path / "run.loss.json"
    history = [EpochRecord(0, 0.5, 0.25, 2, 1.23456, [0.5, 0.0]), EpochRecord(1, 0.125, 1.5, 1, 0.0004, [1.5])]
    write_history(path, history, "complete", {"checkpoint": "run.safetensors", "final_loss": 1.5})
    assert path.read_text(encoding="utf-8") == """{
 "status": "complete",
 "checkpoint": "run.safetensors",
 "final_loss": 1.5,
 "epochs": [
  {
   "epoch": 1,
   "lr": 0.5,
   "loss": 0.25,
   "steps": 2,
   "seconds": 1.235
  },
  {
   "epoch": 2,
   "lr": 0.125,
   "loss": 1.5,
   "steps": 1,
   "seconds": 0.0
  }
 ],
 "step_losses": [
  [
   0.5,
   0.0
  ],
  [
   1.5
  ]
 ]
}
"""


def test_class_selection_matches_names_loosely_and_keeps_the_wanted_spelling():
    from protext.training import ClassSelection, select_classes

    descriptions = {"banded": ["stripes"], "Bubbly": ["foam", "bubbles"], "cracked": ["fissures"]}
    assert select_classes(descriptions, None) == ClassSelection(descriptions, [], [], [])
    got = select_classes(descriptions, ["Banded", "bubbly", "BANDED", "zig_zag"])
    assert got == ClassSelection({"Banded": ["stripes"], "bubbly": ["foam", "bubbles"]}, missing=["zig_zag"],
                                 dropped=["cracked"], merged=["BANDED"])
    assert list(got.descriptions) == ["Banded", "bubbly"]  # the wanted order
