"""BoostAdapter against a hand-written reference of TTA2.md §8 on streams that fill its caches.

The reference below is written from the spec alone, with Python lists and float64 sums; it calls
nothing from ``protext.tta.boost`` or ``protext.tta.tda``. Variants of it that break one rule (no
boosting room, boosting entries that persist, TDA's entropy-ordered negatives, the other query)
are run on the same streams to show that the streams tell each rule apart: a test that passed with
the rule broken would prove nothing.

Tolerances: the adapter computes in float32 and the reference in float64 from the same float32
features, so logits are compared to 1e-4 (|z| ≤ 15, a handful of cache terms) and entropies to
1e-5; labels and which entry a cache holds are compared exactly.
"""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from protext.tta import base
from protext.tta.boost import BoostAdapter, FIFOCache, boosting_views, n_boosting
from protext.tta.tda import CacheEntry, Observation, TDAAdapter

C, D = 4, 32  # tiny-clip's embedding is 32-wide; with C = 4 the band 0.2 < H / log2(4) < 0.5 is 0.4 < H < 1.0
ALPHA, BETA = 2.0, 5.0
LOGIT_ATOL, ENTROPY_ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------------------
# the reference (TTA2.md §8 steps 1-6, TTA.md §3)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def _entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0.0)


def _argmax(z: list[float]) -> int:
    return max(range(len(z)), key=lambda k: (z[k], -k))


def _insert_sorted(cache: dict, label: int, item: tuple, capacity: int) -> None:
    """§8.3: class absent → [item]; else append, stable sort by H, keep the first ``capacity``."""
    if label not in cache:
        cache[label] = [item]
        return
    cache[label] = sorted(cache[label] + [item], key=lambda it: it[1])[:capacity]


class ReferenceBoost:
    """TTA2.md §8 per image. ``negatives="entropy"`` (TDA's rule) and ``persist_boost=True`` are
    wrong on purpose: only to show a stream distinguishes them from the published rules."""

    def __init__(self, classes, scale, alpha=ALPHA, beta=BETA, delta=0, fraction=0.1, query="view0", *, negatives="fifo", persist_boost=False):
        self.classes = [[float(x) for x in row] for row in classes]
        self.scale, self.alpha, self.beta, self.delta = float(scale), alpha, beta, delta
        self.fraction, self.query, self.negatives, self.persist_boost = fraction, query, negatives, persist_boost
        self.pos: dict[int, list] = {}
        self.neg: dict[int, list] = {}
        self.largest_boosted_list = 0
        self.neg_out_of_entropy_order = False

    def step(self, feats: list[list[float]]) -> list[float]:
        n = len(feats)
        z = [[self.scale * _dot(f, t) for t in self.classes] for f in feats]  # §8.1
        p = [_softmax(row) for row in z]
        H = [_entropy(row) for row in p]
        order = sorted(range(n), key=lambda v: (H[v], v))
        if self.query == "view0" or n == 1:  # §8.2
            f, zq, pq, Hq = feats[0], z[0], p[0], H[0]
        else:
            keep = order[: max(1, int(n * self.fraction))]
            f = [sum(feats[v][d] for v in keep) / len(keep) for d in range(len(feats[0]))]
            zq = [sum(z[v][k] for v in keep) / len(keep) for k in range(C)]
            pq = [sum(p[v][k] for v in keep) / len(keep) for k in range(C)]
            Hq = _entropy(pq)
        label = _argmax(zq)
        _insert_sorted(self.pos, label, (f, Hq), 3)  # §8.3
        boosted = {cls: list(items) for cls, items in self.pos.items()}  # §8.4
        for v in order[: int(n * self.fraction)]:
            _insert_sorted(boosted, _argmax(z[v]), (feats[v], H[v]), 3 + self.delta)
        self.largest_boosted_list = max(self.largest_boosted_list, max(len(items) for items in boosted.values()))
        if self.persist_boost:
            self.pos = boosted
        if 0.2 < Hq / math.log2(C) < 0.5:  # §8.5
            if self.negatives == "fifo":
                items = self.neg.setdefault(label, [])
                items.append((f, Hq, pq))
                if len(items) > 2:
                    items.pop(0)
            else:
                _insert_sorted(self.neg, label, (f, Hq, pq), 2)
        self.neg_out_of_entropy_order |= any(items[0][1] > items[1][1] for items in self.neg.values() if len(items) == 2)
        final = list(zq)  # §8.6
        for cls, items in boosted.items():
            for key, _ in items:
                final[cls] += self.alpha * math.exp(-self.beta * (1.0 - _dot(f, key)))
        for items in self.neg.values():
            for key, _, probs in items:
                weight = math.exp(-1.0 * (1.0 - _dot(f, key)))
                for k in range(C):
                    if 0.03 < probs[k] < 1.0:
                        final[k] -= 0.117 * weight
        return final


