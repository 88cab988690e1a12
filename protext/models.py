"""Building a frozen CLIP model: open_clip names and tags, local weight files, or random weights.

``load_clip`` is the one entry point. It knows three kinds of ``pretrained``:

* an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...): downloaded by open_clip; offline this
  fails with one :class:`PretrainedUnavailableError` that names ``--pretrained PATH`` as the way out;
* a local file: an OpenAI TorchScript ``.pt`` archive (or an OpenAI-format state dict), read through
  open_clip's OpenAI loader, or an open_clip ``.bin``/``.pt``/``.safetensors`` state dict;
* ``random``: random initialisation from a fixed seed, for tests and benchmarks only.

OpenAI's weights were trained with QuickGELU. open_clip only warns when they are loaded into a GELU
config, and every feature changes by about 1 %; here the QuickGELU variant is always built for them
when the file shows it holds OpenAI's weights (an archive, or a state dict with OpenAI's scalar keys).
A plain state dict cannot show it: loaded into a GELU config, a warning names the ``-quickgelu``
model to use if the weights are OpenAI's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

import open_clip
from open_clip.model import build_model_from_openai_state_dict, convert_weights_to_lp, get_cast_dtype
import torch
import torch.nn as nn

from .errors import UserError
from .text_tower import text_tower

log = logging.getLogger(__name__)

TINY_CLIP = "tiny-clip"
"""A two-layer, 64-wide CLIP registered with open_clip, with the real tokenizer: tests run in seconds."""

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
_registered = False


class PretrainedUnavailableError(UserError, RuntimeError):
    """Named pretrained weights could not be fetched (typically: no internet on this machine)."""


class ModelNameError(UserError, ValueError):
    """An unknown open_clip architecture or pretrained tag."""


class WeightsFileError(UserError, ValueError):
    """A ``--pretrained`` file that protext cannot load safely (a pickled object, not weights, or other shapes)."""


class WeightsFileMissing(UserError, FileNotFoundError):
    """``--pretrained`` names a file that does not exist."""


_warned_gelu: set[tuple[str, str]] = set()


@dataclass
class LoadedClip:
    """A frozen open_clip model with what is needed to feed it.

    Attributes:
        model: the open_clip ``CLIP``/``CustomTextCLIP``, in eval mode, every parameter frozen.
        preprocess: the evaluation image transform (PIL image -> normalised tensor).
        tokenizer: ``list[str] -> LongTensor (n, context_length)``; truncates at the context length.
        name: the open_clip architecture name actually built (``-quickgelu`` resolved).
        pretrained: what the weights came from: a tag, a file path, or ``random``.
    """

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    pretrained: str

    @property
    def identity(self) -> str:
        """A short human-readable description of the weights, for metadata and logs."""
        return f"{self.name}/{self.pretrained}"


def register_model_configs() -> None:
    """Register protext's own architecture configs (``tiny-clip``) with open_clip, once."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (OpenAI's released ``.pt`` files), which ``torch.load`` refuses."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_openai_state_dict(path: str | os.PathLike) -> bool:
    """An OpenAI-format state dict carries the scalar keys the OpenAI loader strips."""
    if str(path).endswith(".safetensors"):
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain tensor dict: let open_clip's loader report it
        return False
    return isinstance(state, dict) and any(k in state for k in _OPENAI_ONLY_KEYS)


def _quickgelu_name(model: str) -> str:
    return model if model.endswith("-quickgelu") else f"{model}-quickgelu"


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _from_openai_file(path: str, device, precision: str) -> tuple[nn.Module, Callable]:
    """OpenAI archive or OpenAI-format state dict, built by open_clip's OpenAI builder (QuickGELU).

    The archive is opened with ``torch.jit.load`` (as open_clip's OpenAI loader does: ``torch.load``
    with ``weights_only=True`` refuses TorchScript); plain state dicts only ever with
    ``weights_only=True``. The architecture is inferred from the tensor shapes.
    """
    if is_torchscript_archive(path):
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if k not in _OPENAI_ONLY_KEYS and k != "attn_mask"}
    model = build_model_from_openai_state_dict(state, cast_dtype=get_cast_dtype(precision))
    model = model.to(device)
    if precision != "fp16":  # the builder leaves weights in fp16, as OpenAI shipped them
        model.float()
        if precision == "bf16":
            convert_weights_to_lp(model, dtype=torch.bfloat16)
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    return model, preprocess


