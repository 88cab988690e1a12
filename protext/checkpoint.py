"""Learned prompts on disk, and the one way from them to class features.

Safetensors (no pickle) with JSON metadata, and CoOp's ``.pth`` format. :func:`class_encoder` turns a
checkpoint (or TPT's hand-crafted init) and a full dataset template into a prompted encoder: training's
examples, evaluation, TPT and the Python API all go through it. :func:`check_weights` refuses prompts
used on text-tower weights they were not trained on. Loaded tensors are checked finite.

A protext checkpoint holds ``ctx`` (n_ctx × width) and, for depth > 1, ``deep_prompts``
((depth−1) × n_ctx × width), plus metadata describing how they were learned. Writes are atomic
(temporary file, then rename), so an interrupted save never destroys the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_write
from .errors import UserError
from .prompts import DEFAULT_CTX_INIT, PromptedTextEncoder, PromptShapeError
from .text_tower import text_tower

FORMAT = "protext-prompts/1"
HANDCRAFTED_N_CTX = 4
"""TPT's hand-crafted prompt: the 4 token embeddings of ``a photo of a``, depth 1."""
ALLOW_OTHER_WEIGHTS_FLAG = "--allow-other-weights"
"""The flag a command offers to use prompts on weights they were not trained on."""


class CheckpointError(UserError, ValueError):
    """A prompt checkpoint is missing, unreadable, non-finite, or not a protext/CoOp prompt file."""


class OtherWeightsError(UserError):
    """Prompts were trained on other text-tower weights than the model they are used with."""


