"""protext: learn CLIP prompts from text alone (ProText) and carry them into test-time prompt tuning.

Pipeline: descriptions -> targets -> prompts -> training -> checkpoint -> evaluation and test-time
adaptation -> reproduce.

The public names below are imported lazily, so that text-only stages (``gen_descriptions``) start
without paying for torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LoadedClip": "models",
    "PretrainedUnavailableError": "models",
    "load_clip": "models",
    "text_fingerprint": "models",
    "PromptedTextEncoder": "prompts",
    "PromptShapeError": "prompts",
    "UnsupportedTextTowerError": "text_tower",
    "encode_tokens": "text_tower",
    "PromptCheckpoint": "checkpoint",
    "load_prompts": "checkpoint",
    "save_prompts": "checkpoint",
    "class_encoder": "checkpoint",
    "check_weights": "checkpoint",
    "read_classes": "classlists",
    "read_descriptions": "descriptions",
    "TrainJob": "training",
    "run_training": "training",
    "EvalConfig": "evaluation",
    "evaluate": "evaluation",
    "UserError": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'protext' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
