"""Mutation-testing follow-up for :mod:`protext.targets` (issue 16): the cache's place, keys and file, the
tokenizer's truncation accounting on a hand-made tokenizer, the summary warning's words, the errors a
user reads, and the chunking and batching of the work. References are written by hand here (hashlib,
``model.encode_text`` one text at a time), never the module's helpers."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import protext.targets as targets_mod
from protext.models import text_fingerprint
from protext.targets import (
    DescriptionTruncatedWarning,
    NonFiniteTargetError,
    TargetCache,
    TargetCacheError,
    _check_finite_rows,
    default_cache_dir,
    description_targets,
    encode_descriptions,
    text_key,
    tokenize_descriptions,
    warn_truncated,
)

SOT, EOT = 1, 99


def word_tokenizer(texts, context_length=6, keep_eot=True):
    """A tokenizer made for these tests: SOT, one id per word (2 + its length), EOT (the largest id),
    zero padding; a text too long is cut to the context with EOT last (or, ``keep_eot=False``, not)."""
    rows = []
    for text in texts:
        ids = [SOT] + [2 + len(word) for word in text.split()] + [EOT]
        if len(ids) > context_length:
            ids = ids[:context_length]
            if keep_eot:
                ids[-1] = EOT
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def _direct(model, tok, texts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_text(tok([t])).float(), dim=-1) for t in texts])


# -- where the cache lives, and how a text is keyed --------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PROTEXT_TARGET_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / ".cache" / "protext" / "targets"
    monkeypatch.setenv("PROTEXT_TARGET_CACHE", "")  # empty is unset
    assert default_cache_dir() == tmp_path / ".cache" / "protext" / "targets"
    monkeypatch.setenv("PROTEXT_TARGET_CACHE", "~/elsewhere")
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert TargetCache("~/mine", "abc").path == tmp_path / "mine" / "abc.safetensors"


def test_text_key_is_blake2b_16_of_utf8():
    assert text_key("café au lait") == hashlib.blake2b("café au lait".encode("utf-8"), digest_size=16).digest()
    assert len(text_key("")) == 16 and text_key("a") != text_key("a ")


# -- truncation accounting, on a tokenizer whose every id is known ----------------------------------------


def test_tokenize_descriptions_finds_exactly_the_texts_that_do_not_fit():
    texts = ["a bb ccc dddd", "a b c d e", "x", "one two three four five six"]
    # 4 words + SOT + EOT = 6 tokens: fits the 6-token context exactly; 5 words do not
    got = tokenize_descriptions(word_tokenizer, texts, 6)
    assert got.truncated == [1, 3]
    assert got.tokens.tolist() == [
        [SOT, 3, 4, 5, 6, EOT],
        [SOT, 3, 3, 3, 3, EOT],
        [SOT, 3, EOT, 0, 0, 0],
        [SOT, 5, 5, 7, 6, EOT],
    ]


def test_tokenize_nothing():
    got = tokenize_descriptions(word_tokenizer, [], 6)
    assert got.tokens.shape == (0, 6) and got.tokens.dtype == torch.long and got.truncated == []


def test_a_tokenizer_without_context_length_reports_full_rows():
    def plain(texts):
        return word_tokenizer(texts)

    got = tokenize_descriptions(plain, ["a b c d", "a b c", "a b c d e f"], 6)
    assert got.truncated == [0, 2]  # a full last slot is the best evidence there is
    assert got.tokens.tolist() == [[SOT, 3, 3, 3, 3, EOT], [SOT, 3, 3, 3, EOT, 0], [SOT, 3, 3, 3, 3, EOT]]


def test_a_tokenizer_that_drops_eot_is_refused():
    def dropping(texts, context_length=6):
        return word_tokenizer(texts, context_length, keep_eot=False)

    with pytest.raises(RuntimeError) as info:
        # 7 tokens at 7 slots, so it is cut; cut to 6 without EOT its last id (3) is not its largest (7)
        tokenize_descriptions(dropping, ["fits", "eeeee dddd ccc bb a"], 6)
    assert str(info.value) == (
        "the tokenizer truncates long texts without keeping the end-of-text token last; CLIP features are read "
        "at that token, so truncated descriptions would be encoded wrongly."
    )
    assert tokenize_descriptions(dropping, ["fits", "a b"], 6).truncated == []  # nothing cut: nothing to check


# -- the summary warning -----------------------------------------------------------------------------------


def _warning(texts, truncated, context_length, labels=None) -> str:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_truncated(texts, truncated, context_length, labels)
    assert len(record) == 1 and record[0].category is DescriptionTruncatedWarning
    return str(record[0].message)


def test_truncation_warning_words():
    texts = ["short", "x" * 90, "y" * 91]
    assert _warning(texts, [1, 2], 77) == (
        f"2 of 3 descriptions are longer than the 77-token text context and were truncated "
        f"(end-of-text kept last), e.g. '{'x' * 90}'."
    )
    assert _warning(texts, [2], 6, labels=["a", "b", "c"]) == (
        f"1 of 3 descriptions are longer than the 6-token text context and were truncated "
        f"(end-of-text kept last), e.g. '{'y' * 87}...' (class 'c')."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_truncated(texts, [], 77)


def test_the_warning_names_the_first_truncated_description_and_its_class(tiny_clip, tmp_path):
    long = "a very long description " + " ".join(f"word{i}" for i in range(120))
    texts = ["fits.", long + " one", "fits too.", long + " two", long + " one"]
    with pytest.warns(DescriptionTruncatedWarning) as record:
        _, stats = description_targets(
            tiny_clip.model, tiny_clip.tokenizer, texts, use_cache=False, progress=False, labels=list("abcde")
        )
    message = str(record[0].message)
    assert message.startswith("3 of 5 descriptions are longer than the 77-token text context")
    assert message.endswith(f"e.g. '{(long + ' one')[:87]}...' (class 'b').")
    assert (stats.total, stats.unique, stats.truncated) == (5, 4, 3)


# -- encoding ----------------------------------------------------------------------------------------------


def test_encode_descriptions_in_batches_and_input_order(tiny_clip, monkeypatch):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    texts = ["a dog.", "a very long and winding description of a cat.", "ox.", "a photo of a bird in a tree.", "z."]
    sizes = []
    real = targets_mod.encode_tokens
    monkeypatch.setattr(targets_mod, "encode_tokens", lambda m, t, truncate=True: sizes.append(len(t)) or real(m, t, truncate))
    got = encode_descriptions(model, tok(texts), batch_size=2, progress=False)
    assert sizes == [2, 2, 1]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, _direct(model, tok, texts), atol=1e-5, rtol=0)
    empty = encode_descriptions(model, tok(texts)[:0], progress=False)
    assert empty.shape == (0, 32) and empty.dtype == torch.float32


# -- the cache file ----------------------------------------------------------------------------------------


def test_cache_file_holds_keys_rows_and_metadata(tmp_path):
    cache = TargetCache(tmp_path, "fp123")
    cache.write({})
    assert not cache.path.exists()  # nothing to add: no file
    one, two = torch.arange(4.0), torch.arange(4.0) + 10
    cache.write({text_key("one"): one})
    cache.write({text_key("two"): two})  # merged with what is on disk
    with safe_open(str(cache.path), framework="pt") as handle:
        assert handle.metadata() == {"format": "protext-targets/1", "fingerprint": "fp123"}
        keys, rows = handle.get_tensor("keys"), handle.get_tensor("targets")
    assert keys.dtype == torch.uint8 and keys.shape == (2, 16) and rows.dtype == torch.float32
    assert bytes(keys[0].tolist()) == hashlib.blake2b(b"one", digest_size=16).digest()
    assert rows.tolist() == [one.tolist(), two.tolist()]
    found = cache.read()
    assert set(found) == {text_key("one"), text_key("two")} and torch.equal(found[text_key("two")], two)


def test_unreadable_caches_say_how_to_recover(tmp_path):
    cache = TargetCache(tmp_path, "fp")
    cache.path.write_bytes(b"garbage")
    with pytest.raises(TargetCacheError) as info:
        cache.read()
    message = str(info.value)
    assert message.startswith(f"{cache.path}: unreadable target cache (")
    assert message.endswith("); delete it to rebuild, or pass another --cache-dir.")

    from safetensors.torch import save_file

    save_file({"keys": torch.zeros(1, 16, dtype=torch.uint8)}, str(cache.path))  # no targets
    with pytest.raises(TargetCacheError, match="unreadable target cache"):
        cache.read()
    save_file({"keys": torch.zeros(1, 16, dtype=torch.uint8), "targets": torch.tensor([[1.0, float("inf")]])}, str(cache.path))
    with pytest.raises(TargetCacheError) as info:
        cache.read()
    assert str(info.value) == (
        f"{cache.path}: the target cache holds non-finite values (NaN or inf), so it is corrupted; "
        "delete it to rebuild, or pass another --cache-dir."
    )


def test_non_finite_rows_are_counted_and_the_first_named():
    rows = torch.ones(4, 3)
    rows[1, 2] = float("nan")  # one bad value is enough
    rows[3, 0] = float("-inf")
    texts = ["fine", "b" * 70, "fine too", "also bad"]
    with pytest.raises(NonFiniteTargetError) as info:
        _check_finite_rows(rows, texts)
    assert str(info.value) == (
        f"the text tower encoded 2 descriptions to non-finite features (e.g. '{'b' * 60}'); "
        "the model weights (--pretrained) are broken, so nothing was cached. Check the weights file."
    )
    _check_finite_rows(torch.ones(2, 3), ["a", "b"])


# -- description_targets: what it counts, what it encodes, what it writes ----------------------------------


@pytest.fixture
def encode_calls(monkeypatch):
    """The rows of every encode_descriptions call, and the batch size it was given."""
    calls = []
    real = targets_mod.encode_descriptions

    def counting(model, tokens, batch_size=256, progress=True):
        calls.append((tokens.shape[0], batch_size))
        return real(model, tokens, batch_size=batch_size, progress=progress)

    monkeypatch.setattr(targets_mod, "encode_descriptions", counting)
    return calls


TEXTS = ["a dog.", "a cat.", "a dog.", "an ox in a field.", "a bird.", "a fish.", "a cat."]


def test_stats_and_chunks_with_a_cache(tiny_clip, tmp_path, encode_calls):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    got, stats = description_targets(model, tok, TEXTS[:2], cache_dir=tmp_path, progress=False)
    assert vars(stats) == {"total": 2, "unique": 2, "cached": 0, "computed": 2, "truncated": 0,
                           "cache_file": tmp_path / f"{text_fingerprint(model)}.safetensors"}
    encode_calls.clear()
    got, stats = description_targets(model, tok, TEXTS, cache_dir=tmp_path, progress=False, chunk_size=2, batch_size=3)
    # 5 distinct texts, 2 cached: the other 3 in chunks of 2 and 1, each with the batch size asked for
    assert (stats.total, stats.unique, stats.cached, stats.computed, stats.truncated) == (7, 5, 2, 3, 0)
    assert encode_calls == [(2, 3), (1, 3)]
    torch.testing.assert_close(got, _direct(model, tok, TEXTS), atol=1e-5, rtol=0)
    assert len(TargetCache(tmp_path, text_fingerprint(model)).read()) == 5


def test_without_a_cache_everything_is_one_chunk(tiny_clip, tmp_path, encode_calls, monkeypatch):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    monkeypatch.setenv("PROTEXT_TARGET_CACHE", str(tmp_path / "default"))
    got, stats = description_targets(model, tok, TEXTS, use_cache=False, progress=False, chunk_size=2)
    assert encode_calls == [(5, 256)]
    assert stats.cache_file is None and stats.cached == 0 and stats.computed == 5
    assert not (tmp_path / "default").exists()
    torch.testing.assert_close(got, _direct(model, tok, TEXTS), atol=1e-5, rtol=0)


def test_no_texts_no_work(tiny_clip, tmp_path, encode_calls):
    got, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, [], cache_dir=tmp_path, progress=False)
    assert got.shape == (0, 32) and encode_calls == []
    assert (stats.total, stats.unique, stats.cached, stats.computed) == (0, 0, 0, 0)
    assert list(tmp_path.iterdir()) == []
    # with rows already cached, still an empty (0, embed_dim) answer
    description_targets(tiny_clip.model, tiny_clip.tokenizer, TEXTS[:1], cache_dir=tmp_path, progress=False)
    got, _ = description_targets(tiny_clip.model, tiny_clip.tokenizer, [], cache_dir=tmp_path, progress=False)
    assert got.shape == (0, 32) and got.dtype == torch.float32


def test_the_default_chunk_is_4096_texts(tiny_clip, tmp_path, monkeypatch):
    """4,097 new texts reach the cache in two chunks (4,096, then 1); the encoder is faked, since only
    the chunking is looked at, and the hand-made tokenizer keeps tokenising fast."""
    calls = []

    def fake(model, tokens, batch_size=256, progress=True):
        calls.append(tokens.shape[0])
        return torch.ones(tokens.shape[0], 32)

    monkeypatch.setattr(targets_mod, "encode_descriptions", fake)
    texts = [f"text {i}" for i in range(4097)]
    got, stats = description_targets(tiny_clip.model, word_tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert calls == [4096, 1] and stats.computed == 4097 and got.shape == (4097, 32)


def test_the_default_cache_dir_is_used_when_none_is_given(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEXT_TARGET_CACHE", str(tmp_path / "env"))
    _, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, TEXTS[:1], progress=False)
    assert stats.cache_file == tmp_path / "env" / f"{text_fingerprint(tiny_clip.model)}.safetensors"
    assert stats.cache_file.is_file()


# -- progress: one bar of texts, cleared when done; none when asked for none or nothing is left -------------


class _Bar:
    """Stands in for tqdm: records how each bar was made and how far it counted."""

    made: list["_Bar"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.count = kwargs, 0
        _Bar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.count += n


@pytest.fixture
def bars(monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(targets_mod, "tqdm", _Bar)
    return lambda: [bar for bar in _Bar.made if not bar.kwargs["disable"]]


# what the user sees: the texts still to encode, named, counted in texts, and gone once finished
SHOWN = {"desc": "encoding descriptions", "unit": "text", "disable": False, "leave": False}


def test_targets_show_one_bar_over_the_texts_left_to_encode(tiny_clip, tmp_path, bars):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    description_targets(model, tok, TEXTS[:2], cache_dir=tmp_path, progress=False)
    assert bars() == []
    description_targets(model, tok, TEXTS, cache_dir=tmp_path, chunk_size=2)  # progress is on by default
    (bar,) = bars()  # the chunks' own encodings show no second bar
    assert bar.kwargs == {"total": 3, **SHOWN}
    assert bar.count == 3
    _Bar.made = []
    description_targets(model, tok, TEXTS, cache_dir=tmp_path)  # everything cached: nothing to show
    assert bars() == []


def test_encoding_alone_shows_its_own_bar(tiny_clip, bars):
    texts = ["a dog.", "an ox in a field.", "a bird."]
    encode_descriptions(tiny_clip.model, tiny_clip.tokenizer(texts), batch_size=2)
    (bar,) = bars()
    assert bar.kwargs == {"total": 3, **SHOWN}
    assert bar.count == 3
    _Bar.made = []
    encode_descriptions(tiny_clip.model, tiny_clip.tokenizer(texts), progress=False)
    assert bars() == []


def test_the_truncation_warning_points_at_the_caller():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_truncated(["x" * 10], [0], 5)
    # the caller's line, not protext's own (exactly this file when run plainly; mutmut's trampoline
    # adds a frame of its own in between, so the test asks only what holds either way)
    assert record[0].filename != targets_mod.__file__
