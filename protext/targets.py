"""Frozen description embeddings: the regression targets of ProText training (ALGORITHMS.md §3).

A target is ``norm(encode_text(description))`` under plain CLIP. It never changes during training,
so it is computed once and cached on disk, one safetensors file per text tower: the file is named by
:func:`protext.models.text_fingerprint` (a hash of the weights) and holds one row per description,
looked up by a hash of the text. A later run with the same weights reuses every row it finds and
encodes only the texts that are new; other weights get another file.

Encoding runs in batches of similar token length, each cut at its longest EOT (exact: the mask is
causal and features are read at EOT), under ``no_grad`` and in fp32 whatever the training precision,
so a cached row is the same number whichever run wrote it.

Encoding is resumable: finished chunks are written to the cache as they complete, so an
interrupted run loses at most one chunk.

Descriptions longer than the context are truncated by the tokenizer, keeping EOT last; they are
counted and reported in one summary warning.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .models import text_fingerprint
from .errors import UserError
from .text_tower import encode_in_length_batches, encode_tokens, eot_positions, text_tower

CACHE_ENV = "PROTEXT_TARGET_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/protext/targets")
FORMAT = "protext-targets/1"
KEY_BYTES = 16


class DescriptionTruncatedWarning(UserWarning):
    """Some descriptions are longer than the text context and were cut (EOT kept last)."""


class TargetCacheError(UserError, RuntimeError):
    """A target cache file exists but cannot be read or holds non-finite rows; it names the file."""


def default_cache_dir() -> Path:
    """``$PROTEXT_TARGET_CACHE`` if set, else ``~/.cache/protext/targets``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def text_key(text: str) -> bytes:
    """The cache key of one description: a 16-byte BLAKE2b hash of its UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=KEY_BYTES).digest()


# --------------------------------------------------------------------------------------------------
# tokenisation with truncation accounting


@dataclass
class Tokenized:
    """Descriptions tokenised to the context length, with the ones that had to be cut.

    Attributes:
        tokens: ``(n, context_length)`` token ids; a cut row ends with EOT.
        truncated: indices of the rows that were longer than the context.
    """

    tokens: torch.Tensor
    truncated: list[int] = field(default_factory=list)


def tokenize_descriptions(tokenizer: Callable, texts: Sequence[str], context_length: int) -> Tokenized:
    """Tokenise ``texts`` and find the ones the tokenizer silently truncated.

    open_clip's tokenizers accept ``context_length``: tokenising one slot longer shows exactly which
    texts do not fit (their EOT lands in the extra slot). The cut rows come from the tokenizer itself,
    and are checked to end with EOT (the largest id), since CLIP pools at the largest id: a tokenizer
    that dropped EOT would silently read the wrong position, so that is an error.
    """
    texts = list(texts)
    if not texts:
        return Tokenized(torch.zeros(0, context_length, dtype=torch.long))
    try:
        longer = tokenizer(texts, context_length=context_length + 1)
    except TypeError:  # a tokenizer without the argument: a full last slot is the best evidence
        tokens = tokenizer(texts)
        full = (tokens[:, -1] != 0).nonzero().flatten().tolist()
        return Tokenized(tokens, full)
    eot = eot_positions(longer)
    cut = (eot >= context_length).nonzero().flatten().tolist()
    tokens = longer[:, :context_length].clone()
    if cut:
        tokens[cut] = tokenizer([texts[i] for i in cut])
        last = tokens[cut, -1]
        if bool((last != tokens[cut].max(dim=1).values).any()):
            raise RuntimeError(
                "the tokenizer truncates long texts without keeping the end-of-text token last; CLIP "
                "features are read at that token, so truncated descriptions would be encoded wrongly."
            )
    return Tokenized(tokens, cut)


def warn_truncated(texts: Sequence[str], truncated: Sequence[int], context_length: int, labels: Optional[Sequence[str]] = None) -> None:
    """One summary warning for every description longer than the context (nothing if none)."""
    if not truncated:
        return
    first = truncated[0]
    example = texts[first] if len(texts[first]) <= 90 else texts[first][:87] + "..."
    where = f" (class '{labels[first]}')" if labels is not None else ""
    warnings.warn(
        f"{len(truncated)} of {len(texts)} descriptions are longer than the {context_length}-token text "
        f"context and were truncated (end-of-text kept last), e.g. '{example}'{where}.",
        DescriptionTruncatedWarning,
        stacklevel=2,
    )


# --------------------------------------------------------------------------------------------------
# encoding


def encode_descriptions(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """``norm(encode_text(t))`` for every row of ``tokens``, as fp32 on CPU, in input order.

    Rows go through :func:`protext.text_tower.encode_in_length_batches`, so each batch holds texts
    of similar length and is cut at its longest EOT.
    """
    n = tokens.shape[0]
    tower = text_tower(model)
    if n == 0:
        return torch.zeros(0, tower.embed_dim, dtype=torch.float32)
    device = tower.token_embedding.weight.device

    def encode(rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_tokens(model, tokens[rows].to(device), truncate=True).float(), dim=-1).cpu()

    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        with tqdm(total=n, desc="encoding descriptions", unit="text", disable=not progress, leave=False) as bar:
            return encode_in_length_batches(eot_positions(tokens), encode, batch_size, on_batch=bar.update)


# --------------------------------------------------------------------------------------------------
# the on-disk cache


class TargetCache:
    """The cached targets of one text tower: ``<dir>/<fingerprint>.safetensors``.

    The file holds ``keys`` (n × 16 bytes, :func:`text_key` of each description) and ``targets``
    (n × embed_dim, fp32). It only grows, and is rewritten atomically (temporary file, then rename)
    after merging with whatever is on disk at that moment, so concurrent runs never leave a torn
    file and rarely lose each other's rows (a lost row is only recomputed next time).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.directory = Path(directory).expanduser()
        self.fingerprint = fingerprint
        self.path = self.directory / f"{fingerprint}.safetensors"

    def read(self) -> dict[bytes, torch.Tensor]:
        """Every cached row by key; an absent file is an empty cache."""
        if not self.path.is_file():
            return {}
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                keys = handle.get_tensor("keys")
                rows = handle.get_tensor("targets")
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise TargetCacheError(
                f"{self.path}: unreadable target cache ({err}); delete it to rebuild, or pass another --cache-dir."
            ) from None
        if not bool(torch.isfinite(rows).all()):
            raise TargetCacheError(
                f"{self.path}: the target cache holds non-finite values (NaN or inf), so it is corrupted; "
                "delete it to rebuild, or pass another --cache-dir."
            )
        return {bytes(k.tolist()): r for k, r in zip(keys, rows)}

    def write(self, new: dict[bytes, torch.Tensor]) -> None:
        """Add ``new`` rows to the file (merging with its current content), atomically."""
        if not new:
            return
        merged = self.read()
        merged.update(new)
        keys = torch.tensor([list(k) for k in merged], dtype=torch.uint8)
        rows = torch.stack(list(merged.values())).float().contiguous()
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint}
        atomic_write(self.path, lambda tmp: save_file({"keys": keys, "targets": rows}, tmp, metadata=metadata))


