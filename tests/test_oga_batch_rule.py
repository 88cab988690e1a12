"""OGA's batch rule (TTA2.md §11.1, ``--stream-update batch``) and TDA's cache sizes
(``--tda-positive-shots``/``--tda-negative-shots``).

OGA cuts each order into batches of 32 and, per batch, first updates the memory with the whole
batch, then predicts the batch. TDA and DMN-ZS split their per-image step into ``observe`` (the
state takes the image) and ``predict`` (the read-out, state left alone). Checked here against
references written out in plain Python and float64 (never the adapters' own helpers): TDA's caches
and read-out, DMN-ZS's memory and read-out, each under the batch rule; that ``observe`` then
``predict`` is ``adapt_features`` bit for bit; a stream where the rule changes a prediction; a batch
of one equal to image mode; TDA 5/3 keeping the five lowest-entropy images of each class; the
flags refused one line before torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_one_error_line_before_torch
from protext.evaluation import EvalConfig, evaluate
from synthetic_datasets import noise_folder

C, N, D, BATCH = 4, 40, 8, 5
ALPHA, BETA = 2.0, 5.0
NEG_ALPHA, NEG_BETA = 0.117, 1.0  # TDA's negative cache, the same everywhere (TTA.md §3)
BAND = (0.2, 0.5)  # h = H / log2 C strictly inside, for the negative cache
MASK = (0.03, 1.0)  # a cached probability strictly inside marks its class


class _Temperature(nn.Module):
    """All an adapter on fixed features reads of a CLIP model: its temperature (and its device)."""

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))


def _scale(model: nn.Module) -> float:
    return float(model.logit_scale.detach().float().exp())


def _stream(seed: int = 0, views: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Class features (C, D), normalised image features (N, views, D), true labels: each image its
    class's direction at a random weight plus noise, so some are confident and some are not."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    labels = torch.randint(0, C, (N,), generator=g)
    weight = torch.rand(N, generator=g) * 1.2
    feats = text[labels][:, None, :] * weight[:, None, None] + 0.6 * torch.randn(N, views, D, generator=g)
    return text, F.normalize(feats, dim=-1), labels.tolist()


# --------------------------------------------------------------------------------------------------
# float64 references, written out


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _norm(v) -> list[float]:
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


def _softmax(z) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


class RefTDA:
    """TDA on one view per image (TTA.md §3): the image's zero-shot logits z, probabilities p and
    entropy H (nats) pick its pseudo-label; the positive cache keeps the ``pos`` lowest-entropy
    features per label, the negative one the ``neg`` lowest among images with 0.2 < H/log2 C < 0.5."""

    def __init__(self, text, scale: float, pos: int, neg: int) -> None:
        self.text = [_norm([float(x) for x in row]) for row in text]
        self.scale, self.pos_shots, self.neg_shots = scale, pos, neg
        self.pos: dict[int, list] = {}  # label -> [(H, f)], lowest H first
        self.neg: dict[int, list] = {}  # label -> [(H, f, p)]

    def zero_shot(self, f):
        f = [float(x) for x in f]
        z = [self.scale * _dot(f, t) for t in self.text]
        p = _softmax(z)
        entropy = -sum(q * math.log(q) for q in p if q > 0)
        return f, z, p, entropy, z.index(max(z))

    @staticmethod
    def _insert(cache, shots, label, entry) -> bool:
        items = cache.setdefault(label, [])
        if len(items) < shots:
            items.append(entry)
        elif entry[0] < items[-1][0]:  # better than the worst: it takes the worst one's place
            items[-1] = entry
        else:
            return False
        items.sort(key=lambda e: e[0])
        return True

    def update(self, f) -> bool:
        """The caches take the image; whether either of them changed."""
        f, _, p, entropy, label = self.zero_shot(f)
        changed = self._insert(self.pos, self.pos_shots, label, (entropy, f))
        if BAND[0] < entropy / math.log2(len(self.text)) < BAND[1]:
            changed = self._insert(self.neg, self.neg_shots, label, (entropy, f, p)) or changed
        return changed

    def read(self, f) -> list[float]:
        f, z, _, _, _ = self.zero_shot(f)
        out = list(z)
        for label, items in self.pos.items():
            for _, key in items:
                out[label] += ALPHA * math.exp(-BETA * (1.0 - _dot(f, key)))
        for items in self.neg.values():
            for _, key, p in items:
                w = math.exp(-NEG_BETA * (1.0 - _dot(f, key)))
                for c in range(len(out)):
                    if MASK[0] < p[c] < MASK[1]:
                        out[c] -= NEG_ALPHA * w
        return out


class RefDMN:
    """DMN-ZS on one view per image (TTA2.md §6): the memory takes the view under argmax p with
    entropy −Σ p log(p + 1e-8), in insertion order; a full class replaces its largest stored entropy
    (the last of equal ones) when the new one is lower than some stored one. The read-out attends per
    class over its entries and its text feature: w = exp(−β(1 − q·k)), a_c = norm(Σ w k);
    p_mem = softmax(scale · a·q); the score log(p_text + β₂ p_mem)."""

    def __init__(self, text, scale: float, size: int, beta: float = 5.5, beta2: float = 1.0) -> None:
        self.text = [_norm([float(x) for x in row]) for row in text]
        self.scale, self.size, self.beta, self.beta2 = scale, size, beta, beta2
        self.memory: dict[int, list] = {c: [] for c in range(len(self.text))}  # slots: [entropy, key]

    def update(self, f) -> None:
        f = [float(x) for x in f]
        p = _softmax([self.scale * _dot(f, t) for t in self.text])
        label = p.index(max(p))
        entropy = -sum(q * math.log(q + 1e-8) for q in p)
        slots = self.memory[label]
        if len(slots) < self.size:
            slots.append([entropy, _norm(f)])
        elif any(entropy < e for e, _ in slots):
            worst = max(e for e, _ in slots)
            slot = max(i for i, (e, _) in enumerate(slots) if e == worst)
            slots[slot] = [entropy, _norm(f)]

    def read(self, f) -> list[float]:
        q = _norm([float(x) for x in f])
        p_text = _softmax([self.scale * _dot(q, t) for t in self.text])
        attended = []
        for c, t in enumerate(self.text):
            keys = [k for _, k in self.memory[c]] + [t]
            total = [0.0] * len(q)
            for k in keys:
                w = math.exp(-self.beta * (1.0 - _dot(q, k)))
                total = [a + w * b for a, b in zip(total, k)]
            attended.append(_norm(total))
        p_mem = _softmax([self.scale * _dot(a, q) for a in attended])
        return [math.log(a + self.beta2 * b) for a, b in zip(p_text, p_mem)]


def _ref_batches(ref, feats, batch: int) -> list[list[float]]:
    """OGA's rule by hand: per batch, every image updates the state in order, then every image is read."""
    out = []
    for start in range(0, len(feats), batch):
        rows = feats[start:start + batch]
        for f in rows:
            ref.update(f)
        out += [ref.read(f) for f in rows]
    return out


