"""TDA against a hand-written reference of TTA.md §3: a scripted stream through both caches."""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from protext.tta import TTAConfig, base, build_adapter, view_maker
from protext.tta.tda import CacheEntry, Observation, TDAAdapter, TDACache, observe

C, D = 4, 8
ALPHA, BETA = 2.0, 5.0
NEG_ALPHA, NEG_BETA = 0.117, 1.0


class ReferenceTDA:
    """TTA.md §3.3-3.5 with Python lists of (feature, H[, p]) per class, float64 sums."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA):
        self.alpha, self.beta = alpha, beta
        self.pos: dict[int, list] = {}
        self.neg: dict[int, list] = {}

    @staticmethod
    def _update(cache, label, item, shots):
        items = cache.setdefault(label, [])
        if len(items) < shots:
            items.append(item)
        elif item[1] < items[-1][1]:
            items[-1] = item
        cache[label] = sorted(items, key=lambda it: it[1])

    def step(self, f, z, p, H):
        label = max(range(C), key=lambda k: (z[k], -k))
        self._update(self.pos, label, (f, H), 3)
        h = H / math.log2(C)
        if 0.2 < h < 0.5:
            self._update(self.neg, label, (f, H, p), 2)
        final = [float(v) for v in z]
        for cls, items in self.pos.items():
            for key, _ in items:
                a = sum(float(x) * float(y) for x, y in zip(f, key))
                final[cls] += self.alpha * math.exp(-self.beta * (1 - a))
        for cls, items in self.neg.items():
            for key, _, probs in items:
                a = sum(float(x) * float(y) for x, y in zip(f, key))
                w = math.exp(-NEG_BETA * (1 - a))
                for k in range(C):
                    if 0.03 < float(probs[k]) < 1.0:
                        final[k] -= NEG_ALPHA * w
        return final


# (predicted class, H in nats); with C = 4, h = H / 2, so the band 0.2 < h < 0.5 is 0.4 < H < 1.0
SCRIPT = [
    (0, 0.1),   # pos[0] append; h 0.05: no negative
    (0, 0.5),   # pos[0] append; h 0.25: neg[0] append
    (0, 0.3),   # pos[0] full, re-sorted [0.1, 0.3, 0.5]
    (0, 0.2),   # replaces the worst (0.5): [0.1, 0.2, 0.3]
    (0, 0.9),   # worse than the worst: pos unchanged; h 0.45: neg[0] [0.5, 0.9]
    (0, 0.7),   # pos unchanged; neg[0] full, replaces 0.9: [0.5, 0.7]
    (2, 0.4),   # h exactly 0.2: not in the band
    (2, 1.0),   # h exactly 0.5: not in the band
    (1, 0.6),   # pos[1], neg[1]
    (1, 0.6),   # equal entropy: appended after (stable)
    (0, 0.15),  # replaces 0.3: [0.1, 0.15, 0.2]
    (3, 0.05),
    (1, 0.6),   # pos[1] gets its third 0.6
    (1, 0.6),   # not lower than the worst: unchanged
]
PROBS = [0.03, 0.031, 0.029, 1.0, 0.5, 0.2, 0.0, 0.97]  # 0.03 and 1.0 themselves are excluded


def _scripted(step: int, label: int, entropy: float) -> Observation:
    g = torch.Generator().manual_seed(100 + step)
    feature = F.normalize(torch.randn(D, generator=g), dim=0) * (0.9 if step % 2 else 1.0)  # a mean of views need not be unit
    logits = torch.randn(C, generator=g)
    logits[label] = logits.max() + 1.0
    probs = torch.tensor([PROBS[(step + k) % len(PROBS)] for k in range(C)])
    return Observation(feature, logits, probs, entropy)


def _adapter(tiny_clip, classes=None) -> TDAAdapter:
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9)) if classes is None else classes
    return TDAAdapter(tiny_clip.model, classes, ALPHA, BETA)


def _resumed_after(tiny_clip, stream: list[Observation]) -> TDAAdapter:
    """A fresh adapter that loaded, through a saved file's bytes, the state of one that saw ``stream``."""
    first = _adapter(tiny_clip)
    for obs in stream:
        first.step(obs)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _adapter(tiny_clip)
    resumed.load_state_dict(torch.load(buffer))
    return resumed