def _warn_gelu_once(model: str, path: str) -> None:
    """A plain state dict in a GELU config may be OpenAI's (QuickGELU) weights: say so once."""
    cfg = open_clip.get_model_config(model) or {}
    if model.endswith("-quickgelu") or cfg.get("quick_gelu", False) or (model, path) in _warned_gelu:
        return
    _warned_gelu.add((model, path))
    warnings.warn(
        f"--pretrained {path}: the file does not show whether these are OpenAI's weights (trained with QuickGELU) or "
        f"weights trained with GELU; {model} was built with GELU. If they are OpenAI's weights, pass --model "
        f"{_quickgelu_name(model)}, or every feature is off by about 1 %.",
        stacklevel=3,
    )


def _from_local_file(model: str, path: str, tokenizer: Callable, device, precision: str) -> LoadedClip:
    """An OpenAI file (archive or state dict with OpenAI's keys) or an open_clip state dict."""
    try:
        if is_torchscript_archive(path) or _is_openai_state_dict(path):
            net, preprocess = _from_openai_file(path, device, precision)
            return LoadedClip(_freeze(net), preprocess, tokenizer, _quickgelu_name(model), path)
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=path, precision=precision, device=device, weights_only=True
        )
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, KeyError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise WeightsFileError(
            f"--pretrained {path}: not a weights file protext can load for --model {model} ({type(err).__name__}: "
            f"{reason}). Pass an OpenAI .pt archive or a state dict of tensors (.bin/.pt/.safetensors) saved with "
            "torch.save(model.state_dict()); pickled model objects are refused (weights_only)."
        ) from None
    _warn_gelu_once(model, path)
    return LoadedClip(_freeze(net), preprocess, tokenizer, model, path)


