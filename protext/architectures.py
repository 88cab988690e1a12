"""The text tower of an open_clip architecture, read from its config JSON: no torch, no weights.

A training run asks for ``depth`` prompted blocks and ``n_ctx`` context tokens. Whether the model's
text tower has room for them is written in the architecture's config (``text_cfg.layers`` and
``text_cfg.context_length``), which open_clip ships beside its code and protext beside its own
(``protext/model_configs``, e.g. ``tiny-clip``). Reading that file lets ``train`` refuse a preset's
depth 9 on a two-block tower in its pre-flight, before torch is imported or any weights load, instead
of after minutes of loading. The loaded tower is checked again with the same rule
(:func:`check_prompt_fits`), for architectures whose config is not a file here.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError

PROTEXT_CONFIGS = Path(__file__).parent / "model_configs"
"""protext's own architectures (registered with open_clip by :func:`protext.models.register_model_configs`)."""

RESERVED_TOKENS = 3
"""Positions a prompt needs besides its context: start of text, end of text and one class-name token."""


class PromptFitError(UserError, ValueError):
    """The prompts asked for do not fit the model's text tower; the message names the flag and the fix."""


@dataclass(frozen=True)
class TowerShape:
    """What a prompt needs to know of a causal text tower.

    Attributes:
        model: the architecture name.
        blocks: residual attention blocks (the largest prompt depth).
        context_length: token positions of the text context (77 for OpenAI's CLIP).
    """

    model: str
    blocks: int
    context_length: int


def _config_dirs() -> list[Path]:
    """protext's configs first (as registered), then open_clip's, found without importing open_clip."""
    dirs = [PROTEXT_CONFIGS]
    spec = importlib.util.find_spec("open_clip")  # locates the package without running it (no torch)
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent / "model_configs")
    return dirs


def text_tower_shape(model: str) -> Optional[TowerShape]:
    """The text tower of architecture ``model`` as its config file describes it.

    None when no config file of that name is found (hub models, configs registered at run time) or
    when the config describes no layered causal tower (Hugging Face text encoders): the check then
    waits for the loaded model.
    """
    if not model or "/" in model or ":" in model:  # hub names are not files of a config folder
        return None
    for folder in _config_dirs():
        path = folder / f"{model}.json"
        if not path.is_file():
            continue
        try:
            text_cfg = json.loads(path.read_text(encoding="utf-8")).get("text_cfg") or {}
        except (OSError, ValueError, AttributeError):
            return None  # an unreadable config is open_clip's to report when the model is built
        if "hf_model_name" in text_cfg or not isinstance(text_cfg.get("layers"), int):
            return None
        return TowerShape(model, int(text_cfg["layers"]), int(text_cfg.get("context_length", 77)))
    return None


def check_prompt_fits(shape: TowerShape, n_ctx: int, depth: int, *, depth_given: bool = True) -> None:
    """Refuse prompts the tower cannot hold, in one line that names the flag and the value that fits.

    Args:
        shape: the tower, from its config (:func:`text_tower_shape`) or from the loaded model.
        n_ctx: context tokens asked for.
        depth: prompt depth asked for (blocks 1..depth-1 get deep prompts).
        depth_given: False when ``depth`` is the preset's, not the user's: the message then says
            so, for a user who never typed ``--depth`` and wonders where 9 came from.

    Raises:
        PromptFitError: ``depth`` exceeds the blocks, or ``n_ctx`` leaves no room for a class name.
    """
    if depth > shape.blocks:
        origin = "" if depth_given else f" ({depth} is the preset's depth)"
        raise PromptFitError(
            f"--depth {depth}: {shape.model}'s text tower has only {shape.blocks} blocks; pass --depth {shape.blocks} "
            f"or less{origin}."
        )
    room = shape.context_length - RESERVED_TOKENS
    if n_ctx > room:
        raise PromptFitError(
            f"--n-ctx {n_ctx}: {shape.model}'s text context holds {shape.context_length} tokens, and start, end and a "
            f"class name need {RESERVED_TOKENS}; pass --n-ctx {room} or less."
        )
