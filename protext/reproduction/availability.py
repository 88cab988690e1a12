"""Pre-flight: which of a table's datasets are under ``--root``, and whether ``--coop`` rows can run.

A missing dataset is not an error: it is listed with the fix and its cells are skipped. Only a root
that holds none of the table's datasets, or a ``--coop`` file that does not exist, stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..protocols import Protocol
from .config import ReproduceConfig, ReproduceError


@dataclass
class Availability:
    """Which of a table's datasets are under ``--root``; for the others, what to place where.

    ``found`` records, per present dataset, its layout and its test images against the published
    test set's size: a smaller copy gives numbers that are not the paper's, and the table says so.
    """

    present: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    found: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_datasets(protocol: Protocol, root: str) -> Availability:
    """Look for every dataset of the table (:func:`protext.datasets.dataset_status`); none is an error."""
    from ..datasets import dataset_status

    result = Availability()
    for name in protocol.datasets:
        status = dataset_status(name, root)
        if status.state != "found":
            result.missing[name] = f"{status.state}: {status.problem}; {status.fix}"  # every state but found has both
            continue
        result.present.append(name)
        result.classes[name] = dataset_classes(name, root)
        result.found[name] = {"layout": status.layout, "folder": str(status.folder), "test_images": status.images,
                              "published_test_images": status.published}
    if not result.present:
        first = next(iter(result.missing.values()))
        raise ReproduceError(
            f"--root {root} holds none of {protocol.name}'s {len(protocol.datasets)} datasets "
            f"({', '.join(protocol.datasets)}); for example {first}"
        )
    return result


def dataset_classes(name: str, root: str) -> list[str]:
    """The dataset's class names in label order (the class mask of ImageNet-A/-R applied)."""
    from ..datasets import build_dataset

    return list(build_dataset(name, root, split="all", partition="test").classnames)


def check_external(config: ReproduceConfig, protocol: Protocol) -> Optional[str]:
    """Why the rows that need ``--coop`` cannot run (None when they can or none needs it).

    Raises:
        ReproduceError: ``--coop`` names a file that does not exist.
    """
    if not any(row.external for row in protocol.rows):
        return None
    if not config.coop:
        return "needs CoOp's 16-shot ImageNet prompts (trained on images): pass --coop FILE"
    if not Path(config.coop).is_file():
        raise ReproduceError(f"--coop {config.coop}: no such file (CoOp's ImageNet prompt checkpoint, .pth).")
    return None
