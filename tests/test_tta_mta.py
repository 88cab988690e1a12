"""MTA against a plain reference loop written from TTA.md §4 (float64, loops over views)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from protext.tta import TTAConfig, base, build_adapter
from protext.tta.mta import MTASettings, mta_mode, view_bandwidths


def reference_bandwidths(x: torch.Tensor, share: float = 0.3) -> list[float]:
    """TTA.md §4.1: ``sqrt(0.5 · mean d²)`` over the ``⌊share · (n − 1)⌋`` nearest other views."""
    x = x.double()
    n = x.shape[0]
    k = int(share * (n - 1))
    h = []
    for v in range(n):
        d2 = sorted(float(((x[v] - x[u]) ** 2).sum()) for u in range(n) if u != v)
        h.append(math.sqrt(0.5 * sum(d2[:k]) / k))
    return h


def reference_mta(x: torch.Tensor, z: torch.Tensor, share=0.3, lambda_y=0.2, lambda_q=4.0, outer=5, inner=5, tol=1e-6):
    """TTA.md §4 view by view in fp64: bandwidths, 5 outer rounds of ≤5 + ≤5 iterations, 1e-6 stops
    (the published constants are the defaults; the keywords try other settings)."""
    x = x.double()
    n = x.shape[0]
    h = reference_bandwidths(x, share)
    P = z.double().softmax(-1)
    A = P @ P.t()

    def kernel(m):
        return torch.tensor([math.exp(-float(((x[v] - m) ** 2).sum()) / (2 * h[v] ** 2)) for v in range(n)], dtype=torch.float64)

    y = torch.full((n,), 1.0 / n, dtype=torch.float64)
    m = x[0].clone()
    rounds = []
    for _ in range(outer):
        ny = nm = 0
        for _ in range(inner):
            ny += 1
            old = y
            y = ((kernel(m) + lambda_q * (A @ y)) / lambda_y).softmax(0)
            if float((y - old).norm()) < tol:
                break
        for _ in range(inner):
            nm += 1
            old = m
            w = kernel(m) * y
            m = sum(w[v] * x[v] for v in range(n)) / w.sum()
            m = m / m.norm()
            if float((m - old).norm()) < tol:
                break
        rounds.append((ny, nm))
    return torch.tensor(h, dtype=torch.float64), m.double(), y.double(), rounds


def _views(n: int, seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(16, generator=g)
    x = F.normalize(centre + spread * torch.randn(n, 16, generator=g), dim=-1)
    x[3] = F.normalize(torch.randn(16, generator=g), dim=-1)  # an outlier view
    t = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    return x, 30.0 * x @ t.t()


@pytest.mark.parametrize("n,seed,spread", [(64, 0, 0.3), (64, 1, 0.8), (20, 2, 0.5), (64, 3, 0.05)])
def test_mode_equals_reference_loop(n, seed, spread):
    x, z = _views(n, seed, spread)
    h, m, y, rounds = reference_mta(x, z)
    torch.testing.assert_close(view_bandwidths(x).double(), h, atol=1e-6, rtol=1e-6)
    got = mta_mode(x, z)
    assert got.iterations == rounds
    torch.testing.assert_close(got.mode.double(), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.inlierness.double(), y, atol=1e-5, rtol=0)


def test_early_stops_happen_and_bandwidth_neighbours():
    # some rounds stop early and some run all 5: both paths of the loop are exercised above
    seen = [r for n, s, sp in [(64, 0, 0.3), (64, 1, 0.8), (20, 2, 0.5), (64, 3, 0.05)] for r in mta_mode(*_views(n, s, sp)).iterations]
    assert any(a < 5 or b < 5 for a, b in seen) and any(a == 5 or b == 5 for a, b in seen)
    # ⌊0.3·63⌋ = 18 nearest other views: duplicates of a view count as neighbours at distance 0
    x = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(7)), dim=-1)
    x[1:19] = x[0]
    assert float(view_bandwidths(x)[0]) == 0.0 and float(view_bandwidths(x[:-1].roll(1, 0))[1]) == 0.0


def test_adapter_on_tiny_clip(tiny_clip):
    model = tiny_clip.model
    views = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    classes = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    adapter = build_adapter(TTAConfig(method="mta", views=16), model, "dtd", text_features=classes)
    out = adapter.adapt(views)
    with torch.no_grad():
        x = F.normalize(model.encode_image(views), dim=-1)
    t = F.normalize(classes, dim=-1)
    scale = float(model.logit_scale.exp())
    _, m, _, _ = reference_mta(x, scale * x @ t.t())
    torch.testing.assert_close(out.logits.double(), scale * m @ t.double().t(), atol=1e-4, rtol=0)
    batch = adapter.adapt_batch([views, views[:8]])
    torch.testing.assert_close(batch[0].logits, out.logits, atol=1e-4, rtol=0)
    assert int(batch[0].logits.argmax()) == int(out.logits.argmax())


def test_bandwidth_neighbour_count_on_few_views():
    """``⌊0.3 · (n − 1)⌋`` neighbours: 1 for 5-7 views, 2 for 8-10, 3 for 11 and 12 (at 64 views
    ``⌊0.3 · 62⌋`` would give the same 18, so the count is checked where it steps)."""
    for n in range(5, 13):
        x = F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=-1)
        want = torch.tensor(reference_bandwidths(x), dtype=torch.float64)
        torch.testing.assert_close(view_bandwidths(x.double()), want, atol=1e-12, rtol=0)


def test_too_few_views_for_a_bandwidth_are_refused_not_nan():
    """2 to 4 views leave ``⌊0.3 · (n − 1)⌋ = 0`` neighbours: an error, where the mean would be NaN."""
    for n in (2, 3, 4):
        x = F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=-1)
        with pytest.raises(ValueError, match=f"{n} views"):
            mta_mode(x, torch.randn(n, 3))
    assert mta_mode(x[:1], torch.randn(1, 3)).mode.isfinite().all()


def test_one_view_is_its_own_mode():
    """One view (``--tta-views 1``): nothing to shift towards, the mode is the view, its inlierness 1,
    no iteration; on the features' device (the meta device stands in for a GPU)."""
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    z = 30.0 * x @ F.normalize(torch.randn(6, 16, generator=g), dim=-1).t()
    got = mta_mode(x, z)
    assert torch.equal(got.mode, x[0]) and got.inlierness.tolist() == [1.0] and got.iterations == []
    meta = mta_mode(x.to("meta"), z.to("meta"))
    assert meta.mode.device.type == meta.inlierness.device.type == "meta" and meta.inlierness.shape == (1,)


