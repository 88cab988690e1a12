"""DPE against a hand-written float64 reference of TTA2.md §7.

The reference below is written from the spec alone: its softmax, entropies, column normalisation,
InfoNCE, queue rule and AdamW first step are spelled out here (autograd only supplies the
gradient of the hand-written loss), and it never calls ``protext.tta.dpe``. The adapter runs in
fp32, the reference in float64: labels are compared exactly, floats within the tolerances below.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from protext.tta import base
from protext.tta.dpe import DPEAdapter, info_nce

C, D = 4, 16
LOGIT_ATOL = 5e-3
"""fp32 against float64: the largest observed gap is 2.2e-3 (logits of ~5-30). Not accumulated
drift but one step's gradient: fp32 rounds ``log p ≈ 0`` of a sure softmax (the entropy's, and
InfoNCE's at temperature 0.01, whose gradient is ×100), and AdamW's first step ``g/(|g| + 1e-3)``
passes a gradient element's rounding on in full when ``|g|`` is near 1e-3. The same module run in
float64 agrees with the reference to ~2e-6 (checked by hand), so the gap is precision, not formula."""
STATE_ATOL = 1e-5
"""``W`` and queue features: unit-scale numbers (observed gap ≤ 7e-7)."""
ENTROPY_ATOL = 1e-5
"""The queue's ``h`` (observed gap ≤ 2e-6)."""


# --------------------------------------------------------------------------------------------------
# the reference (TTA2 §7), float64


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def entropy_of_mean(rows: torch.Tensor) -> torch.Tensor:
    """``−Σ p̄ log p̄`` with ``p̄`` the mean softmax of the rows (one row: its entropy)."""
    p = softmax(rows).mean(dim=0)
    return -(p * torch.log(p)).sum()


def colnorm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=0, keepdim=True))


def rownorm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True))


def reference_info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean over rows i of ``logsumexp_j(q_i·k_j/τ) − q_i·k_i/τ`` with unit rows."""
    logits = rownorm(query) @ rownorm(key).t() / temperature
    top = logits.max(dim=1, keepdim=True).values
    lse = top.squeeze(1) + torch.log(torch.exp(logits - top).sum(dim=1))
    return (lse - torch.diagonal(logits)).mean()


def adamw_first_step(grad: torch.Tensor, lr: float, eps: float = 1e-3, weight_decay: float = 0.1) -> torch.Tensor:
    """A new AdamW's first step from a zero parameter (β = 0.9, 0.999; bias-corrected moments)."""
    param = torch.zeros_like(grad)
    param = param * (1 - lr * weight_decay)
    m = (1 - 0.9) * grad
    v = (1 - 0.999) * grad * grad
    m_hat, v_hat = m / (1 - 0.9), v / (1 - 0.999)
    return param - lr * m_hat / (torch.sqrt(v_hat) + eps)


def argmax_first(z: torch.Tensor) -> int:
    values = z.tolist()
    return max(range(len(values)), key=lambda k: (values[k], -k))


