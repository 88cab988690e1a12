"""The dataset objects :func:`protext.datasets.build_dataset` returns: (image, label) items with class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.utils.data
from PIL import Image

from .catalog import DatasetError

# What PIL raises for an image it cannot give: unreadable or truncated files (OSError, incl.
# UnidentifiedImageError), malformed headers (ValueError, SyntaxError, EOFError) and images whose
# header claims more than twice Image.MAX_IMAGE_PIXELS (DecompressionBombError, not an OSError).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image(path: Path) -> Image.Image:
    """Open ``path`` as an RGB PIL image; anything unreadable is a :class:`DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DatasetError(
            f"image {path} is too large to decode safely ({err}); remove it from the dataset or "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except _IMAGE_ERRORS as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A list of (image path, label) with class names; items are (image, label).

    The image is an RGB PIL image, passed through ``transform`` when one is set. ``partition`` is
    the image part (train/val/test), ``split`` the class half (all/base/novel) whose labels were
    renumbered ``0..k-1``, ``layout`` the folder convention it was found in.
    """

    name: str
    root: Path
    samples: list[tuple[Path, int]]
    classnames: list[str]
    transform: Callable | None = field(default=None, repr=False)
    partition: str = "test"
    split: str = "all"
    layout: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.load(i)
        return (self.transform(image) if self.transform is not None else image), self.samples[i][1]

    def load(self, i: int) -> Image.Image:
        """The ``i``-th image, untransformed."""
        return load_image(self.samples[i][0])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, partition={self.partition!r}, "
            f"split={self.split!r}, images={len(self.samples)}, classes={len(self.classnames)})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def keep_labels(self, keep: range) -> None:
        """Keep only the labels in ``keep`` (contiguous), renumbered from 0, in place."""
        kept = [i for i, (_, y) in enumerate(self.samples) if y in keep]
        self.samples = [(self.samples[i][0], self.samples[i][1] - keep.start) for i in kept]
        self.classnames = self.classnames[keep.start : keep.stop]
        self._keep_rows(kept)

    def _keep_rows(self, kept: list[int]) -> None:
        """Hook for datasets that hold more per-sample state than ``samples``."""


@dataclass
class ArrayImageDataset(ImageDataset):
    """Images held in memory as uint8 ``pixels[N, H, W, 3]`` (CIFAR's batches).

    ``samples`` name the batch file each image came from, so messages and logs can point at it.
    """

    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8), repr=False)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i])  # (H, W, 3) uint8 is RGB

    def _keep_rows(self, kept: list[int]) -> None:
        self.pixels = self.pixels[kept]
