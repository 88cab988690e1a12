"""TPS against a hand-written float64 reference of TTA2.md §10 steps 1-6.

The reference below writes the prototype normalisation, the shift, the per-view entropies, the
confident-view selection, TPT's marginal entropy and AdamW (PyTorch's defaults: betas 0.9/0.999,
eps 1e-8, weight decay 0.01) from their formulas; autograd gives only the gradient. It calls
nothing from ``protext.tta``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from protext.tta.base import FeatureAdapter
from protext.tta.tps import TPSAdapter, descriptor_sentence, prototypes_from_parts

# ----------------------------------------------------------------------------------------- reference


def reference_tps(prototypes, features, scale, *, lr, fraction=0.1, steps=1, add_to_raw=False):
    """§10 steps 1-6 in float64. ``add_to_raw`` is the wrong rule (shift added to the raw prototype),
    used only to show that a test tells the two apart."""
    P, V = prototypes.double(), features.double()
    n = V.shape[0]
    base = P if add_to_raw else P / P.norm(dim=1, keepdim=True)

    def logits_of(s):
        t = base + s
        t = t / t.norm(dim=1, keepdim=True)
        return float(scale) * V @ t.t()

    s, m, v = torch.zeros_like(base), torch.zeros_like(base), torch.zeros_like(base)
    selected, losses, grads = [], [], []
    for step in range(1, steps + 1):
        leaf = s.clone().requires_grad_(True)
        z = logits_of(leaf)
        logp = z - z.logsumexp(dim=1, keepdim=True)
        p = logp.exp()
        entropy = (-(p * logp).sum(dim=1)).detach()
        k = max(1, int(n * fraction))
        kept = sorted(range(n), key=lambda i: (float(entropy[i]), i))[:k]
        mean = p[kept].mean(dim=0)
        loss = -(mean * mean.log()).sum()
        (g,) = torch.autograd.grad(loss, leaf)
        s = s * (1 - lr * 0.01)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        s = s - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
        selected.append(kept)
        grads.append(g)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        logits = logits_of(s)[0]
    return SimpleNamespace(logits=logits, shift=s, selected=selected, losses=losses, grads=grads)


class FakeCLIP(nn.Module):
    """Only what a FeatureAdapter reads of CLIP: a parameter (the device) and the temperature."""

    def __init__(self, scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))


def inputs(seed, n_classes=4, dim=8, n_views=20, norms=None):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(n_classes, dim, generator=g)
    if norms is not None:
        P = F.normalize(P, dim=-1) * torch.tensor(norms).unsqueeze(1)
    V = F.normalize(torch.randn(n_views, dim, generator=g), dim=-1)
    return P, V


def check(out, ref, atol=1e-4):
    """Labels exact, logits to ``atol`` (fp32 against fp64), shifts to 1e-5.

    AdamW's first step is ``lr · g / (|g| + 1e-8)``: a gradient coordinate near 1e-8 would make
    the fp32 step differ from the fp64 one, so the inputs are chosen to keep every coordinate far
    above it (checked here).
    """
    assert min(float(g.abs().min()) for g in ref.grads) > 1e-6
    assert int(out.logits.argmax()) == int(ref.logits.argmax())
    torch.testing.assert_close(out.logits.double(), ref.logits, atol=atol, rtol=0)
    torch.testing.assert_close(out.shift.double(), ref.shift, atol=1e-5, rtol=0)
    assert [s.tolist() for s in out.selected] == ref.selected
    assert out.losses == pytest.approx(ref.losses, abs=1e-5)


# ----------------------------------------------------------------------------------------- the rule


def test_published_defaults_64_views_keep_6_and_match_reference():
    P, V = inputs(0, n_classes=10, dim=16, n_views=64)
    adapter = TPSAdapter(FakeCLIP(20.0), P)
    assert (adapter.lr, adapter.fraction, adapter.steps, adapter.fp16) == (5e-3, 0.1, 1, False)
    out = adapter.tune(V)
    ref = reference_tps(P, V, 20.0, lr=5e-3)
    assert len(out.selected) == 1 and len(out.selected[0]) == 6  # int(64 * 0.1)
    check(out, ref)
    # one AdamW step from zero moves every coordinate by ~lr
    assert out.shift.abs().max() == pytest.approx(5e-3, rel=1e-4)


def test_shift_is_added_to_the_normalised_prototype():
    """Prototypes of very different norms give the normalised prototypes' answer (the spec's
    rule), which is far from what adding the shift to the raw prototype would give."""
    norms = [0.2, 1.0, 5.0, 40.0]
    P, V = inputs(1, norms=norms)
    lr, scale = 0.2, 20.0
    out = TPSAdapter(FakeCLIP(scale), P, lr=lr, fraction=0.1).tune(V)
    ref = reference_tps(P, V, scale, lr=lr, fraction=0.1)
    check(out, ref)
    unit = TPSAdapter(FakeCLIP(scale), F.normalize(P, dim=-1), lr=lr, fraction=0.1).tune(V)
    torch.testing.assert_close(out.logits, unit.logits, atol=1e-5, rtol=0)
    wrong = reference_tps(P, V, scale, lr=lr, fraction=0.1, add_to_raw=True)
    assert (wrong.logits - ref.logits).abs().max() > 0.1


def test_selection_keeps_the_lowest_entropy_views_not_view_0():
    """20 views, 10 %: two views; view 0 is made the least confident, and the result differs from
    the loss over all views (so the selection matters)."""
    P, V = inputs(2)
    # view 0 at equal cosine to every prototype: uniform logits, the highest entropy there is
    V[0] = F.normalize(torch.linalg.pinv(F.normalize(P, dim=-1)) @ torch.ones(4), dim=0)
    scale = 10.0
    ref = reference_tps(P, V, scale, lr=0.3, fraction=0.1)
    out = TPSAdapter(FakeCLIP(scale), P, lr=0.3, fraction=0.1).tune(V)
    check(out, ref)
    z = scale * V.double() @ F.normalize(P.double(), dim=-1).t()
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum(1)
    assert out.selected[0].tolist() == entropy.argsort()[:2].tolist()
    assert 0 not in out.selected[0].tolist()
    everything = reference_tps(P, V, scale, lr=0.3, fraction=1.0)
    assert (everything.logits - ref.logits).abs().max() > 1e-2
    most_uncertain = entropy.argsort(descending=True)[:2].tolist()
    assert set(most_uncertain).isdisjoint(out.selected[0].tolist())


def test_view_0_competes_in_the_selection():
    P, V = inputs(3)
    V[0] = F.normalize(P[2], dim=-1)  # view 0 lies on a prototype: the most confident view
    out = TPSAdapter(FakeCLIP(10.0), P, lr=0.1, fraction=0.1).tune(V)
    ref = reference_tps(P, V, 10.0, lr=0.1, fraction=0.1)
    check(out, ref)
    assert out.selected[0][0] == 0


def test_several_steps_select_again_each_step():
    """Three steps, a selection of its own at each (as published); AdamW's moments and weight decay
    carry over between the steps of one image."""
    g = torch.Generator().manual_seed(13)
    P = torch.randn(4, 8, generator=g, dtype=torch.float64)
    V = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=-1)
    ref = reference_tps(P, V, 10.0, lr=0.3, fraction=0.1, steps=3)
    assert ref.selected[0] != ref.selected[1] != ref.selected[2]  # the inputs make re-selection matter
    out = TPSAdapter(FakeCLIP(10.0), P.float(), lr=0.3, fraction=0.1, steps=3).tune(V.float())
    check(out, ref)
    first = reference_tps(P, V, 10.0, lr=0.3, fraction=0.1, steps=1)
    assert (first.logits - ref.logits).abs().max() > 1e-2


def test_zero_steps_is_zero_shot_on_the_prototypes():
    P, V = inputs(4, norms=[0.5, 2.0, 3.0, 9.0])
    out = TPSAdapter(FakeCLIP(100.0), P, steps=0).tune(V)
    zero_shot = 100.0 * V[0].double() @ (P.double() / P.double().norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(out.logits.double(), zero_shot, atol=1e-4, rtol=0)
    assert out.selected == [] and out.losses == [] and out.scales == []
    assert torch.count_nonzero(out.shift) == 0 and out.shift.shape == P.shape
    assert set(out.timings) == {"predict"}


def test_shifts_reset_between_images_either_order():
    P, _ = inputs(5)
    _, A = inputs(6)
    _, B = inputs(7)
    kwargs = dict(lr=0.3, fraction=0.1)
    first = TPSAdapter(FakeCLIP(10.0), P, **kwargs)
    a1, b1 = first.adapt_features(A), first.adapt_features(B)
    second = TPSAdapter(FakeCLIP(10.0), P, **kwargs)
    b2, a2 = second.adapt_features(B), second.adapt_features(A)
    for got, want, views in ((a1, a2, A), (b1, b2, B)):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
        ref = reference_tps(P, views, 10.0, **kwargs)
        torch.testing.assert_close(got.logits.double(), ref.logits, atol=1e-4, rtol=0)
        assert int(got.logits.argmax()) == int(ref.logits.argmax())
        torch.testing.assert_close(got.calibration_logits, got.logits, atol=0, rtol=0)
        assert set(got.timings) == {"shift", "predict"}
    # the prototypes themselves are never shifted in place
    torch.testing.assert_close(first.prototypes, F.normalize(P, dim=-1), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------- fp16


def _overflowing():
    """Features of norm 2000 with a temperature of 0.005: finite fp16 logits (about ±10), but the
    loss scaled by 1000 gives fp16 gradients past 65504 in the matmul's backward."""
    P, V = inputs(8, n_views=10)
    return P, V * 2000.0


