"""CIFAR-10 and CIFAR-100 from torchvision's folders (``cifar-10-batches-py``, ``cifar-100-python``).

Hand-written rather than ``torchvision.datasets.CIFAR10``: torchvision refuses any batch whose MD5
differs from the release (so no test could give it a generated tree) and unpickles with no
restriction; here the batches go through an unpickler that builds only lists, strings, numbers
and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import DatasetError

# The only globals a CIFAR batch needs: numpy's array reconstruction (pickled by numpy 1.x under
# numpy.core, which numpy 2 moved to numpy._core), and _codecs.encode, which protocol-2 pickles
# written by Python 3 use to rebuild bytes (a pure text-to-bytes conversion).
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only data")
        if module == "numpy.core.multiarray" and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core.multiarray"
        return getattr(importlib.import_module(module), name)


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            # latin1: the released batches were pickled by Python 2 (as torchvision reads them)
            obj = _DataOnlyUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(f"{path} not found") from None
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError, AttributeError, IndexError) as err:
        raise DatasetError(f"cannot read CIFAR batch {path}: {err}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"cannot read CIFAR batch {path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _batch_files(name: str, folder: Path, partition: str) -> list[Path]:
    if partition == "val":
        raise DatasetError(f"{name} has no 'val' partition (it has train and test)")
    if name == "cifar100":
        return [folder / partition]
    if partition == "test":
        return [folder / "test_batch"]
    found = sorted(folder.glob("data_batch_*"))
    if not found:
        raise DatasetError(f"no data_batch_* files in {folder}")
    return found


def read_cifar(name: str, folder: Path, partition: str) -> tuple[list[str], list[tuple[Path, int]], np.ndarray]:
    """(class names, samples, pixels[N, 32, 32, 3]) of a CIFAR partition; samples name their batch file."""
    meta_path = folder / ("batches.meta" if name == "cifar10" else "meta")
    names_key, labels_key = ("label_names", "labels") if name == "cifar10" else ("fine_label_names", "fine_labels")
    meta = _load(meta_path)
    if not isinstance(meta.get(names_key), list) or not meta[names_key]:
        raise DatasetError(f"{meta_path} has no {names_key!r} list")
    classnames = [_text(n) for n in meta[names_key]]
    samples: list[tuple[Path, int]] = []
    arrays = []
    for path in _batch_files(name, folder, partition):
        batch = _load(path)
        data, labels = batch.get("data"), batch.get(labels_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: 'data' is not a uint8 array of rows of 3072 bytes (32x32 RGB)")
        if not isinstance(labels, list) or len(labels) != len(data):
            raise DatasetError(f"{path}: {labels_key!r} does not give one label per image")
        bad = next((y for y in labels if not isinstance(y, int) or not 0 <= y < len(classnames)), None)
        if bad is not None:
            raise DatasetError(f"{path}: label {bad!r} is not in 0..{len(classnames) - 1}")
        # rows are 1024 red, 1024 green, 1024 blue bytes of a 32x32 image
        arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        samples.extend((path, int(y)) for y in labels)
    pixels = np.ascontiguousarray(np.concatenate(arrays)) if arrays else np.zeros((0, 32, 32, 3), np.uint8)
    return classnames, samples, pixels