class NonFiniteTargetError(UserError, RuntimeError):
    """The model encoded a description to NaN/inf: its weights are broken; nothing was cached."""


def _check_finite_rows(rows: torch.Tensor, texts: Sequence[str]) -> None:
    bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteTargetError(
            f"the text tower encoded {len(bad)} descriptions to non-finite features (e.g. '{texts[bad[0]][:60]}'); "
            "the model weights (--pretrained) are broken, so nothing was cached. Check the weights file."
        )


@dataclass
class TargetStats:
    """What :func:`description_targets` did.

    Attributes:
        total: descriptions asked for.
        unique: distinct texts among them.
        cached: distinct texts found in the cache.
        computed: distinct texts encoded now.
        truncated: descriptions longer than the context (cut, EOT kept last).
        cache_file: the cache file used, or None when caching is off.
    """

    total: int = 0
    unique: int = 0
    cached: int = 0
    computed: int = 0
    truncated: int = 0
    cache_file: Optional[Path] = None


def description_targets(
    model: nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    labels: Optional[Sequence[str]] = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, TargetStats]:
    """Targets ``norm(encode_text(t))`` of ``texts`` (n × embed_dim, fp32, CPU), through the disk cache.

    Args:
        model: the frozen CLIP model (its text tower's fingerprint names the cache file).
        tokenizer: the model's tokenizer.
        texts: the descriptions, duplicates allowed (each distinct text is encoded once).
        cache_dir: cache directory; None means :func:`default_cache_dir`.
        use_cache: False computes everything and touches no file.
        batch_size: descriptions per encoding batch.
        progress: show a progress bar while encoding.
        labels: optional class of each text, only to name an example in the truncation warning.
        chunk_size: texts encoded between cache writes. Each finished chunk is written at once, so a
            run killed or interrupted while encoding keeps what it finished and a rerun encodes
            only the rest.

    Emits one :class:`DescriptionTruncatedWarning` if any description is longer than the context.
    """
    texts = list(texts)
    context_length = text_tower(model).context_length
    stats = TargetStats(total=len(texts))
    keys = [text_key(t) for t in texts]
    first_of: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        first_of.setdefault(k, i)
    stats.unique = len(first_of)

    cache = TargetCache(cache_dir or default_cache_dir(), text_fingerprint(model)) if use_cache else None
    found = cache.read() if cache is not None else {}
    todo = [k for k in first_of if k not in found]
    stats.cached = stats.unique - len(todo)
    stats.computed = len(todo)

    # Truncation is reported for every run, cached or not: it describes the data, not the work done.
    unique_keys = list(first_of)
    tokenized = tokenize_descriptions(tokenizer, [texts[first_of[k]] for k in unique_keys], context_length)
    cut_keys = {unique_keys[i] for i in tokenized.truncated}
    truncated = [i for i, k in enumerate(keys) if k in cut_keys]
    stats.truncated = len(truncated)
    warn_truncated(texts, truncated, context_length, labels)

    if cache is not None:
        stats.cache_file = cache.path
    rows_of = {k: i for i, k in enumerate(unique_keys)}
    _encode_missing(model, tokenized.tokens, rows_of, todo, {k: texts[i] for k, i in first_of.items()}, found, cache, chunk_size, batch_size, progress)
    dim = next(iter(found.values())).shape[0] if found else text_tower(model).embed_dim
    out = torch.stack([found[k] for k in keys]) if keys else torch.zeros(0, dim)
    return out, stats


def _encode_missing(
    model: nn.Module,
    tokens: torch.Tensor,
    rows_of: dict[bytes, int],
    todo: list[bytes],
    text_of: dict[bytes, str],
    found: dict[bytes, torch.Tensor],
    cache: Optional["TargetCache"],
    chunk_size: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Encode the ``todo`` texts (rows ``rows_of[k]`` of ``tokens``) into ``found``, chunk by chunk.

    Each chunk reaches the cache as soon as it is encoded, so a killed run keeps it; without a cache
    everything is one chunk.
    """
    chunk = chunk_size if cache is not None else max(len(todo), 1)
    with tqdm(total=len(todo), desc="encoding descriptions", unit="text", disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            rows = torch.tensor([rows_of[k] for k in part], dtype=torch.long)
            fresh = encode_descriptions(model, tokens[rows], batch_size=batch_size, progress=False)
            _check_finite_rows(fresh, [text_of[k] for k in part])
            new = dict(zip(part, fresh))
            found.update(new)
            if cache is not None:
                cache.write(new)
            bar.update(len(part))
