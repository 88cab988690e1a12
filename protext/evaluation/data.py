"""Test images for the loop: the dataset, its DataLoader, and readable errors from worker processes."""

from __future__ import annotations

import inspect
import sys
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
