"""DMN-ZS against a hand-written reference of TTA2.md §6: scripted memory writes, long streams that
fill and overflow every memory, the oracle β₂, a tiny CLIP end to end, and an exact resume.

The reference below is written from the spec alone, in plain Python floats (float64) and lists; it
never calls ``protext.tta.dmn``. Labels, slots and chosen β₂ are compared exactly; probabilities
with ``rtol = 1e-5`` plus ``atol = 1e-6`` (the module computes in fp32, as the published code).
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
from protext.tta.dmn import BETA2_CANDIDATES, DMNAdapter, DynamicMemory, oracle_beta2

C, D = 4, 8
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------------------------------
# the reference (TTA2.md §6, float64)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _norm(a):
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a]


def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


class ReferenceDMN:
    """§6 steps 2-7 per image; the memory is a list of ``[key, entropy]`` per class in slot order."""

    def __init__(self, classes, scale, memory_size, beta=5.5, fraction=0.1, beta2=1.0):
        self.text = [_norm([float(x) for x in t]) for t in classes]
        self.scale, self.size, self.beta, self.fraction, self.beta2 = float(scale), memory_size, beta, fraction, beta2
        self.mem = [[] for _ in self.text]
        self.events = []  # ("append" | "replace" | "drop", label, slot)

    def write(self, label, key, h):
        """Step 5: append while there is room; when full, replace the largest stored entropy (the
        last such slot among equal maxima) if h is below at least one stored entropy; else drop."""
        slots = self.mem[label]
        if len(slots) < self.size:
            slots.append([key, h])
            self.events.append(("append", label, len(slots) - 1))
            return len(slots) - 1
        if any(h < e for _, e in slots):
            top = max(e for _, e in slots)
            j = max(i for i, (_, e) in enumerate(slots) if e == top)
            slots[j] = [key, h]
            self.events.append(("replace", label, j))
            return j
        self.events.append(("drop", label, None))
        return None

    def read(self, f0):
        """Step 6: per class, attention over its stored keys plus its text feature; empty slots add nothing."""
        q = _norm(f0)
        scores = []
        for c, t in enumerate(self.text):
            entries = [_norm(k) for k, _ in self.mem[c]] + [t]
            acc = [0.0] * len(f0)
            for k in entries:
                w = math.exp(-self.beta * (1.0 - _dot(q, k)))
                acc = [a + w * x for a, x in zip(acc, k)]
            scores.append(self.scale * _dot(_norm(acc), f0))
        return _softmax(scores)

    def step(self, feats):
        feats = [[float(x) for x in f] for f in feats]
        probs = [_softmax([self.scale * _dot(f, t) for t in self.text]) for f in feats]  # step 2
        ent = [-sum(p * math.log(p + 1e-6) for p in row) for row in probs]  # step 3
        keep = sorted(range(len(feats)), key=lambda v: (ent[v], v))[: max(1, int(len(feats) * self.fraction))]
        pbar = [sum(probs[v][c] for v in keep) / len(keep) for c in range(len(self.text))]
        label = max(range(len(pbar)), key=lambda c: (pbar[c], -c))  # step 4, first index on ties
        h = -sum(p * math.log(p + 1e-8) for p in pbar)
        slot = self.write(label, feats[0], h)  # step 5, before the read-out
        p_mem = self.read(feats[0])  # step 6
        fused = [a + self.beta2 * b for a, b in zip(probs[0], p_mem)]  # step 7
        return SimpleNamespace(p_text=probs[0], p_mem=p_mem, fused=fused, label=label, h=h, slot=slot)


def reference_oracle(p_text, p_mem, labels, candidates):
    best, best_acc = None, None
    for b in candidates:
        correct = 0
        for pt, pm, y in zip(p_text, p_mem, labels):
            s = [x + b * z for x, z in zip(pt, pm)]
            correct += max(range(len(s)), key=lambda c: (s[c], -c)) == y
        acc = 100.0 * correct / len(labels)
        if best_acc is None or acc > best_acc:
            best, best_acc = b, acc
    return best, best_acc


# --------------------------------------------------------------------------------------------------
# inputs


class ScaleOnly(nn.Module):
    """What ``DMNAdapter`` reads from a CLIP when fed features: a parameter (for the device) and the temperature."""

    def __init__(self, scale: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))


def _classes(seed: int = 9, dim: int = D) -> torch.Tensor:
    return torch.randn(C, dim, generator=torch.Generator().manual_seed(seed))


def _image(i: int, classes: torch.Tensor, n_views: int, only=None) -> torch.Tensor:
    """Views near a class feature (class ``i`` cycles unless ``only`` restricts it), with noise of a
    per-image strength so that entropies vary, and lengths 0.9-1.1 (the features are not quite unit,
    which pins where the published code normalises and where it does not)."""
    g = torch.Generator().manual_seed(1000 + i)
    choices = list(range(C)) if only is None else list(only)
    y = choices[int(torch.randint(len(choices), (1,), generator=g))]
    base_f = F.normalize(classes[y], dim=0)
    noise = 0.2 + 1.5 * float(torch.rand(1, generator=g))
    feats = F.normalize(base_f + noise * torch.randn(n_views, classes.shape[1], generator=g) / math.sqrt(classes.shape[1]), dim=-1)
    return feats * (0.9 + 0.2 * torch.rand(n_views, 1, generator=g))


def _check(out, ref, beta2=1.0):
    torch.testing.assert_close(out.extras["p_text"].double(), torch.tensor(ref.p_text, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.extras["p_mem"].double(), torch.tensor(ref.p_mem, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    fused = torch.tensor(ref.fused, dtype=torch.float64)
    torch.testing.assert_close(out.logits.double().exp(), fused, rtol=RTOL, atol=ATOL)
    assert torch.equal(out.logits, out.calibration_logits)
    assert int(out.logits.argmax()) == int(fused.argmax())


def _memory_matches(adapter: DMNAdapter, ref: ReferenceDMN):
    mem = adapter.memory
    assert mem.counts.tolist() == [len(s) for s in ref.mem]
    for c, slots in enumerate(ref.mem):
        for j, (key, h) in enumerate(slots):
            torch.testing.assert_close(mem.keys[c, j].double(), torch.tensor(_norm(key), dtype=torch.float64), rtol=RTOL, atol=ATOL)
            assert float(mem.entropies[c, j]) == pytest.approx(h, rel=RTOL, abs=ATOL)
        assert not mem.keys[c, len(slots):].any() and not mem.entropies[c, len(slots):].any()


# --------------------------------------------------------------------------------------------------
# the memory alone


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# (label, entropy) with memory_size 3; the comments give the slot written
SCRIPT = [
    (0, 0.5),   # slot 0
    (0, 0.3),   # slot 1
    (0, 0.7),   # slot 2: class 0 full [0.5, 0.3, 0.7]
    (0, 0.6),   # lower than 0.7 only (not all): replaces the largest, slot 2 -> [0.5, 0.3, 0.6]
    (0, 0.9),   # not lower than any: dropped
    (0, 0.6),   # equal to the largest, lower than none: dropped
    (0, 0.4),   # replaces 0.6 (slot 2) -> [0.5, 0.3, 0.4]
    (0, 0.45),  # replaces 0.5 (slot 0, the largest is not always the last slot) -> [0.45, 0.3, 0.4]
    (1, 0.5), (1, 0.5), (1, 0.3),  # class 1 [0.5, 0.5, 0.3]
    (1, 0.1),   # two equal largest (slots 0, 1): the last one, slot 1 -> [0.5, 0.1, 0.3]
    (1, 0.2),   # slot 0 -> [0.2, 0.1, 0.3]
    (2, 0.4), (2, 0.4), (2, 0.4),  # class 2 all equal
    (2, 0.4),   # equal to all: dropped
    (2, 0.1),   # three equal largest: slot 2
    (2, 0.2),   # then slot 1 -> [0.4, 0.2, 0.1]
]
SLOTS = [0, 1, 2, 2, None, None, 2, 0, 0, 1, 2, 1, 0, 0, 1, 2, None, 2, 1]


def test_scripted_writes_follow_the_reference():
    memory = DynamicMemory(C, 3, D)
    ref = ReferenceDMN(_classes(), 10.0, 3)
    for i, (label, h) in enumerate(SCRIPT):
        key = torch.randn(D, generator=torch.Generator().manual_seed(i)) * 1.3
        h32 = torch.tensor(h, dtype=torch.float32)
        got = memory.write(label, key, h32)
        assert got == ref.write(label, key.tolist(), _f32(h)) == SLOTS[i]
    assert [[e for _, e in s] for s in ref.mem] == [[_f32(v) for v in row] for row in ([0.45, 0.3, 0.4], [0.2, 0.1, 0.3], [0.4, 0.2, 0.1], [])]
    for c in range(C):
        assert memory.entropies[c, : len(ref.mem[c])].tolist() == [e for _, e in ref.mem[c]]
        for j, (key, _) in enumerate(ref.mem[c]):
            torch.testing.assert_close(memory.keys[c, j].double(), torch.tensor(_norm(key), dtype=torch.float64), rtol=RTOL, atol=ATOL)
    assert memory.counts.tolist() == [3, 3, 3, 0] and memory.counts.dtype == torch.long
    assert not memory.keys[3].any()


def test_memory_size_must_be_positive():
    with pytest.raises(ValueError, match="memory_size"):
        DynamicMemory(C, 0, D)


def test_read_out_with_empty_slots_and_an_unwritten_class():
    """Empty slots add nothing, a class never written attends to its text feature alone (so an
    empty memory gives the text prediction), and stored keys are read normalised."""
    classes = _classes()
    memory = DynamicMemory(C, 4, D)
    ref = ReferenceDMN(classes, 10.0, 4, beta=3.0)
    query = torch.randn(D, generator=torch.Generator().manual_seed(5)) * 0.8
    text = F.normalize(classes, dim=-1)
    empty = memory.read(query, text, 3.0)
    torch.testing.assert_close(empty, text, rtol=RTOL, atol=ATOL)
    for i, label in enumerate([0, 0, 1, 0]):
        key = torch.randn(D, generator=torch.Generator().manual_seed(20 + i)) * 2.0
        memory.write(label, key, torch.tensor(0.5))
        ref.write(label, key.tolist(), 0.5)
    q = query.tolist()
    want = []
    for c in range(C):  # a_c by hand, from the reference's memory
        acc = [0.0] * D
        for k in [_norm(k) for k, _ in ref.mem[c]] + [ref.text[c]]:
            w = math.exp(-3.0 * (1.0 - _dot(_norm(q), k)))
            acc = [a + w * x for a, x in zip(acc, k)]
        want.append(_norm(acc))
    got = memory.read(query, text, 3.0)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[2:], text[2:], rtol=RTOL, atol=ATOL)
    assert not torch.allclose(got[0], text[0], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# the adapter on features


def _adapter(scale=10.0, memory_size=3, classes=None, **kwargs) -> DMNAdapter:
    return DMNAdapter(ScaleOnly(scale), _classes() if classes is None else classes, memory_size=memory_size, **kwargs)


@pytest.mark.parametrize("beta2,fraction,n_views", [(1.0, 0.25, 12), (0.3, 0.1, 32), (10.0, 0.1, 1)])
def test_stream_fills_memories_and_equals_the_reference(beta2, fraction, n_views):
    """40 images, 4 classes, 3 slots: every class's memory fills and then replaces and drops; each
    image's text and memory probabilities, fused score, pseudo-label and written slot match."""
    classes = _classes()
    adapter = _adapter(memory_size=3, beta2=beta2, fraction=fraction, beta=4.0)
    ref = ReferenceDMN(classes, 10.0, 3, beta=4.0, fraction=fraction, beta2=beta2)
    for i in range(40):
        feats = _image(i, classes, n_views)
        out = adapter.adapt_features(feats)
        r = ref.step(feats.tolist())
        _check(out, r, beta2)
        _memory_matches(adapter, ref)
    kinds = {kind for kind, _, _ in ref.events}
    assert kinds == {"append", "replace", "drop"}, ref.events
    assert all(len(s) == 3 for s in ref.mem)
    assert adapter.state_dict()["seen"] == 40