def test_fp16_overflow_skips_the_step_and_the_next_image_starts_at_1000():
    P, V = _overflowing()
    adapter = TPSAdapter(FakeCLIP(0.005), P, lr=0.1, fraction=0.2, fp16=True)
    out = adapter.tune(V)
    assert out.scales == [(1000.0, 500.0)]
    assert torch.count_nonzero(out.shift) == 0
    assert math.isfinite(out.losses[0])
    zero_shot = 0.005 * V[0].double() @ F.normalize(P.double(), dim=-1).t()
    torch.testing.assert_close(out.logits.double(), zero_shot, atol=2e-2, rtol=0)
    # the same inputs in fp32 take the step: the skip is the scaler's
    fp32 = TPSAdapter(FakeCLIP(0.005), P, lr=0.1, fraction=0.2).tune(V)
    assert fp32.scales == [] and fp32.shift.abs().max() == pytest.approx(0.1, rel=1e-3)
    # a fresh scaler per image: an ordinary image after the overflow starts at 1000 again
    _, ordinary = inputs(9, n_views=10)
    after = adapter.tune(ordinary * 20.0)
    assert after.scales == [(1000.0, 1000.0)]


def test_fp16_step_matches_reference_within_half_precision():
    P, V = inputs(10, n_views=30)
    out = TPSAdapter(FakeCLIP(10.0), P, lr=0.05, fraction=0.1, fp16=True).tune(V)
    ref = reference_tps(P, V, 10.0, lr=0.05, fraction=0.1)
    assert min(float(g.abs().min()) for g in ref.grads) > 1e-4  # far above fp16's gradient error
    assert out.scales == [(1000.0, 1000.0)]
    assert [s.tolist() for s in out.selected] == ref.selected
    # logits of magnitude ~10 through an fp16 matmul: 1e-2 is a few fp16 ulps
    torch.testing.assert_close(out.logits.double(), ref.logits, atol=1e-2, rtol=0)
    torch.testing.assert_close(out.shift.double(), ref.shift, atol=1e-5, rtol=0)
    assert out.losses == pytest.approx(ref.losses, abs=1e-2)
    assert int(out.logits.argmax()) == int(ref.logits.argmax())
    # the forward really ran in fp16: its logits are not the fp32 ones
    fp32 = TPSAdapter(FakeCLIP(10.0), P, lr=0.05, fraction=0.1).tune(V)
    assert not torch.equal(out.logits, fp32.logits)