def _tag_config(model: str, tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ModelNameError(
            f"--pretrained '{tag}': neither an existing file nor a known open_clip tag for {model}. "
            f"Known tags: {', '.join(tags) if tags else 'none'}; or pass a weights file path, or 'random'."
        )
    return cfg


def _host_resolves(cfg: dict) -> bool:
    """Whether the weights' host has a DNS answer; offline machines fail this at once."""
    if cfg.get("hf_hub"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.get("url", "")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except (OSError, UnicodeError):
        return False


class _DropPackageRecords(logging.Filter):
    """Drops the records logged from one package's files at or below ``level``; lets every other through."""

    def __init__(self, package_dir: str, level: int) -> None:
        super().__init__()
        self.package_dir = package_dir
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= self.level and record.pathname.startswith(self.package_dir))


@contextmanager
def _open_clip_quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Silence open_clip's own log lines up to ``level`` inside the block, and nothing else.

    open_clip logs through the root logger (``logging.warning``), so ``logging.disable`` would be the
    blunt tool; but it is process-wide (every thread, every library) and cannot be put back to what the
    caller had. A filter on the root logger that matches open_clip's files only is removed on exit,
    error or not, and leaves the caller's ``logging.disable`` level and other records alone.
    """
    quiet = _DropPackageRecords(os.path.dirname(open_clip.__file__), level)
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """Set logger ``name``'s own level for the block, restoring the level it had (error or not)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the block, its previous mode restored on exit (error or not).

    The hub reads ``constants.HF_HUB_OFFLINE`` on every call, so cached weights still load and the rest
    fails at once instead of a minute of retries. The ``HF_HUB_OFFLINE`` environment variable is never
    written: it is read once at import and is the user's, not ours.
    """
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _download(cfg: dict, cache_dir: Optional[str]) -> str:
    """Fetch (or find in the cache) a tag's weights without a minute of hub retries when offline.

    Every change to shared state (the hub logger's level, the hub's offline mode) is scoped to the
    call and undone on the way out, failure included.
    """
    with _logger_level("huggingface_hub", logging.ERROR):
        if _host_resolves(cfg):
            return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        with _hub_offline():
            return open_clip.download_pretrained(cfg, cache_dir=cache_dir)


def load_clip(
    model: str = "ViT-B-16",
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
    seed: int = 0,
) -> LoadedClip:
    """Build a frozen open_clip model with its eval preprocessing and tokenizer.

    Args:
        model: open_clip architecture name (``ViT-B-16``, ``ViT-L-14``, ``tiny-clip``, ...).
        pretrained: an open_clip tag, a path to a weights file, or ``random``.
        device: where the model lives.
        precision: open_clip precision (``fp32``, ``fp16``, ``bf16``, ``amp``, ...).
        cache_dir: where open_clip caches downloads.
        seed: seed of the random initialisation, so every process builds the same random model.

    Raises:
        PretrainedUnavailableError: a named tag could not be downloaded (offline).
        FileNotFoundError: ``pretrained`` looks like a path but no such file exists.
        ValueError: unknown model name or tag.
    """
    register_model_configs()
    if model not in open_clip.list_models():
        raise ModelNameError(f"--model '{model}' is not an open_clip architecture; e.g. ViT-B-16, ViT-L-14, {TINY_CLIP}.")
    tokenizer = open_clip.get_tokenizer(model)

    if pretrained == "random":
        return _random_model(model, tokenizer, device, precision, seed)

    looks_like_path = os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors")
    if os.path.exists(pretrained) or looks_like_path:
        path = str(pretrained)
        if not os.path.isfile(path):
            raise WeightsFileMissing(f"--pretrained {path}: no such weights file.")
        return _from_local_file(model, path, tokenizer, device, precision)

    return _from_tag(model, pretrained, tokenizer, device, precision, cache_dir)


def _random_model(model: str, tokenizer, device, precision: str, seed: int) -> LoadedClip:
    """A randomly initialised ``model``, the same in every process for one ``seed`` (tests, benchmarks)."""
    warnings.warn(
        f"load_clip: {model} has RANDOM weights (pretrained='random'): features are meaningless; "
        "use this for tests and benchmarks only.",
        stacklevel=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _open_clip_quiet():  # open_clip's own "no pretrained weights" line repeats our warning
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, precision=precision)
    return LoadedClip(_freeze(net.to(device)), preprocess, tokenizer, model, "random")


def _from_tag(model: str, pretrained: str, tokenizer, device, precision: str, cache_dir: Optional[str]) -> LoadedClip:
    """``model`` with the weights of open_clip's ``pretrained`` tag, downloaded (or found in ``cache_dir``)."""
    cfg = _tag_config(model, pretrained)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    try:
        path = _download(cfg, cache_dir)
    except Exception as err:  # hub, URL and socket errors differ by version; all mean the same here
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PretrainedUnavailableError(
            f"Could not download the '{pretrained}' weights of {model} ({type(err).__name__}: {reason}). "
            "This machine is probably offline. Fetch the weights on a machine with internet and pass the "
            "file instead: --pretrained PATH (an OpenAI .pt archive, or an open_clip .bin/.pt/.safetensors "
            "state dict); or --pretrained random for a smoke test."
        ) from None
    if is_torchscript_archive(path):  # tags served as OpenAI archives (URL downloads)
        net, preprocess = _from_openai_file(path, device, precision)
    else:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=path,
            precision=precision,
            device=device,
            force_quick_gelu=quick_gelu,
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
            weights_only=True,
        )
    return LoadedClip(_freeze(net), preprocess, tokenizer, _quickgelu_name(model) if quick_gelu else model, pretrained)


def text_fingerprint(model: nn.Module) -> str:
    """A hash of the text tower's weights: a cache key that changes exactly when text features can.

    It covers token and position embeddings, every block, the final norm and the projection, so two
    loads of the same weights agree whatever path they came from, and random models with different
    seeds do not.
    """
    tower = text_tower(model)
    digest = hashlib.blake2b(digest_size=16)
    tensors = [tower.token_embedding.weight, tower.positional_embedding, tower.ln_final.weight, tower.ln_final.bias]
    tensors += list(tower.blocks.state_dict().values())
    proj = tower.text_projection
    if proj is not None:
        tensors += list(proj.parameters()) if isinstance(proj, nn.Module) else [proj]
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(str((tuple(t.shape), t.dtype)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
