"""ZERO against a hand-written reference of TTA.md §1 (votes, tie rule, fallback, fp16 votes)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from protext.tta import TTAConfig, base, build_adapter
from protext.tta.zero import ENSEMBLE_TEMPLATES, ZeroAdapter, zero_votes

SCALE = 100.0
C = 5


def reference_zero(cos: list[list[float]], scale: float, keep: int, fp16: bool = False) -> tuple[list[float], int, list[int]]:
    """TTA.md §1 step by step in plain Python (float64): entropy ranking, votes, tie rule, +1."""
    n, c = len(cos), len(cos[0])

    def entropy(row):
        z = [scale * x for x in row]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        s = sum(e)
        return -sum((v / s) * math.log(v / s) for v in e if v > 0)

    order = sorted(range(n), key=lambda v: (entropy(cos[v]), v))
    kept, rest = order[:keep], order[keep:]
    argmax = lambda row: max(range(c), key=lambda k: (row[k], -k))  # noqa: E731  first of equal maxima
    votes = [0.0] * c
    for v in kept:
        if fp16:
            row = [float(torch.tensor(x).half()) * 1024.0 for x in cos[v]]
            top = max(row)
            e = [math.exp(x - top) for x in row]
            for k in range(c):
                votes[k] += e[k] / sum(e)
        else:
            votes[argmax(cos[v])] += 1
    best = max(votes)
    tied = [k for k in range(c) if votes[k] == best]
    winner = tied[0]
    if len(tied) > 1:
        winner = None
        for v in rest:
            if argmax(cos[v]) in tied:
                winner = argmax(cos[v])
                break
        if winner is None:
            # with every view kept there is no discarded view: the most confident kept view decides
            fallback = rest[0] if rest else kept[0]
            winner = max(tied, key=lambda k: (cos[fallback][k], -k))
    votes[winner] += 1
    return votes, winner, kept


def view(cls: int, rank: int, extra: dict[int, float] | None = None) -> list[float]:
    """A view voting ``cls``, less confident the larger ``rank`` (entropies well apart)."""
    row = [0.0] * C
    row[cls] = 0.2 - 0.002 * rank
    for k, v in (extra or {}).items():
        row[k] = v
    return row


def stream(kept_classes: list[int], rest: list[tuple[int, dict | None]]) -> list[list[float]]:
    rows = [view(c, r) for r, c in enumerate(kept_classes)]
    rows += [r if isinstance(r, list) else view(r[0], len(kept_classes) + i, r[1]) for i, r in enumerate(rest)]
    assert len(rows) == 64
    # shuffle the view order: the ranking, not the position, decides (view 0 competes like any other)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    return [rows[p] for p in perm]


def check(rows, expect_winner, fp16=False):
    cos = torch.tensor(rows, dtype=torch.float32)
    got = zero_votes(cos, SCALE, 0.3, "fp16" if fp16 else "hard")
    votes, winner, kept = reference_zero(rows, SCALE, 19, fp16)
    assert winner == expect_winner == got.prediction
    assert got.kept.tolist() == kept and len(kept) == 19  # 19 of 64 = ⌊64·0.3⌋
    torch.testing.assert_close(got.votes, torch.tensor(votes, dtype=torch.float32), atol=1e-5, rtol=0)
    assert int(got.votes.argmax()) == winner
    return got


def test_majority_without_tie():
    rows = stream([2] * 10 + [1] * 9, [(1, None)] * 45)
    got = check(rows, 2)
    assert got.tie_broken_by is None and float(got.votes[2]) == 11.0  # 10 votes + 1


def test_tie_broken_by_first_discarded_view_voting_a_tied_class():
    # kept: 9 × class 1, 9 × class 3, 1 × class 0; discarded in order: 4, 0, 3, 1, ...
    rows = stream([1] * 9 + [3] * 9 + [0], [(4, None), (0, None), (3, None), (1, None)] + [(4, None)] * 41)
    got = check(rows, 3)
    assert got.tie_broken_by is not None and got.tie_broken_by >= 0
    assert float(got.votes[3]) == 10.0 and float(got.votes[1]) == 9.0


def test_tie_fallback_largest_cosine_of_first_discarded_among_tied_only():
    # no discarded view votes 1 or 3; the most confident discarded view prefers 4, then 3 over 1
    # (and 0 above both: a mask letting non-tied classes in would pick 0); the others prefer 1 to 3
    first = [0.15, 0.01, 0.0, 0.04, 0.16]
    later = [[0.0, 0.03, 0.035 + 0.0001 * r, 0.0, 0.0] for r in range(44)]
    rows = stream([1] * 9 + [3] * 9 + [0], [first] + later)
    got = check(rows, 3)
    assert got.tie_broken_by == -1


def test_fp16_votes_split_near_ties():
    """fp16 soft votes: 10 views barely prefer 0 over 1 (by 0.001), 9 views clearly vote 1.
    Hard votes pick 0; the published fp16 votes give the near-ties ~0.73/0.27 and pick 1."""
    near = [[0.3, 0.299, 0.0, 0.0, 0.0] for _ in range(10)]
    clear = [[0.0, 0.25, 0.0, 0.0, 0.0] for _ in range(9)]
    rest = [[0.0, 0.0, 0.0, 0.01 * (k % 3), 0.0] for k in range(45)]
    rows = near + clear + rest  # near and clear views are the most confident (19 kept)
    hard = check(rows, 0)
    soft = check(rows, 1, fp16=True)
    assert hard.prediction != soft.prediction


def test_ensemble_templates_are_the_seven_of_tta_md():
    assert ENSEMBLE_TEMPLATES == (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    )


def test_adapter_on_tiny_clip_equals_reference(tiny_clip):
    model = tiny_clip.model
    views = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    classes = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
    adapter = build_adapter(TTAConfig(method="zero"), model, "dtd", text_features=classes)
    out = adapter.adapt(views)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(views), dim=-1)
    cos = (feats @ F.normalize(classes, dim=-1).t()).tolist()
    scale = float(model.logit_scale.exp())
    votes, winner, _ = reference_zero(cos, scale, 19)
    assert int(out.logits.argmax()) == winner
    torch.testing.assert_close(out.logits, torch.tensor(votes, dtype=torch.float32))
    # the votes are not probabilities: calibration comes from view 0's logits
    torch.testing.assert_close(out.calibration_logits, scale * torch.tensor(cos[0]), atol=1e-4, rtol=0)
    assert set(out.timings) >= {"images"}
    batch = adapter.adapt_batch([views, views.flip(-1)])
    torch.testing.assert_close(batch[0].logits, out.logits)
    torch.testing.assert_close(batch[0].calibration_logits, out.calibration_logits, atol=1e-4, rtol=0)
    assert torch.equal(batch[1].logits, adapter.adapt(views.flip(-1)).logits)


def test_tie_with_every_view_kept_goes_to_the_most_confident_kept_view():
    """``--tta-selection 1`` keeps every view, so a tie has no discarded view to break it: the
    fallback reads the most confident kept view instead (its arg-max is one of the tied classes)."""
    sharp = [0.0, 0.0, 0.0, 0.0, 0.2]  # logit gap 20 at scale 100: the lower entropy
    soft = [0.0, 0.0, 0.1, 0.0, 0.0]  # logit gap 10
    for rows in ([soft, sharp], [sharp, soft]):  # the position does not matter, the confidence does
        got = zero_votes(torch.tensor(rows), SCALE, 1.0)
        votes, winner, kept = reference_zero(rows, SCALE, 2)
        assert winner == got.prediction == 4 and got.tie_broken_by == -1
        assert got.kept.tolist() == kept
        assert got.votes.tolist() == votes == [0.0, 0.0, 1.0, 0.0, 2.0]


def fake_clock(monkeypatch) -> None:
    """Every ``perf_counter`` reading the stopwatch takes is 8 s after the previous one, so each
    timed phase lasts exactly 8 s (8 divides by 2 and 4 exactly in binary floating point)."""
    readings = iter(range(0, 8000, 8))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))


def test_timings_per_phase_and_batch_share_of_image_encoding(tiny_clip, monkeypatch):
    """``images`` is the image encoding, ``vote`` the rest; a batch's single encoding forward is
    shared equally among its images, the vote is each image's own."""
    fake_clock(monkeypatch)
    classes = torch.randn(C, 32, generator=torch.Generator().manual_seed(5))
    adapter = build_adapter(TTAConfig(method="zero", views=4), tiny_clip.model, "dtd", text_features=classes)
    views = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert adapter.adapt(views).timings == {"images": 8.0, "vote": 8.0}
    batch = adapter.adapt_batch([views, views.flip(-1), views.flip(-2), views])
    assert [out.timings for out in batch] == [{"images": 2.0, "vote": 8.0}] * 4