# ----------------------------------------------------------------------------------------- end to end


def test_adapt_on_tiny_clip_and_batch_equals_one_at_a_time(tiny_clip):
    model = tiny_clip.model
    P = torch.randn(5, 32, generator=torch.Generator().manual_seed(11))
    adapter = TPSAdapter(model, P, lr=0.05, fraction=0.25)
    assert isinstance(adapter, FeatureAdapter) and not adapter.online
    batch = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(20 + i)) for i in range(3)]
    scale = float(model.logit_scale.exp())
    singles = [adapter.adapt(views) for views in batch]
    for views, out in zip(batch, singles):
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views).double(), dim=-1)
        ref = reference_tps(P, feats, scale, lr=0.05, fraction=0.25)
        assert int(out.logits.argmax()) == int(ref.logits.argmax())
        torch.testing.assert_close(out.logits.double(), ref.logits, atol=1e-4, rtol=0)
        assert set(out.timings) == {"images", "shift", "predict"}
        assert out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    together = adapter.adapt_batch(batch)
    for one, many in zip(singles, together):
        assert int(one.logits.argmax()) == int(many.logits.argmax())
        torch.testing.assert_close(many.logits, one.logits, atol=1e-5, rtol=0)
    assert adapter.state_dict() == {}


# ----------------------------------------------------------------------------------------- prototypes