@pytest.mark.parametrize(
    "settings",
    [
        MTASettings(neighbours=0.5),
        MTASettings(outer=1, inner=1),  # one inlierness step from the uniform start, one mode step
        MTASettings(lambda_y=0.5, lambda_q=2.0, outer=2, inner=3),
        # the stops are strict, so a zero tolerance never stops early, not even when a sharp
        # inlierness softmax (λ_y = 0.001) reaches an exact fixed point and the change is 0.0
        MTASettings(lambda_y=1e-3, tolerance=0.0),
    ],
)
def test_mode_with_other_settings_equals_reference_loop(settings):
    x, z = _views(20, 5, 0.5)
    s = settings
    h, m, y, rounds = reference_mta(x, z, s.neighbours, s.lambda_y, s.lambda_q, s.outer, s.inner, s.tolerance)
    got = mta_mode(x, z, settings)
    assert got.iterations == rounds
    torch.testing.assert_close(got.mode.double(), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.inlierness.double(), y, atol=1e-5, rtol=0)


def test_outlier_first_view_stays_the_mode_as_a_unit_vector():
    """The mode starts at view 0. An outlier view 0 gets inlierness ~2e-8 and every other kernel
    underflows at it, so the weights sum to ~2e-8: their weighted mean (divided by that sum) is
    view 0 itself, a unit vector, round after round."""
    g = torch.Generator().manual_seed(11)
    centre = torch.randn(16, generator=g)
    x = F.normalize(centre + 0.1 * torch.randn(16, 16, generator=g), dim=-1)
    x[0] = F.normalize(-centre, dim=0)
    t = F.normalize(torch.stack([centre, -centre] + [torch.randn(16, generator=g) for _ in range(3)]), dim=-1)
    z = 30.0 * x @ t.t()
    _, m, y, rounds = reference_mta(x, z)
    assert float(y[0]) < 1e-7  # the situation the test is about
    got = mta_mode(x, z)
    assert got.iterations == rounds
    torch.testing.assert_close(got.mode.double(), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mode, x[0], atol=1e-6, rtol=0)


def test_image_dtype_is_used(tiny_clip):
    """bf16 image encoding: the mode of a bf16 image tower's features, far from the fp32 one."""
    model = tiny_clip.model
    views = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    classes = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    t = F.normalize(classes, dim=-1).double()
    scale = float(model.logit_scale.exp())
    visual = copy.deepcopy(model.visual).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = F.normalize(visual(views.to(torch.bfloat16)).float(), dim=-1)
        fp32 = F.normalize(model.encode_image(views), dim=-1)
    want = scale * reference_mta(bf16, scale * bf16 @ t.float().t())[1] @ t.t()
    other = scale * reference_mta(fp32, scale * fp32 @ t.float().t())[1] @ t.t()
    config = TTAConfig(method="mta", views=16, image_dtype=torch.bfloat16)
    got = build_adapter(config, model, "dtd", text_features=classes).adapt(views).logits
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    assert float((want - other).abs().max()) > 20 * 1e-4


def test_timings_per_phase_and_batch_share_of_image_encoding(tiny_clip, monkeypatch):
    """``images`` is the image encoding, ``meanshift`` the rest; a batch's single encoding forward
    is shared equally among its images. Every stopwatch reading of the fake clock is 8 s after the
    previous one, so each phase lasts 8 s (8 divides by 4 exactly)."""
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    classes = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    adapter = build_adapter(TTAConfig(method="mta", views=6), tiny_clip.model, "dtd", text_features=classes)
    views = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert adapter.adapt(views).timings == {"images": 8.0, "meanshift": 8.0}
    batch = adapter.adapt_batch([views, views.flip(-1), views.flip(-2), views])
    assert [out.timings for out in batch] == [{"images": 2.0, "meanshift": 8.0}] * 4