def test_adapter_and_vote_defaults_are_the_published_hard_votes_of_19_views(tiny_clip):
    """Built without options, ZERO keeps ⌊64 · 0.3⌋ = 19 views and counts hard votes (TTA.md §1).
    The classes are close to each other, so fp16 soft votes would split visibly."""
    model = tiny_clip.model
    views = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    classes = torch.randn(1, 32, generator=g) + 0.02 * torch.randn(7, 32, generator=g)
    out = ZeroAdapter(model, classes).adapt(views)
    with torch.no_grad():
        cos = F.normalize(model.encode_image(views), dim=-1) @ F.normalize(classes, dim=-1).t()
    scale = float(model.logit_scale.exp())
    votes, winner, kept = reference_zero(cos.tolist(), scale, 19)
    torch.testing.assert_close(out.logits, torch.tensor(votes, dtype=torch.float32))
    got = zero_votes(cos, scale)
    assert got.prediction == winner and got.kept.tolist() == kept
    torch.testing.assert_close(got.votes, torch.tensor(votes, dtype=torch.float32))
    soft = zero_votes(cos, scale, votes="fp16").votes
    assert float((soft - got.votes).abs().max()) > 0.5  # the data tells the two kinds of votes apart


def test_image_dtype_is_used(tiny_clip):
    """bf16 image encoding: the votes and calibration logits of a bf16 image tower's features."""
    model = tiny_clip.model
    views = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    classes = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
    t = F.normalize(classes, dim=-1)
    visual = copy.deepcopy(model.visual).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = F.normalize(visual(views.to(torch.bfloat16)).float(), dim=-1) @ t.t()
        fp32 = F.normalize(model.encode_image(views), dim=-1) @ t.t()
    scale = float(model.logit_scale.exp())
    config = TTAConfig(method="zero", views=16, image_dtype=torch.bfloat16)
    out = build_adapter(config, model, "dtd", text_features=classes).adapt(views)
    votes, _, _ = reference_zero(bf16.tolist(), scale, 4)
    torch.testing.assert_close(out.logits, torch.tensor(votes, dtype=torch.float32))
    torch.testing.assert_close(out.calibration_logits, scale * bf16[0], atol=1e-4, rtol=0)
    assert float((scale * (bf16[0] - fp32[0])).abs().max()) > 20 * 1e-4


def test_adapter_fp16_votes_equal_the_reference(tiny_clip):
    """``votes="fp16"`` reaches the vote count: on close classes the soft votes split (TTA.md §1.5)."""
    model = tiny_clip.model
    views = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    classes = torch.randn(1, 32, generator=g) + 0.02 * torch.randn(7, 32, generator=g)
    out = ZeroAdapter(model, classes, votes="fp16").adapt(views)
    with torch.no_grad():
        cos = (F.normalize(model.encode_image(views), dim=-1) @ F.normalize(classes, dim=-1).t()).tolist()
    scale = float(model.logit_scale.exp())
    soft, _, _ = reference_zero(cos, scale, 4, fp16=True)
    hard, _, _ = reference_zero(cos, scale, 4)
    torch.testing.assert_close(out.logits, torch.tensor(soft, dtype=torch.float32), atol=1e-5, rtol=0)
    assert max(abs(a - b) for a, b in zip(soft, hard)) > 0.5