def _protext_batches(adapter, feats: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for start in range(0, feats.shape[0], batch):
        rows = feats[start:start + batch]
        for row in rows:
            adapter.observe(row)
        out += [adapter.predict(row).logits for row in rows]
    return torch.stack(out)


def _tda(model, text, pos: int = 5, neg: int = 3, fraction: float = 0.1):
    from protext.tta.tda import TDAAdapter

    return TDAAdapter(model, text, ALPHA, BETA, fraction, positive_shots=pos, negative_shots=neg)


def _dmn(model, text, size: int = 3, fraction: float = 0.1):
    from protext.tta.dmn import DMNAdapter

    return DMNAdapter(model, text, memory_size=size, fraction=fraction)


def _assert_predictions_match(got: torch.Tensor, want: list[list[float]], margin: float = 1e-3) -> None:
    """Logits within fp32 rounding, and the same argmax wherever the reference is not a near tie."""
    want_t = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want_t, rtol=0, atol=2e-4)
    top2 = want_t.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    assert bool(clear.all()), "the stream has a near tie; the prediction check would prove nothing there"
    assert got.argmax(1).tolist() == want_t.argmax(1).tolist()


# --------------------------------------------------------------------------------------------------
# the adapters against the references


def test_the_stream_exercises_the_caches():
    """The data fills TDA 5/3's caches past capacity (replacements happen) and reaches the negative band."""
    text, feats, _ = _stream()
    ref = RefTDA(text, _scale(_Temperature()), 5, 3)
    seen = {}
    in_band = 0
    for f in feats[:, 0]:
        _, _, _, entropy, label = ref.zero_shot(f)
        seen[label] = seen.get(label, 0) + 1
        h = entropy / math.log2(C)
        assert min(abs(h - BAND[0]), abs(h - BAND[1])) > 1e-4  # no image on the band's edge
        in_band += BAND[0] < h < BAND[1]
    assert sorted(seen) == list(range(C)) and min(seen.values()) > 5  # every class replaces entries
    assert in_band > 3 * C // 2