class ReferenceDPE:
    """TTA2 §7 steps 1-9, float64, with a plain dict of per-class lists ``[(f, h), ...]``."""

    def __init__(self, classes, scale, alpha, beta, lr_text, lr_image, align, reselect=False, threshold=0.1, temperature=0.01):
        t = classes.double()
        self.W = (t / torch.sqrt((t * t).sum(dim=1, keepdim=True))).t().clone()
        self.scale, self.alpha, self.beta = scale, alpha, beta
        self.lr_text, self.lr_image, self.align = lr_text, lr_image, align
        self.reselect, self.threshold, self.temperature = reselect, threshold, temperature
        self.m = 0
        self.queue: dict[int, list] = {}
        self.events: dict[str, int] = {"append": 0, "replace": 0, "reject": 0, "evolve": 0, "keep": 0,
                                       "view0_out": 0, "reselected": 0, "several_classes": 0}

    def observe(self, feats, W):
        z = self.scale * feats @ W
        n = feats.shape[0]
        if n == 1:
            return feats[0], z[0], entropy_of_mean(z), [0]
        ent = [float(entropy_of_mean(z[v : v + 1])) for v in range(n)]
        keep = sorted(range(n), key=lambda v: (ent[v], v))[: int(n * 0.1)]
        return feats[keep].mean(0), z[keep].mean(0), entropy_of_mean(z[keep]), keep

    def insert(self, label, f, h):
        items = self.queue.get(label)
        if items is None:
            self.queue[label] = [(f, h)]
            self.events["append"] += 1
            return
        if len(items) < 3:
            items.append((f, h))
            self.events["append"] += 1
        elif h < items[-1][1]:
            items[-1] = (f, h)
            self.events["replace"] += 1
        else:
            self.events["reject"] += 1
        self.queue[label] = sorted(items, key=lambda it: it[1])

    def cache_term(self, f, keys, classes):
        out = torch.zeros(C, dtype=torch.float64)
        for j, label in enumerate(classes):
            out[label] = out[label] + self.alpha * torch.exp(-self.beta * (1 - f @ keys[:, j]))
        return out

    def step(self, feats: torch.Tensor):
        feats = feats.double()
        log2c = math.log2(C)
        # 1-2
        r_t = torch.zeros_like(self.W, requires_grad=True)
        W1 = colnorm(self.W + r_t)
        f, z, H, keep = self.observe(feats, W1)
        label = argmax_first(z.detach())
        self.events["view0_out"] += int(0 not in keep)
        # 3-4
        self.insert(label, f.detach(), float(H) / log2c)
        # 5
        classes = sorted(self.queue)
        K = torch.stack([sum(it[0] for it in self.queue[c]) / len(self.queue[c]) for c in classes], dim=1)
        r_v = torch.zeros_like(K, requires_grad=True)
        K1 = colnorm(K + r_v)
        # 6
        final = z + self.cache_term(f.detach(), K1, classes)
        loss = entropy_of_mean(final.unsqueeze(0)) + self.align * reference_info_nce(K1.t(), W1[:, classes].t(), self.temperature)
        self.events["several_classes"] += int(len(classes) > 1)
        # 7
        g_t, g_v = torch.autograd.grad(loss, [r_t, r_v])
        R_t, R_v = adamw_first_step(g_t, self.lr_text), adamw_first_step(g_v, self.lr_image)
        # 8
        W2, K2 = colnorm(self.W + R_t), colnorm(K + R_v)
        if self.reselect:
            f2, z2, _, keep2 = self.observe(feats, W2)
            self.events["reselected"] += int(sorted(keep2) != sorted(keep))
        else:
            f2, z2 = feats[0], self.scale * feats[0] @ W2
        final = (z2 + self.cache_term(f2, K2, classes)).detach()
        # 9
        e = float(entropy_of_mean(final.unsqueeze(0))) / log2c
        if e < self.threshold:
            self.m += 1
            self.W = (self.W * self.m / (self.m + 1) + W2 / (self.m + 1)).detach()
            self.events["evolve"] += 1
        else:
            self.events["keep"] += 1
        return final, e


# --------------------------------------------------------------------------------------------------
# inputs


