"""Test images for the loop: the dataset, its DataLoader, and readable errors from worker processes."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .config import EvalConfig, EvalError


def open_dataset(config: EvalConfig):
    """The test partition of ``config.dataset`` with the classes of ``config.split``."""
    from ..datasets import build_dataset

    params = inspect.signature(build_dataset).parameters
    try:
        if "partition" in params:  # the vocabulary of issue 8: split = class half, partition = images
            return build_dataset(config.dataset, config.root, split=config.split, partition="test", classes=config.classes)
        return build_dataset(config.dataset, config.root, split="test", subset=config.split, classnames_file=config.classes)
    except ValueError as err:
        from ..errors import UserError

        if isinstance(err, UserError) or type(err).__name__ == "DatasetError":
            raise
        raise EvalError(f"--dataset: {err}") from None


def input_identity(dataset) -> dict[str, Any]:
    """What a run's images and classes are, cheaply, for the resume log and the results.

    The listing fingerprint hashes, per image in dataset order, its path (relative to the dataset
    folder), label, size and modification time (nanoseconds), and the class names are hashed in
    label order. A replaced, removed, added, renamed or relabelled image, or a renamed class,
    changes it; reading no image content keeps it to one ``stat`` per file (ImageNet's 50,000
    images: well under a second), where hashing the pixels would read gigabytes. What it misses
    is a file rewritten in place with the same size and a restored modification time, which takes
    intent. The folder itself is recorded absolute, so the same ``--root`` text run from another
    working folder is another input.
    """
    folder = Path(dataset.root).expanduser().resolve()
    listing = hashlib.sha256()
    stats: dict[str, tuple[int, int]] = {}  # CIFAR: every image names its batch file; stat it once
    for path, label in dataset.samples:
        key = str(path)
        if key not in stats:
            try:
                st = os.stat(path)
                stats[key] = (st.st_size, st.st_mtime_ns)
            except OSError:
                stats[key] = (-1, -1)  # gone: the reader will say so; the listing differs either way
        try:  # relative to the folder as given (string work, no system call per image)
            shown = os.path.relpath(path, dataset.root)
        except ValueError:  # another drive (Windows)
            shown = key
        listing.update(json.dumps([shown, int(label), *stats[key]]).encode() + b"\n")
    names = json.dumps(list(dataset.classnames)).encode()
    return {
        "folder": str(folder),
        "images": len(dataset.samples),
        "listing_sha256": listing.hexdigest(),
        "classes": len(dataset.classnames),
        "classes_sha256": hashlib.sha256(names).hexdigest(),
    }


def data_errors() -> tuple[type[BaseException], ...]:
    """What reading one image may raise that is the data's fault, not a bug."""
    from ..datasets import DatasetError

    return (DatasetError, OSError)


class Indexed(Dataset):
    """Images of ``indices`` with their label and dataset index, each through ``make(image, index)``.

    A bad image does not raise here: inside a DataLoader worker the exception would come back
    wrapped in the worker's traceback. Its message travels as data instead and the main process
    raises it cleanly (see :func:`collate`).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], make: Callable[[Any, int], torch.Tensor]) -> None:
        self.base, self.indices, self.make = base, list(indices), make

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label = self.base[index]
            return self.make(image, index), label, index, ""
        except data_errors() as err:
            return None, -1, index, str(err)


class Preprocess:
    """The model's eval transform (picklable for worker processes)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image, index: int) -> torch.Tensor:
        return self.transform(image)


class SeededViews:
    """TTA views of one image from that image's own random stream (seed, dataset index), so views
    depend neither on the processing order nor on the sharding."""

    def __init__(self, views: Callable, seed: int) -> None:
        self.views, self.seed = views, seed

    def __call__(self, image, index: int) -> torch.Tensor:
        from .adapters import image_generator

        return self.views(image, generator=image_generator(self.seed, index))


def collate(items):
    """Stack a batch, or pass on the first unreadable image's message."""
    for _, _, _, error in items:
        if error:
            return error
    tensors, labels, indices, _ = zip(*items)
    return torch.stack(tensors), list(labels), list(indices)


def batches(dataset: Dataset, indices: Sequence[int], make: Callable, batch_size: int, workers: int) -> Iterator:
    """``(images, labels, indices)`` batches in ``indices`` order; an unreadable image is a DatasetError."""
    from ..datasets import DatasetError

    data = Indexed(dataset, indices, make)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=collate)
    for batch in loader:
        if isinstance(batch, str):
            raise DatasetError(batch)
        yield batch


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
