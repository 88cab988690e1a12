"""Confident-view selection (ALGORITHMS.md §5 step 3) against a hand-written reference.

The view entropies of §5 are ``H = −Σ softmax(z)·log_softmax(z)``; the views kept are the
``⌊n · fraction⌋`` of lowest entropy, and ``select_confident`` promises that views of equal entropy
are taken in index order (the published ``argsort`` leaves that unspecified, which would make a
run's choice depend on the sort kernel).
"""

from __future__ import annotations

import math

import torch

from protext.tta.selection import confidence_order, select_confident


def hand_entropy(row: list[float]) -> float:
    """§5's per-view entropy of one row of logits, in plain Python floats."""
    top = max(row)
    weights = [math.exp(z - top) for z in row]
    total = sum(weights)
    return -sum((w / total) * math.log(w / total) for w in weights)


def tied_views(seed: int, n_views: int = 64, n_kinds: int = 3) -> torch.Tensor:
    """``n_views`` views, each a copy of one of ``n_kinds`` rows: many exact entropy ties, shuffled.

    Identical rows give bit-identical entropies, so the only thing that orders views inside a group
    is the tie rule; torch's default (unstable) CPU sort scrambles such groups.
    """
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randn(n_kinds, 5, generator=g) * 3
    return kinds[torch.randint(0, n_kinds, (n_views,), generator=g)]


def test_equal_entropies_are_kept_in_index_order():
    logits = tied_views(4)
    entropy = [hand_entropy(row) for row in logits.tolist()]
    want = sorted(range(len(entropy)), key=lambda v: (round(entropy[v], 9), v))
    assert confidence_order(logits).tolist() == want
    # half of the views: the cut falls inside a group of tied views, so the tie rule decides who is in
    assert select_confident(logits, 0.5).tolist() == want[:32]