# ----------------------------------------------------------------------------------------------
# streams


def _classes() -> torch.Tensor:
    return F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(9)), dim=-1)


def _stream(n_images: int, n_views: int, seed: int = 0) -> list[torch.Tensor]:
    """Normalised fp32 view features: each view leans towards its image's class by a random amount
    up to the image's own ease, so view entropies spread from near 0 to near log C, the low-entropy
    views mostly agree, and hard images (all views unsure) reach the negative band on either query."""
    g = torch.Generator().manual_seed(seed)
    classes = _classes()
    out = []
    for _ in range(n_images):
        label = int(torch.randint(C, (1,), generator=g))
        ease = 0.2 + 1.8 * float(torch.rand((), generator=g))  # some images are hard in every view
        lean = ease * torch.rand(n_views, 1, generator=g)
        noise = torch.randn(n_views, D, generator=g) / math.sqrt(D)
        out.append(F.normalize(lean * classes[label] + noise, dim=-1))
    return out


class _ClipStub(nn.Module):
    """All a feature-level adapter reads from CLIP: a parameter (for the device) and the
    temperature, ``exp(log(1 / 0.07))`` as in tiny-clip. Building the real tiny-clip takes seconds,
    and the stream tests need only this (the end-to-end test uses the real one)."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


@pytest.fixture(scope="module")
def clip_stub() -> SimpleNamespace:
    return SimpleNamespace(model=_ClipStub())


def _adapter(clip, **kwargs) -> BoostAdapter:
    settings = dict(alpha=ALPHA, beta=BETA, delta=0)
    settings.update(kwargs)
    return BoostAdapter(clip.model, _classes(), **settings)


def _reference(clip, **kwargs) -> ReferenceBoost:
    return ReferenceBoost(_classes().tolist(), float(clip.model.logit_scale.detach().exp()), **kwargs)


def _run_reference(ref: ReferenceBoost, stream: list[torch.Tensor]) -> list[list[float]]:
    return [ref.step(feats.tolist()) for feats in stream]


def _labels(rows) -> list[int]:
    return [_argmax([float(v) for v in row]) for row in rows]


def _largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(float(x) - float(y)) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def _assert_caches_equal(adapter: BoostAdapter, ref: ReferenceBoost) -> None:
    for cache, reference in ((adapter.positive, ref.pos), (adapter.negative, ref.neg)):
        assert sorted(k for k, v in cache.entries.items() if v) == sorted(reference)
        for cls, items in reference.items():
            got = cache.entries[cls]
            assert len(got) == len(items)
            for entry, item in zip(got, items):
                assert entry.entropy == pytest.approx(item[1], abs=ENTROPY_ATOL)
                torch.testing.assert_close(entry.feature.double(), torch.tensor(item[0], dtype=torch.float64), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# the rules, one by one


STREAM_CASES = [
    # (delta, query, n_views, fraction, n_images); seed 3 gives each case the coverage it asserts
    (0, "view0", 16, 0.25, 50),
    (2, "view0", 16, 0.25, 50),
    (0, "selected", 16, 0.25, 50),
    (3, "selected", 16, 0.25, 50),
    (3, "selected", 64, 0.1, 30),  # the published 64 views, 6 boosting views
    (1, "view0", 64, 0.1, 30),
]


@pytest.mark.parametrize("delta,query,n_views,fraction,n_images", STREAM_CASES)
def test_stream_matches_the_reference(clip_stub, delta, query, n_views, fraction, n_images):
    """Every image's logits and label, and both persistent caches after it, as the reference says."""
    stream = _stream(n_images, n_views, seed=3)
    adapter = _adapter(clip_stub, delta=delta, query=query, fraction=fraction)
    ref = _reference(clip_stub, delta=delta, query=query, fraction=fraction)
    for feats in stream:
        got = adapter.adapt_features(feats)
        want = ref.step(feats.tolist())
        torch.testing.assert_close(got.logits, torch.tensor(want, dtype=torch.float32), atol=LOGIT_ATOL, rtol=0)
        assert _argmax(got.logits.tolist()) == _argmax(want)
        assert torch.equal(got.logits, got.calibration_logits)
        _assert_caches_equal(adapter, ref)
    # the stream filled the caches: every class has 3 persistent positives, the boosting copy
    # reached its 3 + δ, and some negative list holds 2 in arrival (not entropy) order
    assert all(len(ref.pos.get(cls, [])) == 3 for cls in range(C))
    assert ref.largest_boosted_list == 3 + delta
    assert ref.neg_out_of_entropy_order
    assert adapter.seen == n_images