def test_scripted_stream_caches_and_logits(tiny_clip):
    adapter, ref = _adapter(tiny_clip), ReferenceTDA()
    for step, (label, entropy) in enumerate(SCRIPT):
        obs = _scripted(step, label, entropy)
        got = adapter.step(obs)
        want = ref.step(obs.feature.tolist(), obs.logits.tolist(), obs.probs.tolist(), entropy)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=0)
        for cache, reference in ((adapter.positive, ref.pos), (adapter.negative, ref.neg)):
            assert sorted(k for k, v in cache.entries.items() if v) == sorted(reference)
            for cls, items in reference.items():
                assert [e.entropy for e in cache.entries[cls]] == [it[1] for it in items]
                for entry, item in zip(cache.entries[cls], items):
                    assert entry.feature.tolist() == item[0]
    # the walk above reached what the script says it does
    assert [e.entropy for e in adapter.positive.entries[0]] == [0.1, 0.15, 0.2]
    assert [e.entropy for e in adapter.negative.entries[0]] == [0.5, 0.7]
    assert 2 not in adapter.negative.entries and len(adapter.positive.entries[1]) == 3


def reference_observe(feats: torch.Tensor, classes: torch.Tensor, scale: float, fraction: float = 0.1):
    """TTA.md §3.1: one view as it is; 64 views: the 6 of lowest entropy (⌊n · fraction⌋), means of f, z, softmax."""
    z = scale * feats.double() @ classes.double().t()
    if feats.shape[0] == 1:
        p = z[0].softmax(-1)
        return feats[0].double(), z[0], p, float(-(p * p.log()).sum())
    p = z.softmax(-1)
    ent = -(p * p.log()).sum(-1)
    keep = sorted(range(feats.shape[0]), key=lambda v: (float(ent[v]), v))[: int(feats.shape[0] * fraction)]
    pbar = p[keep].mean(0)
    return feats[keep].double().mean(0), z[keep].mean(0), pbar, float(-(pbar * pbar.log()).sum())


@pytest.mark.parametrize("n_views", [1, 64])
def test_observation(n_views):
    feats = F.normalize(torch.randn(n_views, D, generator=torch.Generator().manual_seed(n_views)), dim=-1)
    classes = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    got = observe(feats, classes, 30.0, 0.1)
    f, z, p, H = reference_observe(feats, classes, 30.0)
    torch.testing.assert_close(got.feature.double(), f, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.logits.double(), z, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.probs.double(), p, atol=1e-6, rtol=0)
    assert got.entropy == pytest.approx(H, abs=1e-5)


@pytest.mark.parametrize("dataset", ["imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet", "dtd", "eurosat"])
def test_view_count_per_dataset(dataset):
    maker = view_maker(TTAConfig(method="tda"), dataset, None)
    shift = dataset in ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
    assert maker.n_views == (64 if shift else 1) and (maker.augmix is not None) == shift


@pytest.mark.parametrize("dataset,n_views", [("imagenet_sketch", 64), ("dtd", 1)])
def test_stream_on_tiny_clip_equals_reference(tiny_clip, dataset, n_views):
    """Views from TDA's view maker (64 AugMix views on the natural shifts, the image alone elsewhere)
    through the adapter, against the reference cache on hand-encoded features."""
    model = tiny_clip.model
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9))
    adapter = build_adapter(TTAConfig(method="tda"), model, dataset, text_features=classes)
    cfg = TTAConfig(method="tda").resolved(dataset)
    maker = view_maker(TTAConfig(method="tda"), dataset, None)
    assert maker.n_views == n_views and (maker.augmix is not None) == (n_views == 64)
    ref = ReferenceTDA(cfg.tda_alpha, cfg.tda_beta)
    normed = F.normalize(classes, dim=-1)
    for i in range(3):
        image = torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(i))
        views = maker(image, torch.Generator().manual_seed(50 + i))
        out = adapter.adapt(views)
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views), dim=-1)
        f, z, p, H = reference_observe(feats, normed, float(model.logit_scale.exp()))
        want = ref.step(f.tolist(), z.tolist(), p.tolist(), H)
        torch.testing.assert_close(out.logits, torch.tensor(want, dtype=torch.float32), atol=1e-4, rtol=0)
        assert torch.equal(out.logits, out.calibration_logits)
    assert adapter.online


