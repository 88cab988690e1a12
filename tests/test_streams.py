"""OGA stream orders and ETA, StatA batch tasks and online streams (TTA2.md §11), against references.

The references below are written from the protocol text and the official lines quoted in TTA2.md
(§11.1: oga runner.py:54-55, 158-161; §11.2: stata sampler.py), never with protext's helpers. The
StatA references follow the original's structure (a label -> indices dict, ``np.split``, slot lists)
and make the same Generator calls in the same order, so they must agree draw for draw.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from protext.errors import UserError
from protext.streams import (
    BATCH_SETTINGS,
    ETA_SHARE,
    OGA_BATCH_SIZE,
    OGA_MASTER_SEED,
    OGA_RUNS,
    ONLINE_SETTINGS,
    STATA_BATCH_TASKS,
    STATA_ONLINE_BATCH_SIZE,
    STATA_ONLINE_STREAMS,
    STATA_SEED,
    RunSummary,
    StreamSettingError,
    batch_setting,
    batch_tasks,
    check_batch_scenario,
    check_gamma,
    check_online_scenario,
    check_stream_runs,
    check_stream_seed,
    check_tasks,
    chunk,
    expected_tail_accuracy,
    oga_order,
    oga_seeds,
    online_setting,
    online_stream,
    summarize_runs,
    tail_size,
)

# --- hand-written references -------------------------------------------------------------------------


def official_seeds(master_seed: int, n_runs: int) -> list[int]:
    """oga runner.py:54-55, literally."""
    return [int(s) for s in np.random.default_rng(master_seed).choice(range(10000 * n_runs), size=n_runs, replace=False)]


def official_order(seed: int, n: int) -> list[int]:
    """oga runner.py:158-161, literally."""
    return [int(i) for i in np.random.default_rng(seed).choice(range(n), n, replace=False)]


def label_dict(labels) -> tuple[list, dict]:
    """stata sampler.py:12-16: sorted classes, each class's indices in dataset order."""
    d = defaultdict(list)
    for i, y in enumerate(labels):
        d[int(y)].append(i)
    return sorted(d), d


def reference_batch_tasks(labels, k_min, k_max, batch_size, n_tasks, rng) -> list[list[int]]:
    """TTA2.md §11.2 batch scenario steps 1-5, the global RNG replaced by ``rng``."""
    classes, d = label_dict(labels)
    out = []
    for _ in range(n_tasks):
        if k_min is None:
            k_eff = len(classes)
        else:
            k_eff = rng.integers(k_min, k_max + 1)
        if 0 < k_eff < len(classes):
            selected = rng.choice(classes, k_eff, replace=False)
        else:
            selected = classes
        pool = []
        for label in selected:
            pool.extend(d[int(label)])
        if batch_size == -1 or len(pool) < batch_size:
            final = list(pool)
        else:
            final = rng.choice(pool, batch_size, replace=False).tolist()
        rng.shuffle(final)
        out.append([int(i) for i in final])
    return out