@pytest.mark.parametrize("query", ["view0", "selected"])
def test_the_streams_tell_every_rule_apart(clip_stub, query):
    """On the 50-image, 16-view stream, breaking any one rule moves some logit by far more than the
    tolerance the stream test allows: the boosting room (δ 0 vs 2), the boosting copy not
    persisting, FIFO negatives, the query, boosting at all. (The stream's labels are confident, so
    most broken rules move no label; the query does.)"""
    stream = _stream(50, 16, seed=3)
    right = _run_reference(_reference(clip_stub, delta=2, query=query, fraction=0.25), stream)
    other_query = "selected" if query == "view0" else "view0"
    wrong = {
        "no boosting room": _reference(clip_stub, delta=0, query=query, fraction=0.25),
        "boosting persists": _reference(clip_stub, delta=2, query=query, fraction=0.25, persist_boost=True),
        "entropy-ordered negatives": _reference(clip_stub, delta=2, query=query, fraction=0.25, negatives="entropy"),
        "other query": _reference(clip_stub, delta=2, query=other_query, fraction=0.25),
        "no boosting": _reference(clip_stub, delta=2, query=query, fraction=0.0),
    }
    for name, ref in wrong.items():
        assert _largest_gap(_run_reference(ref, stream), right) > 500 * LOGIT_ATOL, name
    assert _labels(_run_reference(wrong["other query"], stream)) != _labels(right)


def test_temporary_cache_does_not_persist(clip_stub):
    """The boosted copy holds up to 3 + δ entries per class for one image; the persistent cache keeps
    at most 3 and never a boosting view: building the copy leaves it untouched."""
    stream = _stream(30, 16, seed=5)
    adapter = _adapter(clip_stub, delta=3, fraction=0.25)
    for feats in stream:
        adapter.adapt_features(feats)
    before = {cls: list(items) for cls, items in adapter.positive.entries.items()}
    logits = adapter.scale * stream[0] @ adapter.classes.t()
    boosted = adapter.boosted_cache(stream[0], logits)
    assert adapter.positive.entries == before and all(len(items) == 3 for items in before.values())
    assert boosted.shots == 6 and max(len(items) for items in boosted.entries.values()) > 3
    assert boosted.entries is not adapter.positive.entries
    assert all(boosted.entries[cls] is not adapter.positive.entries[cls] for cls in before)
    # the boosting views themselves are the copy's new keys
    chosen = boosting_views(logits, 0.25)
    keys = [e.feature for items in boosted.entries.values() for e in items]
    assert sum(any(torch.equal(stream[0][int(v)], k) for k in keys) for v in chosen) >= 1