def test_tda_batch_rule_matches_the_float64_reference():
    model = _Temperature()
    text, feats, _ = _stream()
    for pos, neg in ((5, 3), (3, 2)):
        want = _ref_batches(RefTDA(text, _scale(model), pos, neg), [f for f in feats[:, 0]], BATCH)
        got = _protext_batches(_tda(model, text, pos, neg), feats, BATCH)
        _assert_predictions_match(got, want)


def test_dmn_batch_rule_matches_the_float64_reference():
    model = _Temperature()
    text, feats, _ = _stream(1)
    want = _ref_batches(RefDMN(text, _scale(model), size=3), [f for f in feats[:, 0]], BATCH)
    got = _protext_batches(_dmn(model, text, size=3), feats, BATCH)
    _assert_predictions_match(got, want)


def test_the_rule_matters_and_image_mode_is_the_reference_image_by_image():
    """The same stream image by image (each image updated, then read) against the reference, and
    against the batch rule: an image's logits are the same in both, bit for bit, exactly when no later
    image of its batch changed a cache (then it is read from the same caches either way; a batch's
    last image always is)."""
    model = _Temperature()
    text, feats, _ = _stream()
    rows = [f for f in feats[:, 0]]
    ref = RefTDA(text, _scale(model), 5, 3)
    image_ref, changed = [], []
    for f in rows:
        changed.append(ref.update(f))
        image_ref.append(ref.read(f))
    adapter = _tda(model, text)
    image = torch.stack([adapter.adapt_features(row).logits for row in feats])
    _assert_predictions_match(image, image_ref)
    batch = _protext_batches(_tda(model, text), feats, BATCH)
    for i in range(N):
        end = (i // BATCH + 1) * BATCH
        assert torch.equal(image[i], batch[i]) == (not any(changed[i + 1:end])), i
    assert sum(not torch.equal(image[i], batch[i]) for i in range(N)) >= N // 2  # the rule acts on most images


def test_a_later_image_of_the_batch_flips_an_earlier_one():
    """Built by hand, one batch of five: a confident image of class 0 (far from the rest), then image A,
    unsure (class 0 by a little), then three confident images of class 1 close to A. Image by image, A
    is read before the three are in the state: class 0. Under the batch rule they are cached (TDA) or
    written (DMN-ZS, one slot per class, which A's higher entropy does not take from the first image)
    before A is read, and their affinity turns it to class 1. The others are predicted alike."""
    model = _Temperature()
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    first = F.normalize(torch.tensor([1.0, 0.0, -1.0]), dim=0)
    a = F.normalize(torch.tensor([1.0, 0.9, 1.5]), dim=0)
    bs = [F.normalize(torch.tensor([0.3, 1.0, 1.5 + 0.05 * i]), dim=0) for i in range(3)]
    feats = torch.stack([first, a, *bs])[:, None, :]
    for adapter_of, ref_of in ((lambda: _tda(model, text), lambda: RefTDA(text, _scale(model), 5, 3)),
                               (lambda: _dmn(model, text, size=1), lambda: RefDMN(text, _scale(model), 1))):
        batch = _protext_batches(adapter_of(), feats, 5)
        image_adapter = adapter_of()
        image = torch.stack([image_adapter.adapt_features(row).logits for row in feats])
        _assert_predictions_match(batch, _ref_batches(ref_of(), [f for f in feats[:, 0]], 5))
        _assert_predictions_match(image, _ref_batches(ref_of(), [f for f in feats[:, 0]], 1))
        assert image[1].argmax() == 0 and batch[1].argmax() == 1, (image[1], batch[1])
        assert image.argmax(1).tolist() == [0, 0, 1, 1, 1] and batch.argmax(1).tolist() == [0, 1, 1, 1, 1]
        # a batch of one is image mode, bit for bit
        assert torch.equal(_protext_batches(adapter_of(), feats, 1), image)


def _same_state(one, two) -> None:
    _same_dict(one.state_dict(), two.state_dict())


def _same_dict(s1, s2) -> None:
    def walk(x, y):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y

    walk(s1, s2)


@pytest.mark.parametrize("views", [1, 4])
def test_observe_then_predict_is_adapt_features_bit_for_bit(views):
    """On a stream (several views: the confident-view selection too), each image's ``observe`` then
    ``predict`` gives ``adapt_features``'s logits, and the states stay equal throughout."""
    model = _Temperature()
    text, feats, _ = _stream(2, views)
    for make in (lambda: _tda(model, text, 3, 2, 0.5), lambda: _tda(model, text, 5, 3, 0.5),
                 lambda: _dmn(model, text, 3, 0.5)):
        whole, split = make(), make()
        for row in feats:
            want = whole.adapt_features(row)
            split.observe(row)
            got = split.predict(row)
            assert torch.equal(got.logits, want.logits) and torch.equal(got.calibration_logits, want.calibration_logits)
            assert got.extras.keys() == want.extras.keys()
            assert all(torch.equal(got.extras[k], want.extras[k]) for k in want.extras)
            _same_state(whole, split)


def test_predict_leaves_the_state_alone():
    model = _Temperature()
    text, feats, _ = _stream()
    for adapter in (_tda(model, text), _dmn(model, text)):
        for row in feats[:10]:
            adapter.observe(row)
        before = adapter.state_dict()
        first = [adapter.predict(row).logits for row in feats[10:]]
        again = [adapter.predict(row).logits for row in feats[10:]]
        assert all(torch.equal(x, y) for x, y in zip(first, again))
        _same_dict(before, adapter.state_dict())
        assert before["seen"] == 10


def test_boost_has_no_split():
    """BoostAdapter is a TDA subclass with its own per-image rule: TDA's halves are refused there."""
    from protext.tta.boost import BoostAdapter

    model = _Temperature()
    text, feats, _ = _stream()
    boost = BoostAdapter(model, text, alpha=ALPHA, beta=BETA, delta=0)
    for call in (boost.observe, boost.predict):
        with pytest.raises(TypeError, match="BoostAdapter"):
            call(feats[0])
    assert boost.boost_shots == 3 and boost.positive.shots == 3 and boost.negative.shots == 2  # unchanged


def test_tda_five_three_keeps_the_five_lowest_entropy_images_of_each_class():
    """Built through the registry (the flags' path): the positive cache of each pseudo-label holds the
    5 images of lowest entropy predicted as that class, lowest first; the negative one the 3 lowest
    among that class's images in the band. Found here by sorting the reference's entropies."""
    from protext.tta import TTAConfig, build_adapter

    model = _Temperature()
    text, feats, _ = _stream()
    ref = RefTDA(text, _scale(model), 5, 3)
    by_label: dict[int, list] = {}
    band: dict[int, list] = {}
    for i, f in enumerate(feats[:, 0]):
        _, _, _, entropy, label = ref.zero_shot(f)
        by_label.setdefault(label, []).append((entropy, i))
        if BAND[0] < entropy / math.log2(C) < BAND[1]:
            band.setdefault(label, []).append((entropy, i))
    for shots, (pos, neg) in (((5, 3), (5, 3)), ((None, None), (3, 2))):
        options = {} if shots[0] is None else {"tda_positive_shots": shots[0], "tda_negative_shots": shots[1]}
        adapter = build_adapter(TTAConfig(method="tda", tda_alpha=ALPHA, tda_beta=BETA, views=1, options=options),
                                model, "folder", text_features=text)
        assert (adapter.positive.shots, adapter.negative.shots) == (pos, neg)
        for row in feats:
            adapter.adapt_features(row)
        for label in range(C):
            kept = [i for _, i in sorted(by_label[label])[:pos]]
            entries = adapter.positive.entries[label]
            assert len(entries) == pos
            assert all(torch.equal(e.feature, feats[i, 0]) for e, i in zip(entries, kept)), label
            assert [e.entropy for e in entries] == sorted(e.entropy for e in entries)
            neg_kept = [i for _, i in sorted(band.get(label, []))[:neg]]
            neg_entries = adapter.negative.entries.get(label, [])
            assert len(neg_entries) == len(neg_kept) <= neg
            assert all(torch.equal(e.feature, feats[i, 0]) for e, i in zip(neg_entries, neg_kept)), label
        assert any(len(band.get(label, [])) > neg for label in range(C))  # a negative entry was replaced too


def test_tda_refuses_bad_shots():
    model = _Temperature()
    text, _, _ = _stream()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive_shots"):
            _tda(model, text, pos=bad)
        with pytest.raises(ValueError, match="negative_shots"):
            _tda(model, text, neg=bad)


# --------------------------------------------------------------------------------------------------
# --stream-runs N --stream-update batch, end to end on tiny-clip

NAMES = ["ant", "bee", "cow", "doe"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("oga_batch"), NAMES, per_class=10, seed=5, shape=(40, 40))


def _config(folder: Path, out: Path, method: str = "tda", **options) -> EvalConfig:
    extra = dict(tda_alpha=ALPHA, tda_beta=BETA) if method == "tda" else {}
    return EvalConfig(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0,
                      progress=False, out=str(out), tta=method, tta_views=1, stream_runs=2, save_logits=True,
                      tta_options=options or None, **extra)


def _encoded(clip, folder: Path):
    """Every image's one view, encoded by hand; the labels; the class features of the folder template."""
    from protext.datasets import build_dataset
    from protext.evaluation.data import SeededViews
    from protext.tta.api import views_for_recipe
    from protext.tta.registry import ViewRecipe
    from protext.tta.views import model_preprocess_cfg
    from protext.zeroshot import clip_text_features

    dataset = build_dataset("folder", str(folder), split="all", partition="test")
    text = clip_text_features(clip.model, clip.tokenizer, list(dataset.classnames), "a photo of a {}.")
    maker = SeededViews(views_for_recipe(ViewRecipe(1, False), model_preprocess_cfg(clip.model)), 0)
    with torch.no_grad():
        feats = [F.normalize(clip.model.encode_image(maker(dataset[i][0], i)).float(), dim=-1) for i in range(len(dataset))]
    return feats, [dataset[i][1] for i in range(len(dataset))], text


def _oga_orders(master: int, runs: int, n: int) -> list[list[int]]:
    """OGA's runner.py:54-55 and 158-161, written out."""
    seeds = np.random.default_rng(master).choice(range(10000 * runs), size=runs, replace=False)
    return [np.random.default_rng(int(s)).choice(range(n), n, replace=False).tolist() for s in seeds]


def test_stream_runs_batch_rule_end_to_end(tiny_clip, folder, tmp_path, monkeypatch):
    """Batches of 5 (OGA's 32 shrunk for 40 images): each run's top-1 is the mean of its per-batch
    accuracies under the batch rule of a fresh TDA 5/3 (the float64 reference over hand-encoded
    features gives run 0's logits), the rule and the cache sizes are recorded; image mode differs."""
    import protext.streams as streams

    monkeypatch.setattr(streams, "OGA_BATCH_SIZE", BATCH)
    batch = evaluate(_config(folder, tmp_path / "b.json", tda_positive_shots=5, tda_negative_shots=3,
                             stream_update="batch"), clip=tiny_clip)
    runs = batch["runs"]
    assert runs["update"] == "batch" and "whole batch" in runs["update_rule"]
    settings = batch["tta"]["settings"]
    assert (settings["tda_positive_shots"], settings["tda_negative_shots"], settings["stream_update"]) == (5, 3, "batch")
    feats, labels, text = _encoded(tiny_clip, folder)
    scale = float(tiny_clip.model.logit_scale.detach().float().exp())
    for r, order in enumerate(_oga_orders(42, 2, N)):
        ref = RefTDA(text, scale, 5, 3)
        logits = _ref_batches(ref, [feats[i][0] for i in order], BATCH)
        if r == 0:  # the results keep run 0's predictions, by dataset index
            got = torch.tensor(batch["predictions"]["logits"])[order]
            torch.testing.assert_close(got.double(), torch.tensor(logits, dtype=torch.float64), rtol=0, atol=2e-4)
            preds = got.argmax(1).tolist()
        else:  # the reference's own argmax, where it is clear of ties
            want = torch.tensor(logits)
            top2 = want.topk(2, dim=1).values
            assert bool(((top2[:, 0] - top2[:, 1]) > 1e-3).all())
            preds = want.argmax(1).tolist()
        right = [int(p == labels[i]) for p, i in zip(preds, order)]
        per_batch = [100.0 * sum(right[s:s + BATCH]) / len(right[s:s + BATCH]) for s in range(0, N, BATCH)]
        assert runs["per_run"][r]["top1"] == pytest.approx(sum(per_batch) / len(per_batch), abs=1e-9)
        assert runs["per_run"][r]["batches"] == N // BATCH
    image = evaluate(_config(folder, tmp_path / "i.json", tda_positive_shots=5, tda_negative_shots=3), clip=tiny_clip)
    assert image["runs"]["update"] == "image" and image["tta"]["settings"]["stream_update"] == "image"
    assert image["predictions"]["logits"] != batch["predictions"]["logits"]


@pytest.mark.parametrize("method", ["tda", "dmn"])
def test_a_batch_of_one_is_image_mode_exactly(tiny_clip, folder, tmp_path, monkeypatch, method):
    import protext.streams as streams

    monkeypatch.setattr(streams, "OGA_BATCH_SIZE", 1)
    batch = evaluate(_config(folder, tmp_path / "b1.json", method, stream_update="batch"), clip=tiny_clip)
    image = evaluate(_config(folder, tmp_path / "i1.json", method), clip=tiny_clip)
    assert batch["runs"]["update"] == "batch" and image["runs"]["update"] == "image"
    assert [r["top1"] for r in batch["runs"]["per_run"]] == [r["top1"] for r in image["runs"]["per_run"]]
    assert batch["predictions"]["logits"] == image["predictions"]["logits"]


def test_dmn_batch_rule_end_to_end(tiny_clip, folder, tmp_path, monkeypatch):
    """DMN-ZS with memory 2 under the batch rule: run 0's scores are the float64 reference's."""
    import protext.streams as streams

    monkeypatch.setattr(streams, "OGA_BATCH_SIZE", BATCH)
    result = evaluate(_config(folder, tmp_path / "d.json", "dmn", dmn_memory=2, stream_update="batch"), clip=tiny_clip)
    assert result["runs"]["update"] == "batch" and result["tta"]["settings"]["stream_update"] == "batch"
    feats, _, text = _encoded(tiny_clip, folder)
    order = _oga_orders(42, 2, N)[0]
    want = _ref_batches(RefDMN(text, float(tiny_clip.model.logit_scale.detach().float().exp()), size=2),
                        [feats[i][0] for i in order], BATCH)
    got = torch.tensor(result["predictions"]["logits"])[order]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------------
# the flags: refused in one line before torch, and in --help

_TDA = ["--tta", "tda", "--tda-alpha", "2", "--tda-beta", "5"]
BAD = [
    ([*_TDA, "--stream-update", "batch"], "--stream-update batch"),
    ([*_TDA, "--stream-update", "batch", "--scenario", "low"], "--stream-update batch"),
    ([*_TDA, "--stream-update", "batch", "--stream-seeds", "1,2"], "--stream-update batch"),
    (["--tta", "dmn", "--stream-update", "batch"], "add --stream-runs N"),
    (["--tta", "zero,tda", "--stream-update", "batch"], "--stream-update batch"),
    (["--tta", "dpe", "--stream-runs", "3", "--stream-update", "batch"], "--stream-update does not apply to --tta dpe"),
    (["--tta", "boost", "--tda-alpha", "2", "--tda-beta", "5", "--stream-runs", "3", "--stream-update", "batch"],
     "--stream-update does not apply to --tta boost"),
    (["--tta", "dmn-oracle", "--stream-update", "image"], "--stream-update does not apply to --tta dmn-oracle"),
    # the oracle never replays orders at all (beta2 is picked after one whole stream)
    (["--tta", "dmn-oracle", "--stream-runs", "3", "--stream-update", "batch"], "--stream-runs: --tta dmn-oracle picks beta2"),
    (["--stream-update", "batch"], "--stream-update"),
    ([*_TDA, "--tda-positive-shots", "0"], "--tda-positive-shots must be between 1 and 10000, got 0."),
    ([*_TDA, "--tda-negative-shots", "0"], "--tda-negative-shots must be between 1 and 10000, got 0."),
    (["--tta", "dmn", "--tda-positive-shots", "5"], "--tda-positive-shots does not apply to --tta dmn"),
    (["--tta", "boost", "--tda-alpha", "2", "--tda-beta", "5", "--tda-negative-shots", "3"],
     "--tda-negative-shots does not apply to --tta boost"),
]


def test_bad_flags_are_one_line_before_torch(tmp_path):
    assert_one_error_line_before_torch(tmp_path, BAD)


def test_help_names_the_flags_under_their_groups():
    from protext.eval import build_parser

    text = " ".join(build_parser().format_help().split())
    tda_group = text.split("--tta tda: TDA", 1)[1].split("--tta ", 1)[0]
    for flag, default in (("--tda-positive-shots N", "[3]"), ("--tda-negative-shots N", "[2]")):
        part = tda_group.split(flag, 1)[1].split(" --", 1)[0]
        assert "OGA's runs use" in part and "TDA's published" in part and default in part, part
    update = text.split("--stream-update {image,batch}", 2)[2].split("[tda, dmn: image]", 1)
    assert len(update) == 2 and update[0].endswith("(--tta tda, dmn; image or batch) ")  # the default, image
    assert "OGA's rule: the whole batch updates the state, then each of its images is predicted" in update[0]