def test_state_dict_resumes_the_stream(tiny_clip):
    stream = [_scripted(step, label, entropy) for step, (label, entropy) in enumerate(SCRIPT)]
    whole = _adapter(tiny_clip)
    want = [whole.step(obs) for obs in stream]
    resumed = _resumed_after(tiny_clip, stream[:7])
    for obs, expected in zip(stream[7:], want[7:]):
        assert torch.equal(resumed.step(obs), expected)
    assert resumed.state_dict()["seen"] == len(SCRIPT)


def test_resume_is_exact_for_entropies_finer_than_float32(tiny_clip):
    """A resumed stream must decide as the uninterrupted one even when two entropies differ by less
    than float32 resolution: 0.3 and 0.6 round up in float32, so a cache that saved them in float32
    would let a later 0.3 + 1e-9 (0.6 + 1e-9) replace an entry it must not replace."""
    script = [(0, 0.1), (0, 0.2), (0, 0.3), (1, 0.45), (1, 0.6)]  # pos[0] full; neg[1] = [0.45, 0.6]
    after = [(0, 0.3 + 1e-9), (1, 0.6 + 1e-9), (2, 0.05)]  # not lower than the worst: no replacement
    stream = [_scripted(step, label, entropy) for step, (label, entropy) in enumerate(script + after)]
    whole = _adapter(tiny_clip)
    want = [whole.step(obs) for obs in stream]
    resumed = _resumed_after(tiny_clip, stream[: len(script)])
    assert [e.entropy for e in resumed.positive.entries[0]] == [0.1, 0.2, 0.3]
    assert [e.entropy for e in resumed.negative.entries[1]] == [0.45, 0.6]
    for obs, expected in zip(stream[len(script):], want[len(script):]):
        assert torch.equal(resumed.step(obs), expected)
    assert [e.entropy for e in resumed.positive.entries[0]] == [0.1, 0.2, 0.3]
    assert [e.entropy for e in resumed.negative.entries[1]] == [0.45, 0.6]


def test_loading_an_empty_state_starts_a_fresh_stream(tiny_clip):
    """An empty state (what a method without carried state saves) leaves no cache and no count
    behind, even in an adapter that had seen images: it then predicts as a new adapter does."""
    stream = [_scripted(step, label, entropy) for step, (label, entropy) in enumerate(SCRIPT)]
    used = _adapter(tiny_clip)
    for obs in stream[:7]:
        used.step(obs)
    used.load_state_dict({})
    assert used.state_dict() == {"positive": {}, "negative": {}, "seen": 0}
    fresh = _adapter(tiny_clip)
    for obs in stream[:3]:
        assert torch.equal(used.step(obs), fresh.step(obs))
    assert used.state_dict()["seen"] == 3


def test_restored_caches_live_on_the_class_features_device(tiny_clip):
    """A state saved from the CPU goes back onto the adapter's device. The meta device stands in for
    a GPU here: it shows where each restored tensor is put without needing one."""
    source = _adapter(tiny_clip)
    for step, (label, entropy) in enumerate(SCRIPT):
        source.step(_scripted(step, label, entropy))
    state = source.state_dict()
    target = _adapter(tiny_clip)
    target.classes = target.classes.to("meta")
    target.load_state_dict(state)
    for cache in (target.positive, target.negative):
        tensors = [t for items in cache.entries.values() for e in items for t in (e.feature, e.probs) if t is not None]
        assert tensors and all(t.device.type == "meta" for t in tensors)
    assert any(e.probs is not None for items in target.negative.entries.values() for e in items)


def test_selection_share_is_used_on_several_views(tiny_clip):
    """``--tta-selection 0.25`` on 8 views averages the 2 most confident (the default 0.1 would keep 1)."""
    model = tiny_clip.model
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9))
    adapter = build_adapter(TTAConfig(method="tda", views=8, selection=0.25), model, "dtd", text_features=classes)
    cfg = TTAConfig(method="tda").resolved("dtd")
    ref = ReferenceTDA(cfg.tda_alpha, cfg.tda_beta)
    for i in range(2):
        views = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(60 + i))
        out = adapter.adapt(views)
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views), dim=-1)
        f, z, p, H = reference_observe(feats, F.normalize(classes, dim=-1), float(model.logit_scale.exp()), 0.25)
        want = ref.step(f.tolist(), z.tolist(), p.tolist(), H)
        torch.testing.assert_close(out.logits, torch.tensor(want, dtype=torch.float32), atol=1e-4, rtol=0)


