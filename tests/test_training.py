"""The training loop (ALGORITHMS.md §3): fast path equals the naive path; schedule, shuffling, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import protext.training as training
from protext.descriptions import import_cupl, read_descriptions
from protext.prompts import PromptedTextEncoder
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
