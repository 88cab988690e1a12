"""The published constants and rules that a method's declaration (``tta/methods/NAME.py``, torch-free)
and its algorithm (``tta/NAME.py``) both read.

They live here, below both, so that an algorithm never imports its declaration: the declaration
builds the algorithm (lazily, in its ``build``), and an arrow back would close a loop.
"""

from __future__ import annotations

TDA_POSITIVE: dict[str, tuple[float, float]] = {
    "imagenet": (2.0, 5.0),
    "imagenet_a": (2.0, 5.0),
    "imagenet_v2": (1.0, 8.0),
    "imagenet_r": (1.0, 8.0),
    "imagenet_sketch": (2.363, 7.45),
    "caltech101": (5.0, 5.0),
    "dtd": (2.0, 3.0),
    "eurosat": (4.0, 8.0),
    "fgvc_aircraft": (2.0, 2.0),
    "food101": (1.0, 1.0),
    "oxford_flowers": (1.0, 5.0),
    "oxford_pets": (2.0, 7.0),
    "stanford_cars": (1.0, 7.0),
    "sun397": (2.0, 3.0),
    "ucf101": (3.0, 8.0),
}
"""TDA's published positive-cache (α⁺, β⁺) per dataset (TTA.md §3.6); BoostAdapter's are the same."""
TDA_NEGATIVE: tuple[float, float] = (0.117, 1.0)
"""TDA's negative-cache (α⁻, β⁻), the same everywhere."""

NEIGHBOURS = 0.3
"""MTA's bandwidth averages the distances to the nearest 30 % of the other views."""


def neighbour_count(n_views: int, share: float = NEIGHBOURS) -> int:
    """``⌊share · (n - 1)⌋``: how many nearest other views set a view's bandwidth."""
    return int(share * (n_views - 1))


def fewest_views_with_a_neighbour(share: float = NEIGHBOURS) -> int:
    n = 2
    while neighbour_count(n, share) < 1:
        n += 1
    return n