class ScaleOnly(nn.Module):
    """A stand-in model for feature-level tests: CLIP's temperature 100 and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))


def class_features(seed: int = 9) -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(seed))


def stream(n_images: int, n_views: int, seed: int = 0) -> list[torch.Tensor]:
    """Views mostly orthogonal to every class, leaning slightly towards a mix of two classes, so the
    entropies spread over both sides of the evolution gate. (A view near a class would be so sure,
    with CLIP's ×100, that fp32's cancellation in ``log p_max ≈ 0`` would dominate the entropy's
    gradient, and through AdamW's ``g/(|g| + 1e-3)`` the step.) On every other image view 0 leans
    further towards its class, so the 6 selected views sometimes include it."""
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(class_features(), dim=-1)
    q, _ = torch.linalg.qr(torch.cat([t.t(), torch.randn(D, D - C, generator=g)], dim=1))
    complement = q[:, C:]
    images = []
    for i in range(n_images):
        a, b = torch.randperm(C, generator=g)[:2].tolist()
        mix = float(torch.rand(1, generator=g)) * 0.5
        lean = 0.01 + 0.09 * float(torch.rand(1, generator=g))
        base = F.normalize(complement @ torch.randn(D - C, generator=g), dim=0)
        centre = base + lean * ((1 - mix) * t[a] + mix * t[b])
        spread = 0.02 + 0.08 * torch.rand(n_views, 1, generator=g)
        views = centre + spread * torch.randn(n_views, D, generator=g) / math.sqrt(D)
        if i % 2:
            views[0] = centre + 0.15 * t[a]
        images.append(F.normalize(views, dim=-1))
    return images


SETTINGS = {
    # (n_views, reselect, alpha, beta, lr_text, lr_image, align)
    "one_view": (1, False, 2.0, 7.0, 1e-3, 2e-3, 1.5),
    "64_views": (64, False, 2.0, 5.0, 1e-3, 2e-3, 0.5),
    "imagenet_a": (64, True, 2.0, 5.0, 1e-3, 2e-3, 2.5),
}


def make_pair(name: str, model=None):
    n_views, reselect, alpha, beta, lr_text, lr_image, align = SETTINGS[name]
    model = ScaleOnly() if model is None else model
    kw = dict(alpha=alpha, beta=beta, lr_text=lr_text, lr_image=lr_image, align=align)
    adapter = DPEAdapter(model, class_features(), reselect=reselect, **kw)
    ref = ReferenceDPE(class_features(), float(model.logit_scale.exp()), reselect=reselect, **kw)
    return adapter, ref, n_views


def assert_state_matches(adapter: DPEAdapter, ref: ReferenceDPE, loosen: float = 1.0) -> None:
    """W, m and the queue (classes, entropies in order, features) equal the reference's, within
    the tolerances above times ``loosen``."""
    state = adapter.state_dict()
    torch.testing.assert_close(state["W"].double(), ref.W, atol=STATE_ATOL * loosen, rtol=0)
    assert state["m"] == ref.m
    assert sorted(int(k) for k in state["queue"]) == sorted(ref.queue)
    for label, items in ref.queue.items():
        saved = state["queue"][str(label)]
        torch.testing.assert_close(saved["entropy"], torch.tensor([h for _, h in items], dtype=torch.float64), atol=ENTROPY_ATOL * loosen, rtol=0)
        torch.testing.assert_close(saved["features"].double(), torch.stack([f for f, _ in items]), atol=STATE_ATOL * loosen, rtol=0)


# --------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_stream_equals_reference(name):
    """40 images through both: the queue fills, replaces and refuses; W evolves on some images and
    not on others; several classes make InfoNCE matter; 64 views select 6 (view 0 not always among
    them); ImageNet-A re-selects under the adapted prototypes."""
    adapter, ref, n_views = make_pair(name)
    for i, feats in enumerate(stream(40, n_views, seed=1)):
        got = adapter.adapt_features(feats)
        want, e = ref.step(feats)
        assert abs(e - 0.1) > 1e-4, "an image this near the gate would make the test fragile"
        assert int(got.logits.argmax()) == argmax_first(want), f"image {i}"
        torch.testing.assert_close(got.logits.double(), want, atol=LOGIT_ATOL, rtol=0)
        assert torch.equal(got.logits, got.calibration_logits)
        assert_state_matches(adapter, ref)
    ev = ref.events
    # every rule of TTA2 §7 was exercised by this stream
    assert ev["append"] > 0 and ev["replace"] > 0 and ev["reject"] > 0, ev
    assert ev["evolve"] > 1 and ev["keep"] > 0 and ev["several_classes"] > 30, ev
    assert adapter.state_dict()["seen"] == 40
    if n_views == 64:
        assert ev["view0_out"] > 0, ev
    if name == "imagenet_a":
        assert ev["reselected"] > 0, ev


def test_reselection_changes_the_prediction():
    """ImageNet-A's rule (re-selected 6 views) and the view-0 rule give different logits on the same stream."""
    a, _, n_views = make_pair("imagenet_a")
    b, _, _ = make_pair("64_views")
    b.lr_text, b.lr_image, b.align = a.lr_text, a.lr_image, a.align
    diffs = [float((a.adapt_features(f).logits - b.adapt_features(f).logits).abs().max()) for f in stream(5, n_views, seed=1)]
    assert max(diffs) > 1.0


def test_published_learning_rates_match_the_reference():
    """ImageNet's published setting (α 6, β 5, lr 6e-4, λ 0.5) on 64 views: the residual steps are
    small, so this checks the step's size, not just its direction."""
    kw = dict(alpha=6.0, beta=5.0, lr_text=6e-4, lr_image=6e-4, align=0.5)
    model = ScaleOnly()
    adapter = DPEAdapter(model, class_features(), **kw)
    ref = ReferenceDPE(class_features(), 100.0, **kw)
    for feats in stream(12, 64, seed=4):
        got = adapter.adapt_features(feats).logits
        want, _ = ref.step(feats)
        torch.testing.assert_close(got.double(), want, atol=LOGIT_ATOL, rtol=0)
    assert_state_matches(adapter, ref)


def test_evolution_gate_and_threshold():
    """``e < threshold`` evolves W (m counts up), otherwise W stays: a threshold of 0 never evolves,
    one of 10 (above any normalised entropy) always does."""
    feats = stream(10, 1, seed=1)
    _, _, alpha, beta, lr_text, lr_image, align = SETTINGS["one_view"]
    kw = dict(alpha=alpha, beta=beta, lr_text=lr_text, lr_image=lr_image, align=align)
    frozen = DPEAdapter(ScaleOnly(), class_features(), threshold=0.0, **kw)
    for f in feats:
        frozen.adapt_features(f)
    assert frozen.state_dict()["m"] == 0
    assert torch.equal(frozen.state_dict()["W"], F.normalize(class_features(), dim=-1).t())
    eager = DPEAdapter(ScaleOnly(), class_features(), threshold=10.0, **kw)
    ref = ReferenceDPE(class_features(), 100.0, threshold=10.0, **kw)
    for f in feats:
        torch.testing.assert_close(eager.adapt_features(f).logits.double(), ref.step(f)[0], atol=LOGIT_ATOL, rtol=0)
    assert eager.state_dict()["m"] == ref.m == 10
    assert_state_matches(eager, ref)


def test_text_prototypes_are_a_running_mean_never_renormalised():
    """With large steps and every image evolving, W's columns drift well off unit length and still
    equal the reference's running mean ``W·m/(m+1) + W''/(m+1)``: a re-normalised W would not."""
    kw = dict(alpha=2.0, beta=5.0, lr_text=3e-2, lr_image=3e-2, align=0.5)
    adapter = DPEAdapter(ScaleOnly(), class_features(), threshold=10.0, **kw)
    ref = ReferenceDPE(class_features(), 100.0, threshold=10.0, **kw)
    for f in stream(6, 1, seed=7):
        adapter.adapt_features(f)
        ref.step(f)
    # steps 30x larger than the streams' scale the gradients' rounding up too (see LOGIT_ATOL)
    assert_state_matches(adapter, ref, loosen=10.0)
    assert float((ref.W.norm(dim=0) - 1).abs().min()) > 1e-3


def test_infonce_temperature_reaches_the_loss():
    """A temperature other than the published 0.01 changes the step, as the reference's does."""
    kw = dict(alpha=2.0, beta=5.0, lr_text=1e-3, lr_image=2e-3, align=2.5)
    adapter = DPEAdapter(ScaleOnly(), class_features(), temperature=0.2, **kw)
    ref = ReferenceDPE(class_features(), 100.0, temperature=0.2, **kw)
    published = DPEAdapter(ScaleOnly(), class_features(), **kw)
    gaps = []
    for f in stream(8, 1, seed=8):
        got = adapter.adapt_features(f).logits
        torch.testing.assert_close(got.double(), ref.step(f)[0], atol=LOGIT_ATOL, rtol=0)
        gaps.append(float((got - published.adapt_features(f).logits).abs().max()))
    assert max(gaps) > 10 * LOGIT_ATOL
    assert_state_matches(adapter, ref)


def test_info_nce():
    """m = 1: exactly 0 (the only logit is the target's). m = 3: the hand-written mean cross-entropy,
    and the temperature divides the cosines."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, D, generator=g), torch.randn(1, D, generator=g)
    assert float(info_nce(q, k)) == 0.0
    q, k = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    for temperature in (0.01, 0.5):
        want = reference_info_nce(q.double(), k.double(), temperature)
        assert float(info_nce(q, k, temperature)) == pytest.approx(float(want), abs=1e-4)
    assert float(info_nce(q, k)) == pytest.approx(float(reference_info_nce(q.double(), k.double())), abs=1e-4)


def test_first_image_has_one_class_and_no_alignment_gradient():
    """On the first image the queue holds one class: InfoNCE is 0 and so λ changes nothing, while
    from the second class on it does."""
    feats = stream(6, 1, seed=1)
    results = {}
    for align in (0.0, 50.0):
        adapter = DPEAdapter(ScaleOnly(), class_features(), alpha=3.0, beta=7.0, lr_text=2e-2, lr_image=3e-2, align=align)
        results[align] = [adapter.adapt_features(f).logits for f in feats]
    assert torch.equal(results[0.0][0], results[50.0][0])
    assert any(float((x - y).abs().max()) > 1e-3 for x, y in zip(results[0.0], results[50.0]))


def orthogonal_features(coefficients: list[float], seed: int) -> torch.Tensor:
    """One unit view whose class coefficients (on axes 0-3, the class features) are exactly
    ``coefficients`` and whose remaining 12 axes, orthogonal to every class, depend on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    head = torch.tensor(coefficients)
    tail = F.normalize(torch.randn(D - C, generator=g), dim=0) * math.sqrt(1 - float((head * head).sum()))
    return torch.cat([head, tail]).unsqueeze(0)


def test_queue_rule_with_exact_entropy_ties():
    """TTA2 §7.4 on one class, with exact entropy ties: the class features are axes 0-3 and the
    text learning rate is 0, so W stays on those axes and two views with the same class
    coefficients have bitwise the same logits and entropy, while their features differ.

    Stream (class 0, entropy levels low < mid < high): high → [high]; low → [low, high];
    high' (tie) → appended after high: [low, high, high']; mid → replaces the last, high' (a
    reversed tie order would drop high instead); high'' → not lower than the last: refused.
    """
    low, mid, high = [0.5, 0.1, 0.0, 0.0], [0.5, 0.47, 0.0, 0.0], [0.5, 0.49, 0.0, 0.0]
    script = [(high, 1), (low, 2), (high, 3), (mid, 4), (high, 5)]
    eye = torch.eye(C, D)
    kw = dict(alpha=2.0, beta=5.0, lr_text=0.0, lr_image=5e-2, align=1.0)
    adapter = DPEAdapter(ScaleOnly(), eye, **kw)
    ref = ReferenceDPE(eye, 100.0, **kw)
    tails = {}
    for coefficients, seed in script:
        f = orthogonal_features(coefficients, seed)
        tails[seed] = f[0, C:]
        torch.testing.assert_close(adapter.adapt_features(f).logits.double(), ref.step(f)[0], atol=LOGIT_ATOL, rtol=0)
        assert_state_matches(adapter, ref)
    entries = adapter.queue.entries[0]
    assert len(entries) == 3 and entries[1].entropy < entries[2].entropy
    # which features stayed: low (2), mid (4), high (1); the tied high' (3) was replaced
    kept = [min(tails, key=lambda s: float((e.feature[C:] - tails[s]).abs().max())) for e in entries]
    assert kept == [2, 4, 1]
    assert ref.events == {**ref.events, "append": 3, "replace": 1, "reject": 1}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_resume_midway_gives_the_same_remaining_results(name):
    """``state_dict`` after 20 images, through a saved file's bytes, into a fresh adapter: the
    remaining 20 give the uninterrupted stream's logits exactly (the same fp32 computation on the
    same state, so equality, not closeness, is the claim)."""
    whole, _, n_views = make_pair(name)
    images = stream(40, n_views, seed=2)
    want = [whole.adapt_features(f).logits for f in images]
    first, _, _ = make_pair(name)
    for f in images[:20]:
        first.adapt_features(f)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed, _, _ = make_pair(name)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state_dict()["seen"] == 20 and resumed.state_dict()["m"] == first.state_dict()["m"] > 0
    for f, expected in zip(images[20:], want[20:]):
        assert torch.equal(resumed.adapt_features(f).logits, expected)
    assert resumed.state_dict()["seen"] == 40 and resumed.state_dict()["m"] == whole.state_dict()["m"]


def test_loading_an_empty_state_starts_a_fresh_stream():
    images = stream(12, 1, seed=5)
    used, _, _ = make_pair("one_view")
    for f in images:
        used.adapt_features(f)
    used.load_state_dict({})
    state = used.state_dict()
    assert state["queue"] == {} and state["m"] == 0 and state["seen"] == 0
    fresh, _, _ = make_pair("one_view")
    for f in images[:6]:
        assert torch.equal(used.adapt_features(f).logits, fresh.adapt_features(f).logits)


@pytest.mark.parametrize("n_views,reselect", [(1, False), (64, True)])
def test_adapt_on_tiny_clip_equals_reference(tiny_clip, n_views, reselect):
    """Images through ``adapt(views)`` (the tiny CLIP's tower and temperature) against the reference
    on hand-encoded features."""
    model = tiny_clip.model
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9))
    kw = dict(alpha=6.0, beta=5.0, lr_text=1e-2, lr_image=2e-2, align=2.5)
    adapter = DPEAdapter(model, classes, reselect=reselect, **kw)
    ref = ReferenceDPE(classes, float(model.logit_scale.exp()), reselect=reselect, **kw)
    for i in range(4):
        views = torch.randn(n_views, 3, 224, 224, generator=torch.Generator().manual_seed(80 + i))
        out = adapter.adapt(views)
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views), dim=-1)
        want, _ = ref.step(feats)
        assert int(out.logits.argmax()) == argmax_first(want)
        torch.testing.assert_close(out.logits.double(), want, atol=LOGIT_ATOL, rtol=0)
        assert set(out.timings) == {"images", "step"}
    assert adapter.online and adapter.state_dict()["seen"] == 4