def test_a_class_never_written_keeps_the_text_prediction():
    """Images near classes 0-2 only: class 3's memory stays empty, so its memory logit is its text
    logit; with every memory empty the memory prediction would be the text prediction."""
    classes = _classes()
    adapter = _adapter(memory_size=3)
    ref = ReferenceDMN(classes, 10.0, 3)
    for i in range(12):
        feats = _image(i, classes, 10, only=(0, 1, 2))
        out = adapter.adapt_features(feats)
        _check(out, ref.step(feats.tolist()))
    assert adapter.memory.counts[3] == 0 and not ref.mem[3]
    query = _image(99, classes, 1)[0]
    attended = adapter.memory.read(query, adapter.classes, adapter.beta)
    torch.testing.assert_close(attended[3], adapter.classes[3], rtol=RTOL, atol=ATOL)


def test_the_memory_is_written_before_the_read_out():
    """The first image reads a memory that already holds it: its memory prediction differs from the
    text one (read before the write, an empty memory would give the text prediction exactly)."""
    classes = _classes()
    adapter, ref = _adapter(), ReferenceDMN(classes, 10.0, 3)
    feats = _image(0, classes, 10)
    out = adapter.adapt_features(feats)
    r = ref.step(feats.tolist())
    _check(out, r)
    assert r.slot == 0 and ref.mem[r.label]
    assert float((out.extras["p_mem"] - out.extras["p_text"]).abs().max()) > 1e-3