@pytest.mark.parametrize(
    "descriptor,sentence",
    [
        ("antlers on its head", "which is antlers on its head"),  # any word starting with "a"
        ("a long neck", "which is a long neck"),
        ("an orange beak", "which is an orange beak"),
        ("has four legs", "which has four legs"),
        ("hash-like markings", "which hash-like markings"),  # prefix "has", as published
        ("often found near water", "which often found near water"),
        ("typically brown", "which typically brown"),
        ("may have spots", "which may have spots"),
        ("can fly", "which can fly"),
        ("canine teeth", "which canine teeth"),
        ("used for cutting", "which is used for cutting"),
        ("usually red", "which has usually red"),
        ("striped fur", "which has striped fur"),
        ("A large body", "which has A large body"),  # case-sensitive
        ("Has wings", "which has Has wings"),
    ],
)
def test_descriptor_sentence(descriptor, sentence):
    assert descriptor_sentence("red deer", descriptor) == f"red deer, {sentence}"


def test_prototypes_from_parts_is_the_unnormalised_mean():
    g = torch.Generator().manual_seed(12)
    a = F.normalize(torch.randn(3, 6, generator=g), dim=-1) * 0.9  # means of unit vectors: norm < 1
    d = F.normalize(torch.randn(3, 6, generator=g), dim=-1) * 0.6
    P = prototypes_from_parts(a, d)
    want = [[(float(x) + float(y)) / 2 for x, y in zip(ra, rd)] for ra, rd in zip(a, d)]
    torch.testing.assert_close(P.double(), torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=0)
    assert not torch.allclose(P.norm(dim=1), torch.ones(3), atol=1e-2)
    with pytest.raises(ValueError, match=r"template and descriptor means must both be \(n_classes, dim\), got \(3, 6\) and \(2, 6\)"):
        prototypes_from_parts(a, d[:2])
    with pytest.raises(ValueError, match="template and descriptor means must both be"):
        prototypes_from_parts(a[0], d[0])


# ----------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "lr must be positive"),
        (dict(lr=-1e-3), "lr must be positive"),
        (dict(fraction=0.0), "fraction must be in"),
        (dict(fraction=1.01), "fraction must be in"),
        (dict(steps=-1), "steps must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    P, _ = inputs(0)
    with pytest.raises(ValueError, match=match):
        TPSAdapter(FakeCLIP(), P, **kwargs)


def test_boundary_arguments_and_shapes():
    P, V = inputs(0)
    out = TPSAdapter(FakeCLIP(10.0), P, fraction=1.0, lr=0.1).tune(V)
    assert len(out.selected[0]) == 20
    torch.testing.assert_close(out.logits.double(), reference_tps(P, V, 10.0, lr=0.1, fraction=1.0).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prototypes must be"):
        TPSAdapter(FakeCLIP(), P[0])
    adapter = TPSAdapter(FakeCLIP(), P)
    with pytest.raises(ValueError, match=r"view features must be \(n_views, 8\)"):
        adapter.tune(V[:, :7])
    with pytest.raises(ValueError, match="view features must be"):
        adapter.tune(V[0])


def test_image_encoding_precision():
    """fp16 encodes the views under fp16 autocast as published; otherwise ``image_dtype`` decides."""
    P, _ = inputs(0)
    model = FakeCLIP()
    assert TPSAdapter(model, P, fp16=True).image_encoder.dtype == torch.float16
    assert TPSAdapter(model, P, fp16=True, image_dtype=torch.float32).image_encoder.dtype == torch.float16
    assert TPSAdapter(model, P, image_dtype=torch.float16).image_encoder.dtype == torch.float16
    plain = TPSAdapter(model, P)
    assert plain.image_encoder.dtype is None and plain.image_encoder.model is model