def test_timings_per_phase(tiny_clip, monkeypatch):
    """``images`` is the image encoding, ``step`` everything DPE does after it (8 s each on a fake clock)."""
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    adapter = DPEAdapter(tiny_clip.model, torch.randn(C, 32), alpha=6.0, beta=5.0, lr_text=1e-3, lr_image=1e-3, align=0.5)
    views = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert adapter.adapt(views).timings == {"images": 8.0, "step": 8.0}


def test_adapting_under_no_grad():
    """The evaluation loop may run under ``torch.no_grad()``; the residuals' step still happens."""
    images = stream(8, 1, seed=6)
    a, _, _ = make_pair("one_view")
    b, _, _ = make_pair("one_view")
    with torch.no_grad():
        got = [a.adapt_features(f).logits for f in images]
    for f, expected in zip(images, got):
        assert torch.equal(b.adapt_features(f).logits, expected)


def test_image_dtype_reaches_the_encoder(tiny_clip):
    adapter = DPEAdapter(tiny_clip.model, torch.randn(C, 32), alpha=1.0, beta=1.0, lr_text=0.0, lr_image=0.0, align=0.0,
                         image_dtype=torch.bfloat16)
    assert adapter.image_encoder.dtype == torch.bfloat16


def test_restored_state_lives_on_the_adapters_device_in_fp32():
    """A state saved from the CPU goes back onto the adapter's device (the meta device stands in
    for a GPU: it shows where each restored tensor is put without needing one), and a W saved in
    another precision is restored as fp32, the precision every step runs in."""
    source, _, _ = make_pair("one_view")
    for f in stream(8, 1, seed=3):
        source.adapt_features(f)
    state = source.state_dict()
    target, _, _ = make_pair("one_view")
    target.initial = target.initial.to("meta")
    target.load_state_dict(state)
    assert target.text.device.type == "meta"
    features = [e.feature for items in target.queue.entries.values() for e in items]
    assert features and all(t.device.type == "meta" for t in features)
    widened, _, _ = make_pair("one_view")
    widened.load_state_dict({**state, "W": state["W"].double()})
    assert widened.text.dtype == torch.float32 and torch.equal(widened.text, state["W"])