def test_timings_per_phase(tiny_clip, monkeypatch):
    """``images`` is the image encoding, ``cache`` the observation, cache update and final logits.
    Every stopwatch reading of the fake clock is 8 s after the previous one: each phase lasts 8 s."""
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    adapter = _adapter(tiny_clip)
    views = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert adapter.adapt(views).timings == {"images": 8.0, "cache": 8.0}


def test_full_cache_replaces_its_worst_entry_with_any_better_one():
    """A full 3-shot cache takes a new entry whose entropy lies between its second and its worst,
    dropping the worst (TTA.md §3.3); a 2-shot cache cannot tell ``worst`` from ``second``."""
    cache, ref = TDACache(3), ReferenceTDA()
    for i, entropy in enumerate([0.1, 0.2, 0.3, 0.25, 0.22, 0.05, 0.21]):
        feature = torch.full((D,), float(i))
        cache.update(0, CacheEntry(feature, entropy))
        ReferenceTDA._update(ref.pos, 0, (feature.tolist(), entropy), 3)
        assert [e.entropy for e in cache.entries[0]] == [it[1] for it in ref.pos[0]]
        assert [e.feature.tolist() for e in cache.entries[0]] == [it[0] for it in ref.pos[0]]
    assert [e.entropy for e in cache.entries[0]] == [0.05, 0.1, 0.2]


def test_affinity_is_computed_on_the_query_feature_device():
    """Cached keys are brought to the query feature's device (the meta device stands in for a GPU;
    it cannot check the values' move, as a meta product accepts a CPU operand), and the affinity
    is ``Σ_j exp(−β(1 − f·k_j))·values_j``."""
    cache = TDACache(3)
    for label in (0, 2):
        cache.update(label, CacheEntry(F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(label)), dim=0), 0.1))
    values = F.one_hot(torch.tensor([0, 2]), C).float()
    feature = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(7)), dim=0)
    on_meta = cache.affinity_logits(feature.to("meta"), BETA, values)
    assert on_meta.device.type == "meta" and on_meta.shape == (C,)
    keys = [e.feature for label in (0, 2) for e in cache.entries[label]]
    want = [0.0] * C
    for label, key in zip((0, 2), keys):
        want[label] += math.exp(-BETA * (1.0 - float(key @ feature)))
    torch.testing.assert_close(cache.affinity_logits(feature, BETA, values), torch.tensor(want), atol=1e-6, rtol=0)


def test_default_selection_and_bf16_image_encoding(tiny_clip):
    """Built without a selection share, TDA averages the ⌊64 · 0.1⌋ = 6 most confident of 64 views;
    with ``image_dtype`` bf16 it reads a bf16 image tower's features (far from the fp32 ones)."""
    model = tiny_clip.model
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9))
    adapter = TDAAdapter(model, classes, ALPHA, BETA, image_dtype=torch.bfloat16)
    views = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(70))
    visual = copy.deepcopy(model.visual).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = F.normalize(visual(views.to(torch.bfloat16)).float(), dim=-1)
        fp32 = F.normalize(model.encode_image(views), dim=-1)
    scale, normed = float(model.logit_scale.exp()), F.normalize(classes, dim=-1)
    f, z, p, H = reference_observe(bf16, normed, scale)
    want = torch.tensor(ReferenceTDA().step(f.tolist(), z.tolist(), p.tolist(), H), dtype=torch.float32)
    torch.testing.assert_close(adapter.adapt(views).logits, want, atol=1e-4, rtol=0)
    f, z, p, H = reference_observe(fp32, normed, scale)
    other = torch.tensor(ReferenceTDA().step(f.tolist(), z.tolist(), p.tolist(), H), dtype=torch.float32)
    assert float((want - other).abs().max()) > 20 * 1e-4