def test_fifo_negative_cache_drops_the_oldest():
    """TDA would keep the two lowest entropies (0.5, 0.7); the FIFO cache keeps the two latest."""
    cache = FIFOCache(2)
    for i, entropy in enumerate([0.5, 0.9, 0.7]):
        cache.update(1, CacheEntry(torch.full((D,), float(i)), entropy, torch.zeros(C)))
    assert [e.entropy for e in cache.entries[1]] == [0.9, 0.7]
    assert [float(e.feature[0]) for e in cache.entries[1]] == [1.0, 2.0]
    cache.update(1, CacheEntry(torch.zeros(D), 0.1, torch.zeros(C)))
    assert [e.entropy for e in cache.entries[1]] == [0.7, 0.1]
    assert 0 not in cache.entries


@pytest.mark.parametrize("query", ["view0", "selected"])
def test_one_view_is_tda_with_fifo_negatives(clip_stub, query):
    """With one view nothing boosts (int(1 · 0.1) = 0) and both queries are view 0: BoostAdapter is
    TDA with a FIFO negative cache. Against TDA itself, the first image where they part is one
    whose negative list was full and whose entropy order differs from arrival order."""
    stream = _stream(50, 1, seed=11)
    adapter, tda = _adapter(clip_stub, delta=3, query=query), TDAAdapter(clip_stub.model, _classes(), ALPHA, BETA)
    ref = _reference(clip_stub, delta=3, query=query)
    results = []
    for feats in stream:
        got = adapter.adapt_features(feats)
        want = ref.step(feats.tolist())
        torch.testing.assert_close(got.logits, torch.tensor(want, dtype=torch.float32), atol=LOGIT_ATOL, rtol=0)
        _assert_caches_equal(adapter, ref)
        results.append((got.logits, tda.adapt_features(feats).logits))
    assert ref.largest_boosted_list == 3 and ref.neg_out_of_entropy_order
    agree = [torch.equal(a, b) for a, b in results]
    assert agree[0] and not all(agree)
    tda_order = _run_reference(_reference(clip_stub, delta=3, query=query, negatives="entropy"), stream)
    assert _largest_gap(tda_order, [r[0].tolist() for r in results]) > 500 * LOGIT_ATOL


def test_boosting_count_has_no_floor():
    """``int(n · fraction)`` as published: one view, or nine at 0.1, boost nothing."""
    assert [n_boosting(n, 0.1) for n in (1, 9, 10, 16, 64)] == [0, 0, 1, 1, 6]
    assert n_boosting(16, 0.25) == 4
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0]])
    assert boosting_views(logits, 0.5).tolist() == [1, 3]  # equal entropies: index order
    assert boosting_views(logits[:1], 0.1).numel() == 0


def test_end_to_end_on_tiny_clip(tiny_clip):
    """``adapt(views)`` encodes the views with the image tower and then follows the reference;
    ``adapt_batch`` gives each image what ``adapt`` gives it in order."""
    model = tiny_clip.model
    images = [torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(40 + i)) for i in range(6)]
    adapter, batched = _adapter(tiny_clip, delta=2, fraction=0.25, query="selected"), _adapter(tiny_clip, delta=2, fraction=0.25, query="selected")
    ref = _reference(tiny_clip, delta=2, fraction=0.25, query="selected")
    outs = []
    for views in images:
        out = adapter.adapt(views)
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views), dim=-1)
        want = ref.step(feats.tolist())
        torch.testing.assert_close(out.logits, torch.tensor(want, dtype=torch.float32), atol=LOGIT_ATOL, rtol=0)
        assert set(out.timings) == {"images", "cache"}
        outs.append(out.logits)
    got = batched.adapt_batch(images[:3]) + batched.adapt_batch(images[3:])
    for a, b in zip(got, outs):
        torch.testing.assert_close(a.logits, b, atol=1e-5, rtol=0)
    assert adapter.online and adapter.seen == 6