def reference_stream(labels, gamma, batch_size, rng) -> list[int]:
    """TTA2.md §11.2 online scenario, the whole order before it is cut into batches."""
    classes, d = label_dict(labels)
    final = []
    if gamma == -1:
        for label in rng.permutation(classes):
            indices = np.array(d[int(label)])
            rng.shuffle(indices)
            final.extend(int(i) for i in indices)
        return final
    n_slots = min(len(labels) // batch_size, len(classes))
    dist = rng.dirichlet([gamma] * n_slots, len(classes))
    slot_indices = [[] for _ in range(n_slots)]
    for row, label in enumerate(classes):
        indices = np.array(d[label])
        pieces = np.split(indices, (np.cumsum(dist[row])[:-1] * len(indices)).astype(int))
        for s, ids in enumerate(pieces):
            slot_indices[s].extend(ids)
    for s_ids in slot_indices:
        for i in rng.permutation(range(len(s_ids))):
            final.append(int(s_ids[i]))
    return final


def reference_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """stata sampler.py:101-107: consecutive blocks while a whole block fits."""
    out, c = [], 0
    while c + batch_size <= len(order):
        out.append(order[c : c + batch_size])
        c += batch_size
    return out


# labels with gaps, interleaved, unequal class sizes: 5 classes, 41 images
LABELS = [7, 3, 3, 10, 7, 22, 3, 10, 10, 5, 7, 22, 22, 3, 7, 10, 5, 3, 22, 7, 10,
          3, 3, 7, 22, 10, 5, 7, 3, 10, 22, 3, 7, 10, 10, 22, 3, 7, 3, 10, 22]


def blocks(n_classes: int, per_class: int) -> list[int]:
    """Labels 0..n_classes-1, ``per_class`` images each, interleaved (0, 1, 2, ..., 0, 1, 2, ...)."""
    return [i % n_classes for i in range(n_classes * per_class)]


# --- OGA orders ------------------------------------------------------------------------------------


def test_oga_constants_are_the_papers():
    assert (OGA_MASTER_SEED, OGA_RUNS, OGA_BATCH_SIZE, ETA_SHARE) == (42, 100, 32, 0.1)


@pytest.mark.parametrize("master, runs", [(42, 100), (42, 1), (0, 7), (123, 3)])
def test_oga_seeds_equal_the_official_line(master, runs):
    assert oga_seeds(master, runs) == official_seeds(master, runs)


def test_oga_seeds_pinned():
    # computed with the official line (numpy 2.x PCG64); a change here breaks replay across machines
    assert oga_seeds(42, 100)[:5] == [437144, 940288, 669800, 466699, 450428]
    assert oga_order(437144, 20) == [3, 16, 18, 0, 10, 7, 11, 4, 15, 19, 14, 1, 12, 2, 17, 6, 13, 9, 5, 8]
    assert all(type(s) is int for s in oga_seeds(42, 3))


@pytest.mark.parametrize("n", [1, 2, 17, 1000, 50_000])
def test_oga_order_equals_the_official_line_and_is_a_permutation(n):
    for seed in official_seeds(42, 100)[:3]:
        order = oga_order(seed, n)
        assert order == official_order(seed, n)
        assert sorted(order) == list(range(n))
        assert all(type(i) is int for i in order[:5])


def test_same_seed_same_order_twice_and_in_another_process():
    seeds = oga_seeds(42, 100)
    first = [oga_order(s, 300) for s in seeds[:4]]
    assert [oga_order(s, 300) for s in oga_seeds(42, 100)[:4]] == first
    code = (
        "import json; from protext.streams import oga_seeds, oga_order; "
        "print(json.dumps([oga_order(s, 300) for s in oga_seeds(42, 100)[:4]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == first


def test_different_seeds_give_different_orders():
    a, b = official_seeds(42, 2)
    assert oga_order(a, 50) != oga_order(b, 50)
    assert oga_seeds(42, 5) != oga_seeds(43, 5)


def test_oga_bad_input():
    with pytest.raises(StreamSettingError, match="--stream-runs must be at least 1"):
        oga_seeds(42, 0)
    with pytest.raises(StreamSettingError, match="--stream-seed"):
        oga_seeds(-1, 5)
    with pytest.raises(StreamSettingError, match="--stream-seed"):
        oga_order(-3, 5)
    with pytest.raises(ValueError, match="at least one image"):
        oga_order(1, 0)
    with pytest.raises(ValueError, match="at least one image"):
        oga_order(1, 2.0)


def test_chunk_keeps_or_drops_the_short_last_batch():
    order = list(range(10))
    assert chunk(order, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk(order, 4, drop_last=True) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk(order, 5, drop_last=True) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert chunk(order, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert chunk(order, 1) == [[i] for i in order]
    assert chunk(order[:3], 4, drop_last=True) == []
    assert chunk(order[:3], 4) == [[0, 1, 2]]
    with pytest.raises(StreamSettingError, match="--batch-size must be at least 1"):
        chunk(order, 0)


# --- ETA and the run summary --------------------------------------------------------------------------


def test_eta_of_100_runs_is_the_mean_of_the_10_lowest():
    accs = [float(a) for a in np.random.default_rng(5).permutation(np.arange(1, 101))]
    assert expected_tail_accuracy(accs) == 5.5  # (1 + ... + 10) / 10


def test_eta_ties_at_the_cut():
    # 100 runs: the 9 lowest are 50, then 91 runs tied at 60; the 10th (the cut) is a tied 60
    accs = [60.0] * 91 + [50.0] * 9
    assert expected_tail_accuracy(accs) == pytest.approx((9 * 50 + 60) / 10)
    # the 10th and 11th are tied: whichever is taken, the mean is the same
    accs = [40.0] * 8 + [45.0, 45.0, 45.0] + [70.0] * 89
    assert expected_tail_accuracy(accs) == pytest.approx((8 * 40 + 2 * 45) / 10)


@pytest.mark.parametrize(
    "n, share, k",
    [(100, 0.1, 10), (30, 0.1, 3), (70, 0.1, 7), (15, 0.1, 2), (11, 0.1, 2), (10, 0.1, 1), (9, 0.1, 1),
     (1, 0.1, 1), (8, 0.25, 2), (9, 0.25, 3), (4, 1.0, 4), (3, 0.5, 2)],
)
def test_tail_size_rounds_up_and_ignores_float_noise(n, share, k):
    assert tail_size(n, share) == k


def test_tail_size_takes_the_share_as_written():
    assert tail_size(30, np.float64(0.1)) == 3
    assert tail_size(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert tail_size(7, 0.3) == 3  # 2.1 rounds up


def test_eta_on_few_runs():
    assert expected_tail_accuracy([70.0, 65.0, 80.0]) == 65.0  # 10 % of 3 runs rounds up to one run
    assert expected_tail_accuracy([9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]) == 1.5
    assert expected_tail_accuracy([70.0]) == 70.0
    assert expected_tail_accuracy([4, 2, 8, 6], share=0.5) == 3.0
    assert expected_tail_accuracy([4, 2, 8, 6], share=1.0) == 5.0
    assert expected_tail_accuracy(np.array([3.0, 1.0, 2.0]), share=0.4) == 1.5


def test_summary_by_hand():
    s = summarize_runs([60.0, 70.0, 80.0, 90.0])
    assert isinstance(s, RunSummary)
    assert (s.n_runs, s.mean, s.min, s.max, s.eta, s.tail_runs) == (4, 75.0, 60.0, 90.0, 60.0, 1)
    assert s.std == pytest.approx(math.sqrt(125.0))  # population std: (225 + 25 + 25 + 225) / 4
    accs = [50.0 + i for i in range(20)]  # 50 .. 69
    s = summarize_runs(accs, share=0.2)
    assert (s.tail_runs, s.eta, s.mean) == (4, 51.5, 59.5)
    assert s.to_dict() == {"n_runs": 20, "mean": 59.5, "std": s.std, "min": 50.0, "max": 69.0, "eta": 51.5, "tail_runs": 4}
    assert s.std == pytest.approx(float(np.std(accs)))
    one = summarize_runs([42])
    assert (one.mean, one.std, one.min, one.max, one.eta, one.tail_runs) == (42.0, 0.0, 42.0, 42.0, 42.0, 1)


def test_tail_bad_input():
    with pytest.raises(StreamSettingError, match="--stream-runs must be at least 1"):
        expected_tail_accuracy([])
    with pytest.raises(StreamSettingError):
        summarize_runs([])
    for share in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            tail_size(10, share)


# --- StatA batch tasks ----------------------------------------------------------------------------------


def test_settings_are_statas():
    # TTA2.md §11.2 (stata scripts/StatA_batch.sh, StatA_online.sh; README)
    assert BATCH_SETTINGS == {
        "very_low": (64, 1, 4), "low": (64, 2, 10), "medium_64": (64, 5, 25),
        "medium_1000": (1000, 5, 25), "high": (1000, 25, 50), "very_high": (1000, 50, 100), "all": (-1, None, None),
    }
    assert ONLINE_SETTINGS == {"low": 0.1, "medium": 0.01, "high": 0.001, "separate": -1}
    assert (STATA_SEED, STATA_BATCH_TASKS, STATA_ONLINE_STREAMS, STATA_ONLINE_BATCH_SIZE) == (1, 1000, 100, 128)
    assert batch_setting("very_high") == (1000, 50, 100)
    assert online_setting("high") == 0.001
    with pytest.raises(StreamSettingError, match="unknown --scenario 'medium'; the batch settings are very_low, low"):
        batch_setting("medium")
    with pytest.raises(StreamSettingError, match="unknown --scenario 'very_low'; the online settings are low, medium"):
        online_setting("very_low")


@pytest.mark.parametrize(
    "k_min, k_max, batch_size",
    [(1, 2, 6), (2, 4, 10), (1, 5, 8), (3, 9, 4), (None, None, -1), (None, None, 12), (2, 3, -1),
     (1, 1, 8), (5, 5, 100), (4, 6, 41), (1, 4, 7)],
)
def test_batch_tasks_equal_the_reference(k_min, k_max, batch_size):
    got = batch_tasks(LABELS, k_min, k_max, batch_size, 60, np.random.default_rng(11))
    want = reference_batch_tasks(LABELS, k_min, k_max, batch_size, 60, np.random.default_rng(11))
    assert got == want
    assert all(type(i) is int for i in got[0])


def test_batch_tasks_whole_pool_equal_class_sizes():
    # every class has 8 images and the batch is 8: the pool equals the batch, so it is drawn (a permutation)
    labels = blocks(4, 8)
    for k in ((1, 1), (1, 3)):
        got = batch_tasks(labels, *k, 8, 40, np.random.default_rng(2))
        assert got == reference_batch_tasks(labels, *k, 8, 40, np.random.default_rng(2))


def test_k_eff_is_inclusive_and_classes_are_drawn_without_replacement():
    labels = blocks(6, 5)  # 6 classes of 5
    seen = set()
    for task in batch_tasks(labels, 2, 4, -1, 400, np.random.default_rng(0)):
        classes = {labels[i] for i in task}
        # the whole pool: every image of exactly K_eff distinct classes, each once
        assert len(task) == 5 * len(classes) == len(set(task))
        assert sorted(task) == sorted(i for i in range(30) if labels[i] in classes)
        seen.add(len(classes))
    assert seen == {2, 3, 4}


def test_k_eff_at_or_above_the_class_count_takes_every_class():
    labels = blocks(3, 4)
    for task in batch_tasks(labels, 3, 9, -1, 30, np.random.default_rng(1)):
        assert sorted(task) == list(range(12))
    tasks = batch_tasks(labels, None, None, -1, 30, np.random.default_rng(1))
    assert all(sorted(t) == list(range(12)) for t in tasks)
    assert any(t != sorted(t) for t in tasks)  # shuffled
    assert len({tuple(t) for t in tasks}) > 1


def test_batches_are_not_class_balanced():
    labels = [0] * 90 + [1] * 10
    counts = []
    for task in batch_tasks(labels, 2, 2, 20, 300, np.random.default_rng(4)):
        assert len(task) == len(set(task)) == 20
        counts.append(sum(labels[i] == 1 for i in task))
    # the rare class's share follows the pool (10 %, 2 of 20), not 50 %, and it is sometimes absent
    assert 1.5 < np.mean(counts) < 2.5
    assert 0 in counts


def test_pool_smaller_than_the_batch_is_taken_whole():
    labels = blocks(3, 5)
    for task in batch_tasks(labels, 1, 1, 64, 50, np.random.default_rng(3)):
        assert len(task) == 5 and len({labels[i] for i in task}) == 1
    for task in batch_tasks(labels, 2, 2, 64, 50, np.random.default_rng(3)):
        assert len(task) == 10 and len(set(task)) == 10


def test_batch_of_fixed_size_from_the_pool():
    labels = blocks(5, 20)
    for task in batch_tasks(labels, 2, 3, 16, 100, np.random.default_rng(8)):
        assert len(task) == len(set(task)) == 16
        assert 1 <= len({labels[i] for i in task}) <= 3


def test_batch_tasks_are_reproducible_and_leave_the_global_rng_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = batch_tasks(LABELS, 1, 4, 6, 20, np.random.default_rng(9))
    assert np.array_equal(np.random.get_state()[1], before)
    assert batch_tasks(LABELS, 1, 4, 6, 20, np.random.default_rng(9)) == a
    assert batch_tasks(LABELS, 1, 4, 6, 20, np.random.default_rng(10)) != a
    assert len(a) == 20


def test_batch_tasks_accept_a_numpy_array():
    got = batch_tasks(np.array(LABELS), 1, 3, 5, 10, np.random.default_rng(6))
    assert got == reference_batch_tasks(LABELS, 1, 3, 5, 10, np.random.default_rng(6))


def test_batch_tasks_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(StreamSettingError, match="--k-min 5 is above --k-max 2"):
        batch_tasks(LABELS, 5, 2, 8, 3, rng)
    with pytest.raises(StreamSettingError, match="--k-min must be at least 1, got 0"):
        batch_tasks(LABELS, 0, 2, 8, 3, rng)
    with pytest.raises(StreamSettingError, match="--batch-size must be a positive integer or -1"):
        batch_tasks(LABELS, 1, 2, 0, 3, rng)
    with pytest.raises(StreamSettingError, match="--batch-size"):
        batch_tasks(LABELS, 1, 2, -2, 3, rng)
    with pytest.raises(StreamSettingError, match="--tasks must be at least 1, got 0"):
        batch_tasks(LABELS, 1, 2, 8, 0, rng)
    with pytest.raises(StreamSettingError, match="give both or neither"):
        batch_tasks(LABELS, 1, None, 8, 3, rng)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        batch_tasks([], 1, 2, 8, 3, rng)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        batch_tasks([[0, 1]], 1, 2, 8, 3, rng)


# --- StatA online streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.1, 0.01, 0.001, 1.0, 50.0, -1])
@pytest.mark.parametrize("batch_size", [4, 7, 16, 41])
def test_online_stream_equals_the_reference(gamma, batch_size):
    for seed in (0, 1, 2):
        got = online_stream(LABELS, gamma, batch_size, np.random.default_rng(seed))
        order = reference_stream(LABELS, gamma, batch_size, np.random.default_rng(seed))
        assert sorted(order) == list(range(len(LABELS)))
        assert got == reference_batches(order, batch_size)


def test_slot_count_is_the_smaller_of_batches_and_classes():
    # 3 complete batches, 5 classes: 3 slots; 20 batches, 5 classes: 5 slots (both through the reference)
    for batch_size in (12, 2):
        for seed in range(4):
            got = online_stream(LABELS, 0.5, batch_size, np.random.default_rng(seed))
            want = reference_batches(reference_stream(LABELS, 0.5, batch_size, np.random.default_rng(seed)), batch_size)
            assert got == want


def test_one_slot_keeps_every_class_in_it():
    labels = blocks(3, 3)  # 9 images, batch 5: one complete batch, one slot
    got = online_stream(labels, 0.1, 5, np.random.default_rng(0))
    assert len(got) == 1 and len(got[0]) == 5


def test_the_incomplete_last_batch_is_dropped():
    labels = blocks(5, 5)  # 25 images
    for gamma in (0.1, -1):
        batches = online_stream(labels, gamma, 4, np.random.default_rng(3))
        assert len(batches) == 6 and all(len(b) == 4 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 24
        full = reference_stream(labels, gamma, 4, np.random.default_rng(3))
        assert flat == full[:24]  # the one dropped image is the stream's last


def test_separate_gives_one_class_after_another():
    labels = blocks(6, 8)  # 48 images, batch 8: no image dropped
    orders = set()
    for seed in range(10):
        batches = online_stream(labels, -1, 8, np.random.default_rng(seed))
        flat = [labels[i] for b in batches for i in b]
        runs = [flat[0]] + [b for a, b in zip(flat, flat[1:]) if a != b]
        assert sorted(runs) == list(range(6))  # each class in one contiguous run
        assert all(len({labels[i] for i in b}) == 1 for b in batches)
        orders.add(tuple(runs))
    assert len(orders) > 1  # the class order is drawn


def test_small_gamma_concentrates_classes():
    labels = blocks(10, 40)  # 400 images in dataset order 0, 1, ..., 9, 0, 1, ...; batch 20: 10 slots

    def distinct_per_batch(gamma: float) -> float:
        counts = [
            len({labels[i] for i in b})
            for seed in range(20)
            for b in online_stream(labels, gamma, 20, np.random.default_rng(seed))
        ]
        return float(np.mean(counts))

    high, medium, low, flat = (distinct_per_batch(g) for g in (0.001, 0.1, 1.0, 1000.0))
    assert high < medium < low < flat
    assert high < 3 and flat > 9


def test_online_stream_is_reproducible_and_leaves_the_global_rng_alone():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    a = online_stream(LABELS, 0.01, 4, np.random.default_rng(5))
    b = online_stream(LABELS, -1, 4, np.random.default_rng(5))
    assert np.array_equal(np.random.get_state()[1], before)
    assert online_stream(LABELS, 0.01, 4, np.random.default_rng(5)) == a
    assert online_stream(LABELS, -1, 4, np.random.default_rng(5)) == b
    assert online_stream(LABELS, 0.01, 4, np.random.default_rng(6)) != a
    assert all(type(i) is int for i in a[0])


def test_online_stream_bad_input():
    rng = np.random.default_rng(0)
    for gamma in (0, 0.0, -0.5, -2, float("nan"), float("inf"), True, "x", None):
        with pytest.raises(StreamSettingError, match="--gamma must be above 0, or -1 for 'separate'"):
            online_stream(LABELS, gamma, 4, rng)
    with pytest.raises(StreamSettingError, match="--batch-size must be at least 1 in an online stream, got 0"):
        online_stream(LABELS, 0.1, 0, rng)
    with pytest.raises(StreamSettingError, match="--batch-size"):
        online_stream(LABELS, 0.1, -1, rng)
    with pytest.raises(StreamSettingError, match="--batch-size 42 is above the 41 test images"):
        online_stream(LABELS, 0.1, 42, rng)
    assert len(online_stream(LABELS, 0.1, 41, rng)) == 1


# --- the validation helpers -----------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and isinstance(excinfo.value, UserError)
    return message


def test_check_helpers_return_valid_values():
    assert check_stream_runs(100) == 100 and check_stream_runs(np.int64(1)) == 1
    assert check_stream_seed(0) == 0 and check_stream_seed(42) == 42
    assert check_tasks(1) == 1
    assert check_gamma(0.001) == 0.001 and check_gamma(-1) == -1.0 and check_gamma(np.float32(2.0)) == 2.0
    check_batch_scenario(64, 1, 4)
    check_batch_scenario(-1, None, None)
    check_batch_scenario(1000, 50, 100, n_classes=100)
    check_batch_scenario(1, 3, 3, n_classes=3)
    check_online_scenario(0.1, 128, n_images=128)
    check_online_scenario(-1, 1)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_stream_runs(0), "--stream-runs must be at least 1, got 0"),
        (lambda: check_stream_runs(-5), "--stream-runs must be at least 1, got -5"),
        (lambda: check_stream_runs(2.5), "--stream-runs must be at least 1, got 2.5"),
        (lambda: check_stream_runs(True), "--stream-runs must be at least 1, got True"),
        (lambda: check_stream_seed(-1), "--stream-seed must be a non-negative integer, got -1"),
        (lambda: check_stream_seed(1.0), "--stream-seed must be a non-negative integer, got 1.0"),
        (lambda: check_tasks(0), "--tasks must be at least 1, got 0"),
        (lambda: check_tasks("3"), "--tasks must be at least 1, got '3'"),
        (lambda: check_batch_scenario(64, 5, 4), "--k-min 5 is above --k-max 4"),
        (lambda: check_batch_scenario(64, 1, 48, n_classes=47), "--k-max 48 is above the 47 classes of the test set"),
        (lambda: check_batch_scenario(64, 0, 4), "--k-min must be at least 1, got 0"),
        (lambda: check_batch_scenario(64, 1.0, 4), "--k-min must be at least 1, got 1.0"),
        (lambda: check_batch_scenario(64, 1, 4.0), "--k-max must be an integer, got 4.0"),
        (lambda: check_batch_scenario(64, None, 4), "--k-min and --k-max go together: give both or neither"),
        (lambda: check_batch_scenario(0, 1, 4), "--batch-size must be a positive integer or -1 (the whole pool), got 0"),
        (lambda: check_batch_scenario(-2, 1, 4), "--batch-size must be a positive integer or -1 (the whole pool), got -2"),
        (lambda: check_batch_scenario(8.0, 1, 4), "--batch-size must be a positive integer or -1 (the whole pool), got 8.0"),
        (lambda: check_gamma(0), "--gamma must be above 0, or -1 for 'separate', got 0"),
        (lambda: check_gamma(-0.001), "--gamma must be above 0, or -1 for 'separate', got -0.001"),
        (lambda: check_online_scenario(0.1, 0), "--batch-size must be at least 1 in an online stream, got 0"),
        (lambda: check_online_scenario(0.1, 2.0), "--batch-size must be at least 1 in an online stream, got 2.0"),
        (lambda: check_online_scenario(0, 8), "--gamma must be above 0"),
        (lambda: check_online_scenario(0.1, 129, n_images=128),
         "--batch-size 129 is above the 128 test images: the online stream would hold no complete batch"),
    ],
)
def test_check_helpers_refuse_with_one_line_naming_the_flag(call, message):
    with pytest.raises(StreamSettingError) as excinfo:
        call()
    assert one_line(excinfo).startswith(message)
    assert isinstance(excinfo.value, ValueError)


def test_named_settings_pass_without_a_class_count():
    for batch_size, k_min, k_max in BATCH_SETTINGS.values():
        check_batch_scenario(batch_size, k_min, k_max)
    for gamma in ONLINE_SETTINGS.values():
        check_online_scenario(gamma, STATA_ONLINE_BATCH_SIZE)
    # Very High on a 10-class set runs, as in StatA: every task takes every class
    labels = blocks(10, 3)
    for task in batch_tasks(labels, 50, 100, 1000, 5, np.random.default_rng(0)):
        assert sorted(task) == list(range(30))


def test_module_needs_neither_torch_nor_numpy_to_import():
    code = (
        "import sys; import protext.streams as s; s.check_stream_runs(3); s.batch_setting('all'); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
