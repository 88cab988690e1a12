"""TPT and C-TPT against a hand-written reference of ALGORITHMS.md §5 / TTA.md §2.

Catches the two TPT bugs that survived the old suite (issue 8): ``image_dtype`` ignored, and views
re-selected at every step instead of keeping the first step's selection.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from protext.checkpoint import class_encoder
from protext.prompts import PromptedTextEncoder
from protext.tta import TTAConfig, build_adapter
from protext.tta.ctpt import atfd
from tests.reference.tpt_reference import CTPTTuner, PromptTuner, TPTConfig  # production's, plus naive=True

NAMES = ["cat", "golden retriever", "Great Dane", "ox", "tabby", "a rather long class name"]


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    return torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(11))


def deep_encoder(clip) -> PromptedTextEncoder:
    torch.manual_seed(3)
    enc = PromptedTextEncoder(clip.model, clip.tokenizer, NAMES, n_ctx=4, depth=2, ctx_init="a photo of a", template="a photo of a {}.")
    with torch.no_grad():
        enc.ctx.add_(0.05 * torch.randn_like(enc.ctx))
        enc.deep_prompts.normal_(0, 0.5)
    return enc


def twin(clip, encoder: PromptedTextEncoder) -> PromptedTextEncoder:
    other = PromptedTextEncoder(clip.model, clip.tokenizer, encoder.classnames, encoder.n_ctx, encoder.depth, encoder.ctx_init, encoder.template)
    other.load_prompt_state(encoder.prompt_state())
    return other


def hand_atfd(raw: torch.Tensor) -> torch.Tensor:
    """TTA.md §2: t_c = raw_c/‖raw_c‖, μ = (1/C)Σ t_c, ATFD = (1/C)Σ ‖t_c − μ‖₂, written out."""
    C = raw.shape[0]
    t = [raw[c] / torch.sqrt((raw[c] ** 2).sum()) for c in range(C)]
    mu = sum(t) / C
    return sum(torch.sqrt(((t[c] - mu) ** 2).sum()) for c in range(C)) / C


def reference_tpt(clip, encoder, views, *, steps=1, lr=5e-3, lam=0.0, image_features=None, reselect=False):
    """§5 directly: full 77-token text, every kept view, one fresh AdamW, selection from step 1
    (or, with ``reselect``, the bug: selection redone at every step). C-TPT: loss − λ·ATFD."""
    model = clip.model
    if image_features is None:
        with torch.no_grad():
            image_features = F.normalize(model.encode_image(views), dim=-1)
    scale = model.logit_scale.exp()
    params = [p for p in encoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    chosen, losses = None, []
    for _ in range(steps):
        raw = encoder(truncate=False)
        logits = scale * image_features @ F.normalize(raw, dim=-1).t()
        probs = logits.softmax(-1)
        entropy = -(probs * logits.log_softmax(-1)).sum(-1).detach()
        if chosen is None or reselect:
            chosen = sorted(range(len(entropy)), key=lambda v: (float(entropy[v]), v))[: int(len(entropy) * 0.1)]
        mean = probs[chosen].mean(0)
        loss = -(mean * mean.log()).sum()
        if lam:
            loss = loss - lam * hand_atfd(raw)
        losses.append(float(loss.detach()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = scale * image_features[0] @ F.normalize(encoder(truncate=False), dim=-1).t()
    return chosen, losses, final


def test_image_dtype_is_used(tiny_clip, views):
    """bf16 image encoding: the tuner must equal the reference on a bf16 image tower's features,
    and differ from fp32 by far more than the tolerance (ignoring image_dtype fails this)."""
    encoder = class_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, "a photo of a {}.")
    visual = copy.deepcopy(tiny_clip.model.visual).to(torch.bfloat16)
    with torch.no_grad():
        bf16_features = F.normalize(visual(views.to(torch.bfloat16)).float(), dim=-1)
    _, _, want = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views, image_features=bf16_features)
    _, _, fp32 = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views)
    got = PromptTuner(tiny_clip.model, encoder, TPTConfig(image_dtype=torch.bfloat16)).adapt(views).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert float((want - fp32).abs().max()) > 20 * 1e-4


@pytest.mark.parametrize("naive", [False, True])
def test_multi_step_keeps_the_first_selection(tiny_clip, views, naive):
    """Three steps at a learning rate large enough that re-selecting would pick other views."""
    encoder = deep_encoder(tiny_clip)
    chosen, losses, want = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views, steps=3, lr=0.1)
    _, _, buggy = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views, steps=3, lr=0.1, reselect=True)
    assert float((buggy - want).abs().max()) > 1e-3  # the scenario tells the two apart
    out = PromptTuner(tiny_clip.model, encoder, TPTConfig(steps=3, lr=0.1, naive=naive, token_budget=24)).adapt(views)
    assert out.selected.tolist() == chosen
    assert out.losses == pytest.approx(losses, abs=1e-5)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)


def test_atfd_value_and_gradient():
    raw = torch.randn(7, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    a = raw.clone().requires_grad_(True)
    b = raw.clone().requires_grad_(True)
    value, want = atfd(a), hand_atfd(b)
    torch.testing.assert_close(value.double(), want, atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(value, a)
    (g_want,) = torch.autograd.grad(want, b)
    torch.testing.assert_close(g.double(), g_want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("naive", [False, True])
def test_ctpt_lambda_zero_is_tpt_bit_for_bit(tiny_clip, views, naive):
    encoder = deep_encoder(tiny_clip)
    config = TPTConfig(steps=2, naive=naive, token_budget=24)
    tpt = PromptTuner(tiny_clip.model, encoder, config).adapt(views, return_tuned=True)
    ctpt = CTPTTuner(tiny_clip.model, encoder, config, lam=0.0).adapt(views, return_tuned=True)
    assert torch.equal(tpt.logits, ctpt.logits) and tpt.losses == ctpt.losses
    assert tpt.selected.tolist() == ctpt.selected.tolist()
    for name in tpt.tuned:
        assert torch.equal(tpt.tuned[name], ctpt.tuned[name])


@pytest.mark.parametrize("naive", [False, True])
def test_ctpt_step_equals_hand_computation(tiny_clip, views, naive):
    encoder = deep_encoder(tiny_clip)
    chosen, losses, want = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views, lam=50.0)
    _, _, plain = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views)
    assert float((plain - want).abs().max()) > 1e-3  # the ATFD term moves the prompts
    out = CTPTTuner(tiny_clip.model, encoder, TPTConfig(naive=naive, token_budget=24), lam=50.0).adapt(views)
    assert out.selected.tolist() == chosen and out.losses == pytest.approx(losses, abs=1e-4)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["tpt", "ctpt"])
def test_build_adapter_and_batch_equal_one_at_a_time(tiny_clip, views, method):
    encoder = deep_encoder(tiny_clip)
    lam = {"ctpt": 50.0}.get(method, 0.0)
    _, _, want = reference_tpt(tiny_clip, twin(tiny_clip, encoder), views, lam=lam)
    single = build_adapter(TTAConfig(method=method), tiny_clip.model, "dtd", encoder=encoder)
    out = single.adapt(views)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)
    assert torch.equal(out.logits, out.calibration_logits) and "images" in out.timings
    others = [views.flip(-1), views.roll(1, 0)]
    alone = [single.adapt(v).logits for v in [views, *others]]
    batched = build_adapter(TTAConfig(method=method, batch=3), tiny_clip.model, "dtd", encoder=encoder)
    assert batched.batchable  # the batched text forward runs, not a loop over images
    for got, expected in zip(batched.adapt_batch([views, *others]), alone):
        torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
        assert int(got.logits.argmax()) == int(expected.argmax())


def test_batched_text_forward_equals_each_copy(tiny_clip):
    """Copy b of the batched forward == the plain encoder carrying copy b's prompts."""
    from protext.shared_prefix import prompt_copies_features as batched_prompt_features

    encoder = deep_encoder(tiny_clip)
    g = torch.Generator().manual_seed(8)
    ctx = encoder.ctx.detach() + 0.1 * torch.randn(3, *encoder.ctx.shape, generator=g)
    deep = encoder.deep_prompts.detach() + 0.1 * torch.randn(3, *encoder.deep_prompts.shape, generator=g)
    classes = torch.tensor([5, 0, 3])
    got = batched_prompt_features(encoder, ctx, deep, classes)
    for b in range(3):
        copy_b = twin(tiny_clip, encoder)
        copy_b.load_prompt_state({"ctx": ctx[b], "deep_prompts": deep[b]})
        with torch.no_grad():
            want = copy_b(classes, truncate=False)
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tune,steps", [("shallow", 2), ("all", 0)])
def test_batch_options_equal_one_at_a_time(tiny_clip, views, tune, steps):
    encoder = deep_encoder(tiny_clip)
    batch = [views, views.flip(-1)]
    single = build_adapter(TTAConfig(method="tpt", tune=tune, steps=steps), tiny_clip.model, "dtd", encoder=encoder)
    alone = [single.adapt(v).logits for v in batch]
    batched = build_adapter(TTAConfig(method="tpt", tune=tune, steps=steps, batch=2), tiny_clip.model, "dtd", encoder=encoder)
    for got, expected in zip(batched.adapt_batch(batch), alone):
        torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    for name, value in deep_encoder(tiny_clip).prompt_state().items():  # the encoder is left at its init
        assert torch.equal(encoder.prompt_state()[name], value)