def test_view_zero_is_the_key_and_the_text_prediction():
    """The memory key and ``p_text`` come from view 0 even when another view is the most confident."""
    classes = F.normalize(_classes(), dim=-1)
    views = torch.stack([F.normalize(classes[0] + classes[1], dim=0), 2 * classes[2], F.normalize(classes[1] + 0.1 * classes[3], dim=0)])
    adapter = _adapter(scale=20.0, fraction=0.34)  # keeps 1 of 3 views
    ref = ReferenceDMN(classes, 20.0, 3, fraction=0.34)
    out = adapter.adapt_features(views)
    r = ref.step(views.tolist())
    _check(out, r)
    assert r.label == 2 and adapter.memory.counts.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(adapter.memory.keys[2, 0], views[0], rtol=RTOL, atol=ATOL)


def test_equal_view_entropies_and_tied_classes_take_the_first_index():
    """Two views whose probabilities are the same numbers in swapped classes have exactly equal
    entropies: the stable selection keeps the lower view index; their mean has two equal maxima,
    and the pseudo-label is the first."""
    e = torch.eye(D)[:C]
    a, b = 0.9, 0.3
    flat = F.normalize(torch.ones(D), dim=0)
    views = torch.stack([flat, a * e[1] + b * e[0], a * e[0] + b * e[1], a * e[1] + b * e[0]])
    one = DMNAdapter(ScaleOnly(10.0), e, memory_size=3, fraction=0.25)  # keeps 1 of 4: view 1
    one.adapt_features(views)
    assert one.memory.counts.tolist() == [0, 1, 0, 0]
    two = DMNAdapter(ScaleOnly(10.0), e, memory_size=3, fraction=0.5)  # keeps views 1, 2: tie 0/1
    two.adapt_features(views)
    assert two.memory.counts.tolist() == [1, 0, 0, 0]