def test_state_dict_resumes_the_stream(clip_stub):
    """Saved midway (through a file's bytes) and loaded into a fresh adapter, the remaining images
    get the same logits bit for bit. The negative lists at the cut are in arrival order, not entropy
    order, so a state that lost that order would drop the wrong entry next."""
    stream = _stream(50, 16, seed=2)  # a negative list is out of entropy order from image 22 on
    settings = dict(delta=2, fraction=0.25, query="selected")
    whole = _adapter(clip_stub, **settings)
    want = [whole.adapt_features(feats).logits for feats in stream]
    first = _adapter(clip_stub, **settings)
    for feats in stream[:25]:
        first.adapt_features(feats)
    assert any(items[0].entropy > items[1].entropy for items in first.negative.entries.values() if len(items) == 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _adapter(clip_stub, **settings)
    resumed.load_state_dict(torch.load(buffer))
    assert isinstance(resumed.negative, FIFOCache)
    for feats, expected in zip(stream[25:], want[25:]):
        assert torch.equal(resumed.adapt_features(feats).logits, expected)
    assert resumed.state_dict()["seen"] == 50


def test_timings_per_phase(tiny_clip, monkeypatch):
    """``images`` is the encoding, ``cache`` the query, boosting, cache updates and final logits (8 s each on a fake clock)."""
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    views = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert _adapter(tiny_clip).adapt(views).timings == {"images": 8.0, "cache": 8.0}


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(query="mean"), "^BoostAdapter query must be one of"), (dict(delta=-1), "^BoostAdapter delta must be"),
     (dict(delta=1.0), "^BoostAdapter delta must be"), (dict(delta=True), "^BoostAdapter delta must be")],
)
def test_bad_settings_are_refused(clip_stub, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _adapter(clip_stub, **kwargs)


def test_band_and_mask_edges_are_excluded(clip_stub):
    """One-view images scripted at the edges: ``h = H / log2 4`` exactly 0.2 or 0.5 stays out of the
    negative cache, 0.3 goes in, and there its probabilities exactly 0.03 and 1.0 (and 0) mark no
    class while 0.5 does. The image's own negative entry already counts in its logits."""
    adapter = _adapter(clip_stub)
    f = F.normalize(torch.arange(1.0, D + 1.0), dim=0)
    z = torch.tensor([1.0, 3.0, 2.0, 0.0])
    probs = torch.tensor([0.03, 1.0, 0.5, 0.0])
    for entropy in (0.4, 1.0):
        adapter.boost_step(Observation(f, z, probs, entropy), f[None], z[None])
        assert not adapter.negative
    got = adapter.boost_step(Observation(f, z, probs, 0.6), f[None], z[None])
    assert [e.entropy for e in adapter.negative.entries[1]] == [0.6]
    # three copies of f in the positive cache (class 1), one in the negative cache; f·f = 1
    want = z + torch.tensor([0.0, 3 * ALPHA, 0.0, 0.0]) - torch.tensor([0.0, 0.0, 0.117, 0.0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tda_single_observation_step_is_refused(clip_stub):
    """TDA's ``step(obs)`` sees no views to boost with; calling it on BoostAdapter is a mistake."""
    adapter = _adapter(clip_stub)
    with pytest.raises(TypeError, match="^BoostAdapter adapts from all of an image's views"):
        adapter.step(None)


def test_bf16_image_encoding_reaches_the_image_tower(tiny_clip):
    """``image_dtype`` bf16 reads a bf16 copy of the image tower: the logits follow the reference on
    those features, and are far from what the fp32 features would give."""
    model = tiny_clip.model
    views = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(71))
    adapter = _adapter(tiny_clip, delta=1, fraction=0.25, image_dtype=torch.bfloat16)
    visual = copy.deepcopy(model.visual).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = F.normalize(visual(views.to(torch.bfloat16)).float(), dim=-1)
        fp32 = F.normalize(model.encode_image(views), dim=-1)
    got = adapter.adapt(views).logits
    want = torch.tensor(_reference(tiny_clip, delta=1, fraction=0.25).step(bf16.tolist()), dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    other = torch.tensor(_reference(tiny_clip, delta=1, fraction=0.25).step(fp32.tolist()), dtype=torch.float32)
    assert float((want - other).abs().max()) > 20 * LOGIT_ATOL
