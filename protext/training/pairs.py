"""Training samples: every (class, description) pair is one sample (ALGORITHMS.md §3).

A description the source holds twice for a class is two samples, as in the published loader.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass
class TextPairs:
    """Training samples: every (class, description) pair.

    Attributes:
        classnames: the classes, in the order of the prompt encoder's class list.
        class_index: ``(n,)`` class of each sample (index into ``classnames``).
        texts: ``n`` descriptions.
    """

    classnames: list[str]
    class_index: torch.Tensor
    texts: list[str]

    @classmethod
    def from_descriptions(cls, descriptions: Mapping[str, Sequence[str]]) -> "TextPairs":
        """One sample per description, classes in mapping order; classes without any are left out."""
        classnames = [c for c, texts in descriptions.items() if len(texts)]
        index, texts = [], []
        for i, name in enumerate(classnames):
            index += [i] * len(descriptions[name])
            texts += list(descriptions[name])
        if not texts:
            raise ValueError("no descriptions to train on.")
        return cls(classnames, torch.tensor(index), texts)  # a non-empty list of ints: int64 already

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        """A hash of the samples (classes, their order, every text), for resume checks."""
        payload = json.dumps([self.classnames, self.class_index.tolist(), self.texts], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()
