"""MTA against a plain reference loop written from TTA.md §4 (float64, loops over views)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protext.tta import TTAConfig, build_adapter
from protext.tta.mta import mta_mode, view_bandwidths


def reference_mta(x: torch.Tensor, z: torch.Tensor):
    """TTA.md §4 view by view in fp64: bandwidths, 5 outer rounds of ≤5 + ≤5 iterations, 1e-6 stops."""
    x = x.double()
    n = x.shape[0]
    k = int(0.3 * (n - 1))
    h = []
    for v in range(n):
        d2 = sorted(float(((x[v] - x[u]) ** 2).sum()) for u in range(n) if u != v)
        h.append(math.sqrt(0.5 * sum(d2[:k]) / k))
    P = z.double().softmax(-1)
    A = P @ P.t()

    def kernel(m):
        return torch.tensor([math.exp(-float(((x[v] - m) ** 2).sum()) / (2 * h[v] ** 2)) for v in range(n)], dtype=torch.float64)

    y = torch.full((n,), 1.0 / n, dtype=torch.float64)
    m = x[0].clone()
    rounds = []
    for _ in range(5):
        ny = nm = 0
        for _ in range(5):
            ny += 1
            old = y
            y = ((kernel(m) + 4 * (A @ y)) / 0.2).softmax(0)
            if float((y - old).norm()) < 1e-6:
                break
        for _ in range(5):
            nm += 1
            old = m
            w = kernel(m) * y
            m = sum(w[v] * x[v] for v in range(n)) / w.sum()
            m = m / m.norm()
            if float((m - old).norm()) < 1e-6:
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
