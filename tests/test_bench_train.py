"""``benchmarks/bench_train.py`` times the samples training trains on: repeats kept, as reproduce reads them."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dtd_is_read_as_training_reads_it(shared_dir: Path) -> None:
    """2,820 DTD samples and 11 steps of 256 (2,745 and 10 would mean the repeats were dropped)."""
    from protext.descriptions.cupl import release_descriptions
    from protext.training import TextPairs

    sys.path.insert(0, str(BENCHMARKS))  # bench_train imports its sibling _common
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCHMARKS))
    pairs = bench_train.load_pairs("dtd", shared_dir / "cupl")
    assert len(pairs) == 2820 and len(pairs) // 256 == 11 and len(pairs.classnames) == 47
    trained = TextPairs.from_descriptions(release_descriptions(shared_dir / "cupl", "dtd"))
    assert pairs.texts == trained.texts and pairs.classnames == trained.classnames
