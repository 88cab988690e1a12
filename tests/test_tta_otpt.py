"""O-TPT against hand-written references of TTA2.md §9.

The closed form of the orthogonality term is checked against the official Householder computation
(§9 step 2, written out here in float64), one O-TPT step against a hand reference of TPT plus that
Householder term, and the batched adapter against one image at a time.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protext.tta.batched import REGULARISED, BatchedTPTAdapter
from protext.tta.ctpt import CTPTTuner as ProductionCTPTTuner
from protext.tta.otpt import OTPTTuner as ProductionOTPTTuner
from protext.tta.otpt import orthogonality
from protext.tta.tpt import PromptTuner as ProductionPromptTuner
from tests.reference.tpt_reference import PromptTuner, TPTConfig, _NaivePath
from tests.test_tta_tpt import deep_encoder, twin


class OTPTTuner(_NaivePath, ProductionOTPTTuner):
    """Production's O-TPT tuner, or the naive (published-style) path with ``naive=True``."""


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    return torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(21))


# --------------------------------------------------------------------------------------------------
# the regulariser


def householder_orthogonality(raw: torch.Tensor) -> torch.Tensor:
    """§9 step 2 as the official code does it, one class at a time: T = normalised rows, G = T Tᵀ,
    M = column norms of G, U = G − I·M, v_i = u_i/‖u_i‖, H_i = I − 2 v_i v_iᵀ, y_i = H_i g_i,
    R = Y − I, O = mean_i ‖r_i‖."""
    C = raw.shape[0]
    T = torch.stack([raw[i] / torch.sqrt((raw[i] ** 2).sum()) for i in range(C)])
    G = T @ T.t()
    I = torch.eye(C, dtype=raw.dtype)
    M = torch.sqrt((G**2).sum(dim=0, keepdim=True))  # (1, C): the norm of column j
    U = G - I * M  # row i: g_i − M_i e_i
    residuals = []
    for i in range(C):
        v = U[i] / torch.sqrt((U[i] ** 2).sum())
        H = I - 2.0 * torch.outer(v, v)
        y = H @ G[:, i]
        r = y - I[i]
        residuals.append(torch.sqrt((r**2).sum()))
    return sum(residuals) / C


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_equals_householder_value_and_gradient(seed):
    """Float64 on both sides: the closed form is the official computation, value and gradient."""
    raw = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.5
    a = raw.clone().requires_grad_(True)
    b = raw.clone().requires_grad_(True)
    value, want = orthogonality(a), householder_orthogonality(b)
    assert value.dtype == torch.float64
    assert float(want.detach()) > 0.1  # far from the orthogonal case, so the check has teeth
    torch.testing.assert_close(value, want, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(value, a)
    (g_want,) = torch.autograd.grad(want, b)
    assert float(g_want.abs().max()) > 1e-3
    torch.testing.assert_close(g, g_want, atol=1e-12, rtol=0)


def test_zero_for_orthogonal_features_with_a_finite_gradient():
    """Mutually orthogonal classes of any lengths: O = 0, and the gradient is finite (the official
    Householder path divides by ‖u_i‖ = 0 there)."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    raw = (q[:5] * torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)[:, None]).float().requires_grad_(True)
    value = orthogonality(raw)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, torch.tensor(0.0), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(value, raw)
    assert torch.isfinite(g).all()


def test_known_values():
    """C identical classes: every g_i is all ones, O = √C − 1. Two classes at angle θ: O = √(1+cos²θ) − 1."""
    for C in (2, 5):
        same = torch.tensor([[3.0, -1.0, 2.0]]).repeat(C, 1)
        torch.testing.assert_close(orthogonality(same), torch.tensor(math.sqrt(C) - 1.0), atol=1e-6, rtol=0)
    theta = 0.7
    pair = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]]) * torch.tensor([[2.0], [0.3]])
    want = math.sqrt(1.0 + math.cos(theta) ** 2) - 1.0
    torch.testing.assert_close(orthogonality(pair), torch.tensor(want), atol=1e-6, rtol=0)


def test_fp32_outside_autocast():
    """fp16 features give an fp32 result equal to that of their fp32 copy, and an enclosing bf16
    autocast (which would run the Gram matmul in bf16) changes nothing."""
    raw = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
    plain = orthogonality(raw)
    half = orthogonality(raw.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, orthogonality(raw.half().float()), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = orthogonality(raw)
        bf16_gram = F.normalize(raw, dim=-1) @ F.normalize(raw, dim=-1).t()
    assert bf16_gram.dtype == torch.bfloat16  # the autocast is really on
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, atol=1e-7, rtol=0)
    bf16_value = (torch.linalg.vector_norm(bf16_gram.float(), dim=-1) - 1).mean()
    assert float((bf16_value - plain).abs()) > 1e-5  # what a bf16 Gram matrix would have given


def test_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"^text_features must be \(n_classes, dim\), got shape \(2, 3, 4\)\.$"):
        orthogonality(torch.ones(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# one O-TPT step


def reference_otpt(clip, encoder, views, *, lam, steps=1, lr=5e-3):
    """TPT's §5 step written out (full 77-token text, fresh AdamW, first-step selection) with the
    loss H(p̄) + λ·O, O the official Householder computation on the same forward's features."""
    model = clip.model
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(views), dim=-1)
    scale = model.logit_scale.exp()
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    chosen, losses = None, []
    for _ in range(steps):
        raw = encoder(truncate=False)
        logits = scale * image_features @ F.normalize(raw, dim=-1).t()
        probs = logits.softmax(-1)
        entropy = -(probs * logits.log_softmax(-1)).sum(-1).detach()
        if chosen is None:
            chosen = sorted(range(len(entropy)), key=lambda v: (float(entropy[v]), v))[: int(len(entropy) * 0.1)]
        mean = probs[chosen].mean(0)
        loss = -(mean * mean.log()).sum() + lam * householder_orthogonality(raw)
        losses.append(float(loss.detach()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = scale * image_features[0] @ F.normalize(encoder(truncate=False), dim=-1).t()
    return chosen, losses, final


@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_otpt_step_equals_hand_computation(tiny_clip, views, naive, steps):
    encoder = deep_encoder(tiny_clip)
    chosen, losses, want = reference_otpt(tiny_clip, twin(tiny_clip, encoder), views, lam=18.0, steps=steps)
    _, _, plain = reference_otpt(tiny_clip, twin(tiny_clip, encoder), views, lam=0.0, steps=steps)
    assert float((plain - want).abs().max()) > 1e-3  # the orthogonality term moves the prompts
    config = TPTConfig(steps=steps, naive=naive, token_budget=24)
    out = OTPTTuner(tiny_clip.model, encoder, config, lam=18.0).adapt(views)
    assert out.selected.tolist() == chosen
    assert out.losses == pytest.approx(losses, abs=1e-4)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("naive", [False, True])
def test_lambda_zero_is_tpt(tiny_clip, views, naive):
    """λ = 0 adds 0·O: TPT's selection, losses, prompts and logits (to float rounding, 1e-7)."""
    encoder = deep_encoder(tiny_clip)
    config = TPTConfig(steps=2, naive=naive, token_budget=24)
    tpt = PromptTuner(tiny_clip.model, encoder, config).adapt(views, return_tuned=True)
    otpt = OTPTTuner(tiny_clip.model, encoder, config, lam=0.0).adapt(views, return_tuned=True)
    assert tpt.selected.tolist() == otpt.selected.tolist()
    assert otpt.losses == pytest.approx(tpt.losses, abs=1e-7)
    torch.testing.assert_close(otpt.logits, tpt.logits, atol=1e-7, rtol=0)
    for name in tpt.tuned:
        torch.testing.assert_close(otpt.tuned[name], tpt.tuned[name], atol=1e-7, rtol=0)


def test_tuner_keeps_lambda_as_a_float(tiny_clip):
    tuner = ProductionOTPTTuner(tiny_clip.model, deep_encoder(tiny_clip), TPTConfig(), lam=2)
    assert tuner.lam == 2.0 and isinstance(tuner.lam, float)


# --------------------------------------------------------------------------------------------------
# the batched adapter


@pytest.mark.parametrize("steps", [1, 2])
def test_batched_otpt_equals_one_at_a_time(tiny_clip, views, steps):
    encoder = deep_encoder(tiny_clip)
    config = TPTConfig(steps=steps)
    batch = [views, views.flip(-1), views.roll(1, 0)]
    single = ProductionOTPTTuner(tiny_clip.model, twin(tiny_clip, encoder), config, lam=18.0)
    alone = [single.adapt(v).logits for v in batch]
    tpt = ProductionPromptTuner(tiny_clip.model, twin(tiny_clip, encoder), config).adapt(views).logits
    assert float((alone[0] - tpt).abs().max()) > 1e-3  # O-TPT is not TPT here
    batched = BatchedTPTAdapter(tiny_clip.model, encoder, config, 18.0, regulariser="otpt")
    assert batched.batchable and type(batched.tuner) is ProductionOTPTTuner and batched.tuner.lam == 18.0
    results = batched.adapt_batch(batch)
    assert len(results) == len(batch)
    for got, expected in zip(results, alone):
        torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(got.logits, got.calibration_logits)
    torch.testing.assert_close(batched.adapt(views).logits, alone[0], atol=1e-6, rtol=0)
    for name, value in deep_encoder(tiny_clip).prompt_state().items():  # the encoder is left at its init
        assert torch.equal(encoder.prompt_state()[name], value)


def test_batched_ctpt_is_unchanged(tiny_clip, views):
    """λ alone (how the method registry calls it) is still C-TPT, equal to one image at a time."""
    encoder = deep_encoder(tiny_clip)
    config = TPTConfig()
    batch = [views, views.flip(-1)]
    single = ProductionCTPTTuner(tiny_clip.model, twin(tiny_clip, encoder), config, lam=50.0)
    alone = [single.adapt(v).logits for v in batch]
    for adapter in (BatchedTPTAdapter(tiny_clip.model, encoder, config, 50.0), BatchedTPTAdapter(tiny_clip.model, encoder, config, 50.0, "ctpt")):
        assert type(adapter.tuner) is ProductionCTPTTuner and adapter.tuner.lam == 50.0
        for got, expected in zip(adapter.adapt_batch(batch), alone):
            torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    assert type(BatchedTPTAdapter(tiny_clip.model, encoder, config).tuner) is ProductionPromptTuner
    assert REGULARISED == {"ctpt": ProductionCTPTTuner, "otpt": ProductionOTPTTuner}


def test_batched_refusals(tiny_clip):
    encoder = deep_encoder(tiny_clip)
    with pytest.raises(ValueError, match=r"^regulariser must be one of ctpt, otpt, got 'tps'\.$"):
        BatchedTPTAdapter(tiny_clip.model, encoder, TPTConfig(), 2.0, regulariser="tps")
    with pytest.raises(ValueError, match=r"^regulariser 'otpt' needs its weight lam \(λ\); lam=None is plain TPT\.$"):
        BatchedTPTAdapter(tiny_clip.model, encoder, TPTConfig(), regulariser="otpt")


@pytest.mark.parametrize("batch", [1, 2])
def test_build_adapter_runs_otpt_with_its_lambda(tiny_clip, batch):
    """The method registry's O-TPT: the one-image tuner, or the batched adapter, both with λ = 18 on DTD."""
    from protext.tta import TTAConfig, build_adapter

    adapter = build_adapter(TTAConfig(method="otpt", batch=batch), tiny_clip.model, "dtd", encoder=deep_encoder(tiny_clip))
    assert type(adapter.tuner) is ProductionOTPTTuner and adapter.tuner.lam == 18.0
    assert isinstance(adapter, BatchedTPTAdapter) == (batch > 1)
