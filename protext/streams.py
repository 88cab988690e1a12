"""Stream orders and test scenarios of the OGA and StatA protocols, torch-free (TTA2.md §11).

Two evaluation protocols decide *which* test images an online or batch method sees, and in what order:

* **OGA** (TTA2.md §11.1, [oga runner.py:54-55, 158-161]): ``n_runs`` seeded permutations of the test
  set, the same ``(master_seed, n_runs)`` giving the same permutations for every method.
  :func:`oga_seeds` and :func:`oga_order` replay the official two lines exactly; per-run accuracies
  are summarised by :func:`summarize_runs` with the Expected Tail Accuracy (:func:`expected_tail_accuracy`),
  which the official code never computes (it only prints the per-run accuracies).
* **StatA** (TTA2.md §11.2, [stata sampler.py:6-149; main.py:112-170]): realistic batches with few
  active classes (:func:`batch_tasks`) and correlated online streams drawn from a Dirichlet slot
  assignment (:func:`online_stream`). The original draws from numpy's *global* RNG and leaves the
  Dirichlet draw unseeded (``np.random.default_rng()``); here every draw comes from one explicit
  :class:`numpy.random.Generator` the caller seeds and records, so every stream can be replayed.

The ``check_*`` helpers validate command-line values before any model loads; each raises a
:class:`StreamSettingError` whose one-line message names the flag.

Only numpy is used, imported inside the functions that draw, so a command can import this module to
validate and plan without torch (nor numpy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

# --- the protocols' published settings, as data -----------------------------------------------

#: OGA's master seed and run count [oga main.py:16, 20]
OGA_MASTER_SEED = 42
OGA_RUNS = 100
#: OGA's online batch size; the last batch of a run is kept even when shorter [oga main.py:17; runner.py:199-206]
OGA_BATCH_SIZE = 32
#: "the average accuracy in the worst 10 % of runs" [oga README.md:34, 39]
ETA_SHARE = 0.1

#: StatA's global seed [stata main.py:20, 68-79]; here it seeds the one Generator of a scenario
STATA_SEED = 1
#: tasks of the batch scenario [stata scripts/StatA_batch.sh]
STATA_BATCH_TASKS = 1000
#: streams of the online scenario and their batch size [stata scripts/StatA_online.sh]
STATA_ONLINE_STREAMS = 100
STATA_ONLINE_BATCH_SIZE = 128

#: StatA's realistic batch settings: name -> (batch size, K_min, K_max) [stata scripts/StatA_batch.sh; README].
#: ``batch size -1`` is the whole pool; ``K_min = K_max = None`` means every class, without a draw
#: ("All": the whole test set reshuffled). The two "Medium" settings differ by batch size, hence the suffix.
BATCH_SETTINGS: dict[str, tuple[int, Optional[int], Optional[int]]] = {
    "very_low": (64, 1, 4),
    "low": (64, 2, 10),
    "medium_64": (64, 5, 25),
    "medium_1000": (1000, 5, 25),
    "high": (1000, 25, 50),
    "very_high": (1000, 50, 100),
    "all": (-1, None, None),
}

#: StatA's online settings: name -> Dirichlet gamma; -1 is "separate" (one class after another)
#: [stata scripts/StatA_online.sh; README "Online Adaptation"]
ONLINE_SETTINGS: dict[str, float] = {"low": 0.1, "medium": 0.01, "high": 0.001, "separate": -1}

#: gamma value meaning "separate": classes one after another [stata sampler.py:136-149]
SEPARATE = -1

# the command-line flags the messages name (the command line adopts these spellings)
FLAG_RUNS = "--stream-runs"
FLAG_SEED = "--stream-seed"
FLAG_TASKS = "--tasks"
FLAG_BATCH_SIZE = "--batch-size"
FLAG_K_MIN = "--k-min"
FLAG_K_MAX = "--k-max"
FLAG_GAMMA = "--gamma"
FLAG_SCENARIO = "--scenario"


class StreamSettingError(UserError, ValueError):
    """A stream or scenario setting out of range; the one-line message names the flag."""


# --- validation ----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    """True for a Python or numpy integer, never for a bool or a float."""
    return not isinstance(value, bool) and hasattr(value, "__index__")


def check_stream_runs(n_runs: Any) -> int:
    """Return ``n_runs`` if it is an integer of at least 1, else raise :class:`StreamSettingError`."""
    if not _is_int(n_runs) or n_runs < 1:
        raise StreamSettingError(f"{FLAG_RUNS} must be at least 1, got {n_runs!r}")
    return int(n_runs)


def check_stream_seed(seed: Any) -> int:
    """Return ``seed`` if it is a non-negative integer (numpy's seeds are), else raise."""
    if not _is_int(seed) or seed < 0:
        raise StreamSettingError(f"{FLAG_SEED} must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_tasks(n_tasks: Any) -> int:
    """Return ``n_tasks`` (tasks or streams of a scenario) if it is an integer of at least 1, else raise."""
    if not _is_int(n_tasks) or n_tasks < 1:
        raise StreamSettingError(f"{FLAG_TASKS} must be at least 1, got {n_tasks!r}")
    return int(n_tasks)


def check_batch_scenario(
    batch_size: Any, k_min: Any, k_max: Any, n_classes: Optional[int] = None
) -> None:
    """Validate a batch scenario: ``batch_size`` >= 1 or -1, ``1 <= K_min <= K_max`` (or both None).

    With ``n_classes`` given, ``K_max`` above it is refused as well: use that for ranges a user
    types. The named :data:`BATCH_SETTINGS` are checked without it, because StatA runs them
    unchanged on every set and a draw of ``K_eff >= C`` then takes every class (Very High, 50-100,
    on EuroSAT's 10 classes is every class in every task) [stata sampler.py:47-51].
    """
    if not _is_int(batch_size) or (batch_size < 1 and batch_size != -1):
        raise StreamSettingError(
            f"{FLAG_BATCH_SIZE} must be a positive integer or -1 (the whole pool), got {batch_size!r}"
        )
    if (k_min is None) != (k_max is None):
        raise StreamSettingError(f"{FLAG_K_MIN} and {FLAG_K_MAX} go together: give both or neither")
    if k_min is None:
        return
    if not _is_int(k_min) or k_min < 1:
        raise StreamSettingError(f"{FLAG_K_MIN} must be at least 1, got {k_min!r}")
    if not _is_int(k_max):
        raise StreamSettingError(f"{FLAG_K_MAX} must be an integer, got {k_max!r}")
    if k_max < k_min:
        raise StreamSettingError(f"{FLAG_K_MIN} {k_min} is above {FLAG_K_MAX} {k_max}")
    if n_classes is not None and k_max > n_classes:
        raise StreamSettingError(f"{FLAG_K_MAX} {k_max} is above the {n_classes} classes of the test set")


def check_gamma(gamma: Any) -> float:
    """Return ``gamma`` if it is a finite Dirichlet concentration > 0 or -1 ("separate"), else raise."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(gamma, bool) or value != SEPARATE and not 0 < value < math.inf:
        raise StreamSettingError(f"{FLAG_GAMMA} must be above 0, or -1 for 'separate', got {gamma!r}")
    return value


def check_online_scenario(gamma: Any, batch_size: Any, n_images: Optional[int] = None) -> None:
    """Validate an online scenario: gamma (see :func:`check_gamma`), ``batch_size`` >= 1, and, with
    ``n_images`` given, at least one complete batch (the incomplete last one is dropped)."""
    check_gamma(gamma)
    if not _is_int(batch_size) or batch_size < 1:
        raise StreamSettingError(f"{FLAG_BATCH_SIZE} must be at least 1 in an online stream, got {batch_size!r}")
    if n_images is not None and n_images < batch_size:
        raise StreamSettingError(
            f"{FLAG_BATCH_SIZE} {batch_size} is above the {n_images} test images: "
            "the online stream would hold no complete batch"
        )


def batch_setting(name: str) -> tuple[int, Optional[int], Optional[int]]:
    """``(batch size, K_min, K_max)`` of a named StatA batch setting, or a one-line error."""
    if name not in BATCH_SETTINGS:
        raise StreamSettingError(
            f"unknown {FLAG_SCENARIO} {name!r}; the batch settings are {', '.join(BATCH_SETTINGS)}"
        )
    return BATCH_SETTINGS[name]


def online_setting(name: str) -> float:
    """Dirichlet gamma of a named StatA online setting, or a one-line error."""
    if name not in ONLINE_SETTINGS:
        raise StreamSettingError(
            f"unknown {FLAG_SCENARIO} {name!r}; the online settings are {', '.join(ONLINE_SETTINGS)}"
        )
    return ONLINE_SETTINGS[name]


# --- OGA: seeded orders and the tail ----------------------------------------------------------------


def oga_seeds(master_seed: int, n_runs: int) -> list[int]:
    """The per-run seeds of OGA's multi-run protocol (TTA2.md §11.1).

    Equal to the official ``np.random.default_rng(master_seed).choice(range(10000 * n_runs),
    size=n_runs, replace=False)`` [oga runner.py:54-55]: choosing from ``range(M)`` picks the same
    positions as from the integer ``M``, and position ``i`` of the range holds ``i``.
    """
    import numpy as np

    check_stream_seed(master_seed)
    check_stream_runs(n_runs)
    seeds = np.random.default_rng(master_seed).choice(10000 * n_runs, size=n_runs, replace=False)
    return [int(s) for s in seeds]


def oga_order(seed: int, n: int) -> list[int]:
    """The stream order of one OGA run: ``default_rng(seed).choice(range(n), n, replace=False)``
    [oga runner.py:158-161], a permutation of ``0 .. n-1``."""
    import numpy as np

    check_stream_seed(seed)
    if not _is_int(n) or n < 1:
        raise ValueError(f"a stream needs at least one image, got n={n!r}")
    return [int(i) for i in np.random.default_rng(seed).choice(n, n, replace=False)]


def chunk(order: Sequence[int], batch_size: int, drop_last: bool = False) -> list[list[int]]:
    """Cut an order into consecutive batches; the last, shorter batch is kept unless ``drop_last``
    (OGA keeps it [oga runner.py:199-206], StatA's online streams drop it [stata sampler.py:101-107])."""
    if not _is_int(batch_size) or batch_size < 1:
        raise StreamSettingError(f"{FLAG_BATCH_SIZE} must be at least 1, got {batch_size!r}")
    items = list(order)
    end = len(items) - len(items) % batch_size if drop_last else len(items)
    return [items[i : i + batch_size] for i in range(0, end, batch_size)]


def tail_size(n_runs: int, share: float = ETA_SHARE) -> int:
    """How many runs form the tail: ``ceil(share * n_runs)``, at least one.

    OGA defines ETA on "the worst 10 % of runs" and always uses 100 runs, where floor and ceiling
    agree (10). For other counts protext rounds **up**, so the tail never covers less than the
    share (15 runs: the worst 2, not 1). The share is taken as the decimal it is written as
    (``Fraction("0.1")``), so that floating-point noise (``0.1 * 30 = 3.0000000000000004``) does
    not add a run.
    """
    check_stream_runs(n_runs)
    if not 0 < share <= 1:
        raise ValueError(f"the tail share must be in (0, 1], got {share!r}")
    return max(1, math.ceil(Fraction(str(share)) * n_runs))


def expected_tail_accuracy(accuracies: Sequence[float], share: float = ETA_SHARE) -> float:
    """Expected Tail Accuracy: the mean of the :func:`tail_size` lowest per-run accuracies [oga README.md:34, 39].

    Ties at the cut do not matter: tied values are equal, whichever of them is taken.
    """
    values = sorted(float(a) for a in accuracies)
    worst = values[: tail_size(len(values), share)]
    return sum(worst) / len(worst)


@dataclass(frozen=True)
class RunSummary:
    """Per-run accuracies of a multi-run protocol summarised: mean, spread and tail.

    ``std`` is the population standard deviation (numpy's default, ``ddof=0``) of the runs;
    ``eta`` the Expected Tail Accuracy over the worst ``tail_runs`` runs.
    """

    n_runs: int
    mean: float
    std: float
    min: float
    max: float
    eta: float
    tail_runs: int

    def to_dict(self) -> dict[str, float | int]:
        """The summary as a JSON-ready dict."""
        return asdict(self)


def summarize_runs(accuracies: Sequence[float], share: float = ETA_SHARE) -> RunSummary:
    """Mean, standard deviation (ddof 0), minimum, maximum and ETA of per-run accuracies."""
    values = [float(a) for a in accuracies]
    n = len(values)
    k = tail_size(n, share)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return RunSummary(
        n_runs=n, mean=mean, std=std, min=min(values), max=max(values),
        eta=expected_tail_accuracy(values, share), tail_runs=k,
    )


# --- StatA: realistic batches and correlated streams ----------------------------------------------------


def _class_indices(labels: Sequence[int]) -> tuple[list[int], list["np.ndarray"]]:
    """Sorted distinct labels and, per label, its indices in dataset order [stata sampler.py:12-16]."""
    import numpy as np

    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    classes = np.unique(y)
    # np.flatnonzero lists a class's indices in increasing order, i.e. in dataset order
    return [c.item() for c in classes], [np.flatnonzero(y == c) for c in classes]


def batch_tasks(
    labels: Sequence[int],
    k_min: Optional[int],
    k_max: Optional[int],
    batch_size: int,
    n_tasks: int,
    rng: "np.random.Generator",
) -> list[list[int]]:
    """StatA's realistic batch scenario: ``n_tasks`` independent batches of test indices (TTA2.md §11.2).

    Per task, drawing only from ``rng`` in this order [stata sampler.py:37-67]:

    1. ``K_eff = rng.integers(K_min, K_max + 1)``, inclusive of both ends (skipped when both are None);
    2. if ``0 < K_eff < C``: ``K_eff`` classes without replacement, else every class (sorted);
    3. the pool: every index of those classes, class by class in the order drawn, each class's
       indices in dataset order;
    4. if ``batch_size == -1`` or the pool is smaller than the batch: the whole pool, else
       ``batch_size`` indices of the pool without replacement (so the classes are *not* balanced);
    5. the batch shuffled.

    ``K_max`` above the class count is allowed here, as in StatA (see :func:`check_batch_scenario`).
    """
    import numpy as np

    check_batch_scenario(batch_size, k_min, k_max)
    check_tasks(n_tasks)
    classes, by_class = _class_indices(labels)
    n_classes = len(classes)
    tasks: list[list[int]] = []
    for _ in range(n_tasks):
        chosen: Sequence[int] = range(n_classes)
        if k_min is not None:
            k_eff = int(rng.integers(k_min, k_max + 1))  # np.random.randint(K_min, K_max + 1) [l.41-42]
            # the original tests 0 < K_eff < C [l.47-51]; K_eff >= K_min >= 1 here
            if k_eff < n_classes:
                chosen = rng.choice(n_classes, k_eff, replace=False)
        pool = np.concatenate([by_class[c] for c in chosen])  # [l.54-56]
        if batch_size == -1 or len(pool) < batch_size:  # [l.58-63]
            batch = pool
        else:
            batch = rng.choice(pool, batch_size, replace=False)
        rng.shuffle(batch)  # [l.65]
        tasks.append([int(i) for i in batch])
    return tasks


def online_stream(
    labels: Sequence[int], gamma: float, batch_size: int, rng: "np.random.Generator"
) -> list[list[int]]:
    """One StatA correlated online stream, cut into complete batches (TTA2.md §11.2).

    ``gamma > 0`` [stata sampler.py:109-134; main.py:147-148]: with ``S = min(N // batch_size, C)``
    slots, ``pi = rng.dirichlet([gamma] * S, C)`` (one row per class, classes in sorted order; the
    original's generator is unseeded, here it is ``rng``). Each class's indices, in dataset order,
    are cut into S consecutive chunks at ``floor(cumsum(pi_c)[:-1] * n_c)``; chunk s joins slot s.
    Each slot is then permuted (``rng.permutation``, slot by slot) and the slots are concatenated in
    slot order. A small gamma puts each class in few slots: long runs of the same classes.

    ``gamma == -1`` ("separate") [l.136-149]: the classes in a random order, each class's indices
    shuffled: one class after another.

    Batches are consecutive blocks of ``batch_size``; an incomplete last block is dropped
    [l.101-107]. Draws: the Dirichlet matrix, then the S slot permutations ("separate": the class
    order, then one shuffle per class in that order).
    """
    import numpy as np

    check_online_scenario(gamma, batch_size, n_images=len(labels))
    classes, by_class = _class_indices(labels)
    n_classes = len(classes)
    if float(gamma) == SEPARATE:
        parts = []
        for c in rng.permutation(n_classes):
            indices = by_class[c].copy()
            rng.shuffle(indices)
            parts.append(indices)
    else:
        n_slots = min(len(labels) // batch_size, n_classes)
        shares = rng.dirichlet([float(gamma)] * n_slots, n_classes)
        slots: list[list["np.ndarray"]] = [[] for _ in range(n_slots)]
        for c in range(n_classes):
            indices = by_class[c]
            cuts = (np.cumsum(shares[c])[:-1] * len(indices)).astype(int)
            for s, piece in enumerate(np.split(indices, cuts)):
                slots[s].append(piece)
        parts = []
        for pieces in slots:
            slot = np.concatenate(pieces)
            parts.append(slot[rng.permutation(len(slot))])
    return chunk([int(i) for i in np.concatenate(parts)], batch_size, drop_last=True)