def test_evolution_needs_an_entropy_strictly_below_the_threshold():
    """[dpe main_dpe.py:288] ``e < 0.1``: a threshold equal to the image's own ``e`` does not evolve."""
    from protext.tta.selection import marginal_entropy

    f = stream(1, 1, seed=1)[0]
    probe, _, _ = make_pair("one_view")
    e = float(marginal_entropy(probe.adapt_features(f).logits.unsqueeze(0))) / math.log2(C)
    at, _, _ = make_pair("one_view")
    at.threshold = e
    at.adapt_features(f)
    above, _, _ = make_pair("one_view")
    above.threshold = math.nextafter(e, math.inf)
    above.adapt_features(f)
    assert (at.state_dict()["m"], above.state_dict()["m"]) == (0, 1)


def test_visual_prototypes_follow_the_query_feature():
    """Each class's prototype is ``Σ f_i / n_c`` over its queue, in the query feature's dtype and on
    its device (the meta device stands in for a GPU), classes ascending, with one-hot values."""
    from protext.tta.dpe import visual_prototypes
    from protext.tta.tda import CacheEntry, TDACache

    g = torch.Generator().manual_seed(11)
    queue = TDACache(3)
    for label, h in [(2, 0.3), (0, 0.2), (2, 0.1), (2, 0.2)]:
        queue.update(label, CacheEntry(torch.randn(D, generator=g), h))
    keys, values, classes = visual_prototypes(queue, C, torch.zeros(D, dtype=torch.float64))
    assert classes == [0, 2] and keys.dtype == torch.float64 and keys.shape == (D, 2)
    for j, label in enumerate(classes):
        items = [e.feature.double() for e in queue.entries[label]]
        want = sum(items) / len(items)
        torch.testing.assert_close(keys[:, j], want, atol=1e-12, rtol=0)
    assert values.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]] and values.dtype == torch.float64
    keys, values, _ = visual_prototypes(queue, C, torch.zeros(D, device="meta"))
    assert keys.device.type == "meta" and values.device.type == "meta"


def test_info_nce_labels_follow_the_prototypes_device():
    """The target indices are made on the prototypes' device (meta stands in for a GPU, where CPU
    targets would be refused)."""
    q = torch.randn(3, D, device="meta")
    assert info_nce(q, q).device.type == "meta"


def test_text_prototypes_live_on_the_models_device():
    """W is put where the model's first parameter is (meta stands in for a GPU; the temperature
    stays readable on the CPU)."""

    class OnMeta(ScaleOnly):
        def __init__(self) -> None:
            super().__init__()
            del self.logit_scale
            self.anchor = nn.Parameter(torch.empty(1, device="meta"))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    adapter = DPEAdapter(OnMeta(), class_features(), alpha=1.0, beta=1.0, lr_text=0.0, lr_image=0.0, align=0.0)
    assert adapter.initial.device.type == "meta" and adapter.text.device.type == "meta"
    assert adapter.scale == pytest.approx(100.0, rel=1e-6)