def test_fused_logits_stay_finite_when_a_score_underflows():
    """Opposite class features at temperature 100: the third class's text and memory probabilities
    both underflow to 0, and its logit is the most negative fp32, not −inf."""
    t = torch.zeros(3, D)
    t[0, 0], t[1, 0], t[2, 1] = 1.0, -1.0, 1.0
    feats = torch.zeros(2, D)
    feats[:, 0] = 1.0
    adapter = DMNAdapter(ScaleOnly(100.0), t, memory_size=2)
    out = adapter.adapt_features(feats)
    assert float(out.extras["p_text"][1]) == 0.0 and float(out.extras["p_mem"][1]) == 0.0
    assert float(out.logits[1]) == torch.finfo(torch.float32).min and torch.isfinite(out.logits).all()
    assert int(out.logits.argmax()) == 0
    # the stored entropy −Σ p̄ log(p̄ + 1e-8) is finite with a zero probability in p̄ (the ε is what keeps it so)
    ref = ReferenceDMN(t, 100.0, 2)
    r = ref.step(feats.tolist())
    assert r.label == 0 and adapter.memory.counts.tolist() == [1, 0, 0]
    assert float(adapter.memory.entropies[0, 0]) == pytest.approx(r.h, rel=RTOL, abs=ATOL)


def test_timings_and_extras(monkeypatch):
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    out = _adapter().adapt_features(_image(0, _classes(), 4))
    assert out.timings == {"memory": 8.0}
    assert set(out.extras) == {"p_text", "p_mem"} and all(v.shape == (C,) and v.device.type == "cpu" for v in out.extras.values())