# --------------------------------------------------------------------------------------------------
# settings, the public contract of adapt, timings, and the text tower's work (issue 8 survivors)

from protext.tta import tpt as tpt_module  # noqa: E402  (production module, patched by the spies below)


@pytest.fixture(scope="module")
def few_views() -> torch.Tensor:
    """Eight views are enough where only the contract is checked, not the numbers of §5."""
    return torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(12))


def test_settings_edges_are_accepted_and_refusals_name_the_flag():
    """PRESETS.md ranges: at least one view, a kept fraction in (0, 1], steps >= 0, a positive rate."""
    tpt_module.TPTConfig(n_views=1, selection=1.0, steps=0, lr=1e-9)  # every edge that is allowed
    refused = [
        ({"n_views": 0}, r"^--tpt-views must be at least 1, got 0\.$"),
        ({"selection": 1.5}, r"^--tpt-selection must be in \(0, 1\], got 1\.5\.$"),
        ({"steps": -1}, r"^--tpt-steps must be >= 0, got -1\.$"),
        ({"lr": 0.0}, r"^--tpt-lr must be positive, got 0\.0\.$"),
        ({"tune": "deep"}, r"^--tpt-tune must be one of all, shallow, got 'deep'\.$"),
    ]
    for settings, message in refused:
        with pytest.raises(ValueError, match=message):
            tpt_module.TPTConfig(**settings)


