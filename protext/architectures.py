"""The text tower of an open_clip architecture, read from its config JSON: no torch, no weights.

A training run asks for ``depth`` prompted blocks and ``n_ctx`` context tokens. Whether the model's
text tower has room for them is written in the architecture's config (``text_cfg.layers`` and
``text_cfg.context_length``), which open_clip ships beside its code and protext beside its own
(``protext/model_configs``, e.g. ``tiny-clip``). Reading that file lets ``train`` decide in its
pre-flight, before torch is imported or any weights load, instead of after minutes of loading.

One rule, :func:`fit_prompts`, for ``train``, ``reproduce``, the quickstart and the library's
``TrainJob``: a depth the user gave (``--depth``, ``depth=``) above the tower's blocks is refused
in one line naming ``--depth``; a preset's depth (9) above them becomes the tower's depth, said in
one line (:func:`depth_note`) that the run prints and records. The loaded tower is fitted again by
the same rule, for architectures whose config is not a file here.
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


def depth_note(shape: TowerShape, depth: int) -> str:
    """The one line a run prints (and records) when the preset's ``depth`` is above ``shape``'s blocks."""
    return f"depth: the preset's {depth} is above {shape.model}'s {shape.blocks} text blocks; using {shape.blocks}"


def fit_prompts(shape: TowerShape, n_ctx: int, depth: int, *, depth_given: bool) -> tuple[int, Optional[str]]:
    """The prompt depth a run uses on ``shape``, and the line that says so when it is not ``depth``.

    The rule, the same for every command and for the library:

    - ``depth`` within the tower's blocks: used as it is, no line.
    - ``depth`` from the preset (``depth_given`` False) above the blocks: the tower's block count,
      with :func:`depth_note`'s line: a preset describes ViT-B/16 (12 blocks, depth 9), and on a
      shallower tower the deepest prompts it can hold are the closest run to it.
    - ``depth`` the user gave above the blocks: refused, naming ``--depth`` and the value that fits.

    Args:
        shape: the tower, from its config (:func:`text_tower_shape`) or from the loaded model.
        n_ctx: context tokens asked for.
        depth: prompt depth asked for (blocks 1..depth-1 get deep prompts).
        depth_given: True when the user set ``depth`` (``--depth``, ``TrainJob(depth=...)``), False
            when it is the preset's.

    Returns:
        ``(depth to use, the line to print or None)``.

    Raises:
        PromptFitError: a given ``depth`` exceeds the blocks, or ``n_ctx`` leaves no room for a class name.
    """
    note = None
    if depth > shape.blocks:
        if depth_given:
            raise PromptFitError(
                f"--depth {depth}: {shape.model}'s text tower has only {shape.blocks} blocks; pass --depth "
                f"{shape.blocks} or less."
            )
        depth, note = shape.blocks, depth_note(shape, depth)
    room = shape.context_length - RESERVED_TOKENS
    if n_ctx > room:
        raise PromptFitError(
            f"--n-ctx {n_ctx}: {shape.model}'s text context holds {shape.context_length} tokens, and start, end and a "
            f"class name need {RESERVED_TOKENS}; pass --n-ctx {room} or less."
        )
    return depth, note


def check_prompt_fits(shape: TowerShape, n_ctx: int, depth: int) -> None:
    """Refuse prompts the tower cannot hold as asked: :func:`fit_prompts` with ``depth`` the user's.

    Raises:
        PromptFitError: ``depth`` exceeds the blocks, or ``n_ctx`` leaves no room for a class name.
    """
    fit_prompts(shape, n_ctx, depth, depth_given=True)