def test_state_lives_on_the_model_device():
    """Class features, temperature and memory go to the model's device (the meta device stands in
    for a GPU)."""
    adapter = DMNAdapter(ScaleOnly(10.0).to("meta"), _classes(), memory_size=2)
    tensors = (adapter.classes, adapter.scale, adapter.memory.keys, adapter.memory.entropies)
    assert all(t.device.type == "meta" for t in tensors)


def test_image_dtype_reaches_the_image_encoder(tiny_clip):
    adapter = DMNAdapter(tiny_clip.model, _classes(dim=32), image_dtype=torch.bfloat16)
    assert adapter.image_encoder.dtype == torch.bfloat16 and adapter.image_encoder.visual is not None
    assert DMNAdapter(tiny_clip.model, _classes(dim=32)).image_encoder.dtype is None


def test_defaults_are_the_published_ones():
    adapter = DMNAdapter(ScaleOnly(100.0), _classes())
    assert (adapter.memory.size, adapter.beta, adapter.fraction, adapter.beta2) == (50, 5.5, 0.1, 1.0)
    assert adapter.online and float(adapter.scale) == pytest.approx(100.0)
    assert BETA2_CANDIDATES == (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)


# --------------------------------------------------------------------------------------------------
# resume


def _through_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_resumes_the_stream():
    """Midway state through a saved file's bytes into a fresh adapter: the remaining images give the
    same results as the uninterrupted stream, bit for bit (same code, same inputs, same device)."""
    classes = _classes()
    stream = [_image(i, classes, 12) for i in range(40)]
    whole = _adapter(fraction=0.25)
    want = [whole.adapt_features(f) for f in stream]
    first = _adapter(fraction=0.25)
    for f in stream[:17]:
        first.adapt_features(f)
    state = _through_bytes(first.state_dict())
    assert state["memory"]["keys"].shape[0] == int(state["memory"]["counts"].sum()) < C * 3 * 17
    resumed = _adapter(fraction=0.25)
    resumed.load_state_dict(state)
    for f, expected in zip(stream[17:], want[17:]):
        got = resumed.adapt_features(f)
        assert torch.equal(got.logits, expected.logits)
        assert all(torch.equal(got.extras[k], expected.extras[k]) for k in expected.extras)
    assert torch.equal(resumed.memory.keys, whole.memory.keys) and torch.equal(resumed.memory.entropies, whole.memory.entropies)
    assert resumed.memory.counts.tolist() == whole.memory.counts.tolist()
    assert resumed.state_dict()["seen"] == 40


def test_loading_an_empty_state_starts_a_fresh_stream():
    classes = _classes()
    stream = [_image(i, classes, 6) for i in range(8)]
    used = _adapter()
    for f in stream:
        used.adapt_features(f)
    used.load_state_dict({})
    assert used.seen == 0 and used.memory.counts.tolist() == [0] * C and not used.memory.keys.any()
    fresh = _adapter()
    for f in stream[:4]:
        assert torch.equal(used.adapt_features(f).logits, fresh.adapt_features(f).logits)