@dataclass
class PromptCheckpoint:
    """Learned prompt vectors and what is known about how they were made.

    ``meta`` holds at least ``n_ctx``, ``depth``, ``width``, ``ctx_init`` (or None) and ``template``;
    protext training adds the model, pretrained weights, class names, preset, hyper-parameters,
    description-file hash, final loss and protext version.
    """

    ctx: torch.Tensor
    deep_prompts: Optional[torch.Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def width(self) -> int:
        return int(self.ctx.shape[1])

    @property
    def depth(self) -> int:
        return 1 if self.deep_prompts is None else int(self.deep_prompts.shape[0]) + 1

    @property
    def ctx_init(self) -> Optional[str]:
        return self.meta.get("ctx_init")

    @property
    def context_replaces(self) -> str:
        """The phrase of a template that the learned context stands in for.

        Checkpoints record it (``context_replaces``). Older ones and CoOp files do not; for them it
        is inferred as evaluation always did: the ``ctx_init`` phrase when the context started from
        one, else ``a photo of a`` (the published rule: the context replaces that phrase of every
        dataset template, PRESETS.md).
        """
        recorded = self.meta.get("context_replaces")
        if recorded is not None:
            return str(recorded)
        return self.ctx_init or DEFAULT_CTX_INIT

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors as :meth:`PromptedTextEncoder.load_prompt_state` takes them."""
        state = {"ctx": self.ctx}
        if self.deep_prompts is not None:
            state["deep_prompts"] = self.deep_prompts
        return state

    def build_encoder(self, model, tokenizer, classnames, template: Optional[str] = None) -> PromptedTextEncoder:
        """A :class:`PromptedTextEncoder` for ``classnames`` carrying these prompts.

        The same as :func:`class_encoder` (``template`` None: the one trained with).
        """
        return class_encoder(model, tokenizer, classnames, template, self)


def class_encoder(
    model,
    tokenizer,
    classnames: Sequence[str],
    template: Optional[str],
    checkpoint: Optional[PromptCheckpoint] = None,
) -> PromptedTextEncoder:
    """THE way from prompts to a class encoder: a checkpoint (or TPT's hand-crafted init) + a template.

    Args:
        model, tokenizer: the frozen CLIP model and its tokenizer.
        classnames: the classes, in label order.
        template: a full template such as ``"a photo of a {}, a type of pet."``; its leading phrase
            that the context replaced (:attr:`PromptCheckpoint.context_replaces`, ``a photo of a``
            for every published checkpoint) is dropped, giving ``X … X beagle, a type of pet.``.
            None: the checkpoint's own training template (``{}.``).
        checkpoint: learned prompts; None builds the hand-crafted prompt TPT starts from: the token
            embeddings of ``a photo of a`` as a 4-vector context, depth 1.

    Raises:
        PromptShapeError: the prompts do not fit the model (the message names the checkpoint file).
    """
    if checkpoint is None:
        return PromptedTextEncoder(
            model, tokenizer, classnames, n_ctx=HANDCRAFTED_N_CTX, depth=1, ctx_init=DEFAULT_CTX_INIT,
            template=template or "{}.",
        )
    where = f"{checkpoint.path}: " if checkpoint.path else ""
    blocks = text_tower(model).depth
    if checkpoint.depth > blocks:
        raise PromptShapeError(
            f"{where}prompts of depth {checkpoint.depth} need a text tower of at least {checkpoint.depth} blocks; "
            f"this model's has {blocks} (prompts were learned for another CLIP architecture)."
        )
    encoder = PromptedTextEncoder(
        model, tokenizer, classnames, n_ctx=checkpoint.n_ctx, depth=checkpoint.depth, ctx_init=checkpoint.ctx_init,
        template=template or checkpoint.meta.get("template") or "{}.", replaces=checkpoint.context_replaces,
    )
    try:
        encoder.load_prompt_state(checkpoint.state())
    except PromptShapeError as err:
        raise PromptShapeError(f"{where}{err}") from None
    return encoder


class WeightsCheck(NamedTuple):
    """The text-tower fingerprints compared by :func:`check_weights` (record both in results)."""

    checkpoint: Optional[str]
    model: str

    @property
    def matches(self) -> Optional[bool]:
        """True/False, or None when the checkpoint recorded no fingerprint (CoOp files)."""
        return None if self.checkpoint is None else self.checkpoint == self.model


def check_weights(checkpoint: PromptCheckpoint, clip, path: str | os.PathLike | None = None, allow_other: bool = False) -> WeightsCheck:
    """Refuse prompts trained on other text-tower weights than ``clip``'s.

    ``clip`` is a :class:`protext.models.LoadedClip` or the model itself. With ``allow_other`` a
    mismatch is a loud warning instead of an error. Checkpoints without a fingerprint (CoOp/TPT
    ``.pth``) cannot be checked: they pass, and the result's ``checkpoint`` is None.

    Raises:
        OtherWeightsError: the fingerprints differ; names the checkpoint file and the way out.
    """
    from .models import text_fingerprint  # here: models imports open_clip, needed only for the check

    model = getattr(clip, "model", clip)
    stored = checkpoint.meta.get("text_tower_fingerprint")
    result = WeightsCheck(str(stored) if stored else None, text_fingerprint(model))
    if result.matches is False:
        where = path or checkpoint.path or "the checkpoint"
        trained = f"{checkpoint.meta.get('model', '?')}/{checkpoint.meta.get('pretrained', '?')}"
        message = (
            f"{where}: prompts were trained on other text-tower weights ({trained}, fingerprint {result.checkpoint}) "
            f"than this model's (fingerprint {result.model})"
        )
        if not allow_other:
            raise OtherWeightsError(
                f"{message}; features would be meaningless. Pass the weights they were trained on, "
                f"or {ALLOW_OTHER_WEIGHTS_FLAG} to use them anyway."
            )
        warnings.warn(f"{message}; used anyway because of {ALLOW_OTHER_WEIGHTS_FLAG}.", stacklevel=2)
    return result


def _check_finite(path: Path, tensors: Mapping[str, Optional[torch.Tensor]]) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: tensor '{name}' holds {bad} non-finite values (NaN or inf); the file is corrupted. "
                "Restore it or train again."
            )


def save_prompts(path: str | os.PathLike, encoder: PromptedTextEncoder, meta: Mapping[str, Any] | None = None) -> None:
    """Write the encoder's prompts and metadata to ``path`` (safetensors), atomically."""
    full = {
        "format": FORMAT,
        "n_ctx": encoder.n_ctx,
        "depth": encoder.depth,
        "width": encoder.width,
        "ctx_init": encoder.ctx_init,
        "context_replaces": encoder.replaces,
        "template": encoder.template,
        **(meta or {}),
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.prompt_state().items()}
    header = {k: json.dumps(v) for k, v in full.items()}
    payload = canonical_safetensors(tensors, header)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """fp32 tensors and string metadata as safetensors bytes, the same bytes for the same content.

    The safetensors library writes its metadata in hash-map order, which differs between processes;
    here keys are sorted, so a resumed run's checkpoint is byte-identical to an uninterrupted run's.
    The file is ordinary safetensors (any reader opens it).
    """
    entries: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype != torch.float32:
            raise ValueError(f"canonical_safetensors writes fp32 only; '{name}' is {tensor.dtype}")
        blob = tensor.contiguous().numpy().astype("<f4", copy=False).tobytes()
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps(entries, separators=(",", ":"), sort_keys=False).encode("utf-8")
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as the library pads it
    return len(header).to_bytes(8, "little") + header + b"".join(blobs)


def load_prompts(path: str | os.PathLike) -> PromptCheckpoint:
    """Read a protext checkpoint (``.safetensors``); CoOp/TPT ``.pth`` files go to :func:`load_coop`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such prompt checkpoint.")
    if path.suffix in (".pth", ".pt", ".tar"):
        return load_coop(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors prompt checkpoint ({err}).") from None
    if "ctx" not in tensors:
        raise CheckpointError(f"{path}: has no 'ctx' tensor; tensors found: {sorted(tensors)}.")
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    _check_finite(path, {"ctx": tensors["ctx"], "deep_prompts": tensors.get("deep_prompts")})
    return PromptCheckpoint(tensors["ctx"], tensors.get("deep_prompts"), meta, path)


def export_coop(checkpoint: PromptCheckpoint, path: str | os.PathLike) -> None:
    """Write ``{'state_dict': {'ctx': tensor}}``, which the official CoOp/TPT code ``--load``s.

    Only the shallow context survives: CoOp and TPT have no deep prompts.
    """
    payload = {"state_dict": {"ctx": checkpoint.ctx.detach().float().cpu().clone()}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_coop(path: str | os.PathLike) -> PromptCheckpoint:
    """Read a CoOp/TPT ``.pth`` (``{'state_dict': {'ctx': ...}}``) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such CoOp checkpoint.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors differ by torch version
        raise CheckpointError(f"{path}: not a loadable CoOp checkpoint ({type(err).__name__}: {err}).") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    ctx = state.get("ctx") if isinstance(state, dict) else None
    if not isinstance(ctx, torch.Tensor):
        raise CheckpointError(f"{path}: expected {{'state_dict': {{'ctx': tensor}}}} (CoOp format); no 'ctx' tensor found.")
    if ctx.ndim == 3:  # class-specific contexts (CSC) are not a shared prompt
        raise CheckpointError(f"{path}: holds class-specific contexts {tuple(ctx.shape)}; protext needs a shared context.")
    _check_finite(path, {"ctx": ctx})
    meta = {"format": "coop", "n_ctx": int(ctx.shape[0]), "depth": 1, "width": int(ctx.shape[1]), "ctx_init": None}
    return PromptCheckpoint(ctx.float(), None, meta, path)