def test_adapt_contract_shapes_tuned_copies_and_untuned_selection(tiny_clip, few_views):
    """One image's views must be a 4-D batch; tuned prompts come back only when asked for, and
    quietly; with zero steps nothing is selected (an empty index tensor, still of integer type)."""
    encoder = deep_encoder(tiny_clip)
    tuner = tpt_module.PromptTuner(tiny_clip.model, encoder, tpt_module.TPTConfig())
    with pytest.raises(ValueError, match=r"views must be \(n_views, 3, H, W\), got shape \(3, 224, 224\)\."):
        tuner.adapt(few_views[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an fp32 CPU run has nothing to warn about (no gradient scaler)
        assert tuner.adapt(few_views).tuned is None
    untuned = tpt_module.PromptTuner(tiny_clip.model, encoder, tpt_module.TPTConfig(steps=0)).adapt(few_views)
    assert untuned.selected.dtype == torch.long and untuned.selected.shape == (0,)
    assert untuned.losses == []


class TickingClock:
    """A stand-in for ``time``: every reading of ``perf_counter`` is one second after the last."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("steps", [0, 2])
def test_timings_are_per_phase_and_add_up_over_steps(tiny_clip, few_views, monkeypatch, steps):
    """TPTOutput.timings: seconds per phase; ``text`` and ``step`` add up over the steps. With a clock
    that advances one second per reading, each phase of each step lasts exactly one second."""
    monkeypatch.setattr(tpt_module, "time", TickingClock())
    tuner = tpt_module.PromptTuner(tiny_clip.model, deep_encoder(tiny_clip), tpt_module.TPTConfig(steps=steps))
    want = {"images": 1.0, "predict": 1.0}
    if steps:
        want.update(text=float(steps), step=float(steps))
    assert tuner.adapt(few_views).timings == want
    adapter = tpt_module.TPTAdapter(tuner)
    assert adapter.adapt(few_views).timings == want


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("steps", [0, 2])
def test_text_tower_work_per_image(tiny_clip, few_views, monkeypatch, shared, steps):
    """The fast path's cost contract (module docstring, TPTConfig): every pass over the classes runs
    batches of at most ``token_budget`` padded tokens, each cut at its own longest EOT (never all 77
    positions), through the shared prompt prefix exactly when ``shared_prefix`` is on, and the
    features at the initialisation are computed once per tuner, not once per image. Passes per image: the initial features (first image only), then per step the
    backward re-encode and, from the second step on, the loss's features, then (after at least one
    step) the prediction; with zero steps the prediction is the initial features' own."""
    encoder = deep_encoder(tiny_clip)
    n_classes = len(NAMES)
    rows = {"shared": 0, "direct": 0}
    flags, padded = [], []  # truncate flags of direct calls; rows x (longest EOT + 1) of every batch
    real_shared = tpt_module.shared_prefix_features

    def shared_prefix_features(enc, classes):
        rows["shared"] += len(classes)
        padded.append(len(classes) * (int(encoder.eot[classes].max()) + 1))
        return real_shared(enc, classes)

    real_forward = encoder.forward

    def forward(class_indices=None, truncate=True, normalize=False):
        classes = torch.arange(n_classes) if class_indices is None else class_indices
        flags.append(truncate)
        rows["direct"] += len(classes)
        padded.append(len(classes) * (int(encoder.eot[classes].max()) + 1))
        return real_forward(class_indices, truncate=truncate, normalize=normalize)

    monkeypatch.setattr(tpt_module, "shared_prefix_features", shared_prefix_features)
    monkeypatch.setattr(encoder, "forward", forward)
    config = tpt_module.TPTConfig(steps=steps, shared_prefix=shared, token_budget=24)
    tuner = tpt_module.PromptTuner(tiny_clip.model, encoder, config)
    assert n_classes * (int(encoder.eot.max()) + 1) > 24  # so a pass needs several batches
    per_image = []
    for _ in range(2):
        rows.update(shared=0, direct=0)
        tuner.adapt(few_views)
        per_image.append(dict(rows))
    later = steps + max(steps - 1, 0) + (1 if steps else 0)
    for first, counts in zip([True, False], per_image):
        passes = later + (1 if first else 0)
        used, unused = ("shared", "direct") if shared else ("direct", "shared")
        assert counts[used] == passes * n_classes and counts[unused] == 0
    assert all(flag is True for flag in flags)
    assert padded and max(padded) <= 24