def test_a_state_that_does_not_fit_is_refused():
    state = _adapter(memory_size=5).state_dict()
    state["memory"]["counts"] = torch.tensor([5, 0, 0, 0])
    state["memory"]["keys"] = torch.zeros(5, D)
    state["memory"]["entropies"] = torch.zeros(5)
    with pytest.raises(ValueError, match="does not fit"):
        _adapter(memory_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        DMNAdapter(ScaleOnly(10.0), _classes()[:3], memory_size=5).load_state_dict(state)


@pytest.mark.parametrize("saved", [True, False])
def test_restored_memory_lives_on_the_memory_device(saved):
    """The meta device stands in for a GPU: a CPU state (or an empty one) goes back onto the
    memory's own device; the counts stay integers on the CPU."""
    source = _adapter()
    for i in range(6):
        source.adapt_features(_image(i, _classes(), 4))
    target = DynamicMemory(C, 3, D, device="meta")
    target.load(source.state_dict()["memory"] if saved else {})
    assert target.keys.device.type == "meta" and target.entropies.device.type == "meta"
    assert target.keys.shape == (C, 3, D) and target.entropies.shape == (C, 3)
    assert target.counts.dtype == torch.long and target.counts.device.type == "cpu"
    assert target.counts.tolist() == (source.memory.counts.tolist() if saved else [0] * C)


# --------------------------------------------------------------------------------------------------
# oracle β₂


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_oracle_beta2_keeps_the_first_of_equal_maxima():
    """Image 0 is right only for β₂ > 0.08 (text wrong by 0.04, memory right by 0.5), image 1 only
    for β₂ < 3.2 (text right by 0.8, memory wrong by 0.25): 0.1, 0.3, 1 and 3 all reach 100 %,
    and the first, 0.1, is kept."""
    p_text = _probs([[0.52, 0.48], [0.9, 0.1]])
    p_mem = _probs([[0.25, 0.75], [0.375, 0.625]])
    labels = [1, 0]
    got = oracle_beta2(p_text, p_mem, torch.tensor(labels))
    assert got == reference_oracle(p_text.tolist(), p_mem.tolist(), labels, BETA2_CANDIDATES) == (0.1, 100.0)


def test_oracle_beta2_on_a_stream_equals_the_reference():
    classes = _classes()
    adapter = _adapter(memory_size=3, fraction=0.25)
    outs, labels = [], []
    for i in range(40):
        outs.append(adapter.adapt_features(_image(i, classes, 12)))
        labels.append(i % C)  # labels unrelated to the images: accuracies vary with β₂
    p_text = torch.stack([o.extras["p_text"] for o in outs])
    p_mem = torch.stack([o.extras["p_mem"] for o in outs])
    got = oracle_beta2(p_text, p_mem, labels)
    want = reference_oracle(p_text.tolist(), p_mem.tolist(), labels, BETA2_CANDIDATES)
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-9)
    custom = (5.0, 0.5, 2.0)
    assert oracle_beta2(p_text, p_mem, labels, custom) == pytest.approx(reference_oracle(p_text.tolist(), p_mem.tolist(), labels, custom))


def test_oracle_beta2_later_candidate_wins_only_when_strictly_better():
    """Image right only for β₂ > 2 (memory margin 0.1·β₂ must beat the text margin 0.2): the first
    candidate reaching 100 % is 3; the accuracy is a percentage."""
    p_text = _probs([[0.6, 0.4], [0.6, 0.4]])
    p_mem = _probs([[0.45, 0.55], [0.45, 0.55]])
    assert oracle_beta2(p_text, p_mem, [1, 1]) == (3.0, 100.0)
    assert oracle_beta2(p_text, p_mem, [1, 0]) == (0.001, 50.0)  # 50 % everywhere: the first


def test_oracle_beta2_when_every_candidate_scores_zero():
    p = _probs([[0.9, 0.1]])
    assert oracle_beta2(p, p, [1]) == (0.001, 0.0)
    assert oracle_beta2(p, p, [1], (7.0, 8.0)) == (7.0, 0.0)


def test_oracle_beta2_refuses_mismatched_inputs():
    p = _probs([[0.9, 0.1]])
    with pytest.raises(ValueError, match=r"p_text \(1, 2\), p_mem \(1, 2\) and labels \(2,\) disagree"):
        oracle_beta2(p, p, [0, 1])
    with pytest.raises(ValueError, match="disagree"):
        oracle_beta2(p, _probs([[0.9, 0.1, 0.0]]), [0])
    with pytest.raises(ValueError, match="disagree"):
        oracle_beta2(p[:0], p[:0], [])
    with pytest.raises(ValueError, match="^oracle_beta2 needs at least one candidate$"):
        oracle_beta2(p, p, [0], ())


# --------------------------------------------------------------------------------------------------
# end to end on a tiny CLIP


def test_adapt_views_on_tiny_clip_equals_the_reference(tiny_clip):
    """32 views per image through the image tower (the published count), 3 kept; one slot per class
    so that the memory fills within the stream."""
    model = tiny_clip.model
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(9))
    adapter = DMNAdapter(model, classes, memory_size=1)
    ref = ReferenceDMN(classes, float(model.logit_scale.exp()), 1)
    for i in range(4):
        views = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(60 + i))
        out = adapter.adapt(views)
        with torch.no_grad():
            feats = F.normalize(model.encode_image(views), dim=-1)
        _check(out, ref.step(feats.tolist()))
        assert set(out.timings) == {"images", "memory"}
    _memory_matches(adapter, ref)
    assert {kind for kind, _, _ in ref.events} == {"append", "replace", "drop"}, ref.events
    assert adapter.online and adapter.seen == 4
