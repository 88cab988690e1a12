"""Frozen description targets: exact, computed once, cached by model weights and text."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import protext.targets as targets_mod
from protext.models import load_clip, text_fingerprint
from protext.targets import (
    DescriptionTruncatedWarning,
    TargetCacheError,
    description_targets,
    tokenize_descriptions,
)

LONG = "a very long description " + " ".join(f"word{i}" for i in range(120)) + " the end."


@pytest.fixture(scope="module")
def texts(shared_dir):
    data = json.loads((shared_dir / "cupl" / "texture_prompts_full.json").read_text())
    return [t for name in list(data)[:8] for t in data[name][:15]]


@pytest.fixture
def encoder_calls(monkeypatch):
    """Count the rows that reach the text tower through protext.targets."""
    calls = {"batches": 0, "rows": 0}
    real = targets_mod.encode_tokens

    def counting(model, tokens, truncate=True):
        calls["batches"] += 1
        calls["rows"] += tokens.shape[0]
        return real(model, tokens, truncate=truncate)

    monkeypatch.setattr(targets_mod, "encode_tokens", counting)
    return calls


def direct(clip, texts):
    """The definition: norm(model.encode_text(tokenize(t))) at the full context."""
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1)


def test_equal_to_direct_computation(tiny_clip, texts, tmp_path):
    got, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert got.dtype == torch.float32 and got.shape == (len(texts), 32)
    torch.testing.assert_close(got, direct(tiny_clip, texts), rtol=0, atol=1e-5)
    assert stats.total == len(texts) and stats.computed == stats.unique and stats.cached == 0


def test_cache_is_reused_across_runs(tiny_clip, texts, tmp_path, encoder_calls):
    first, stats1 = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert encoder_calls["rows"] == stats1.unique > 0
    assert stats1.cache_file == tmp_path / f"{text_fingerprint(tiny_clip.model)}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stats1.cache_file.name]  # no temporary files left

    encoder_calls.update(batches=0, rows=0)
    again, stats2 = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert encoder_calls["batches"] == 0
    assert (stats2.cached, stats2.computed) == (stats1.unique, 0)
    assert torch.equal(first, again)

    # a subset in another order is served from the same rows
    encoder_calls.update(batches=0, rows=0)
    subset, _ = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[::-3], cache_dir=tmp_path, progress=False)
    assert encoder_calls["batches"] == 0
    assert torch.equal(subset, first.flip(0)[::3])


def test_a_changed_text_is_the_only_one_recomputed(tiny_clip, texts, tmp_path, encoder_calls):
    description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, cache_dir=tmp_path, progress=False)
    changed = list(texts)
    changed[5] = changed[5] + " With a small change."
    encoder_calls.update(batches=0, rows=0)
    got, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, changed, cache_dir=tmp_path, progress=False)
    assert encoder_calls["rows"] == 1 and stats.computed == 1
    torch.testing.assert_close(got, direct(tiny_clip, changed), rtol=0, atol=1e-5)


def test_other_weights_get_their_own_targets(tiny_clip, texts, tmp_path, encoder_calls):
    description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, cache_dir=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_clip("tiny-clip", "random", seed=1)
    assert text_fingerprint(other.model) != text_fingerprint(tiny_clip.model)
    encoder_calls.update(batches=0, rows=0)
    got, stats = description_targets(other.model, other.tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert stats.cached == 0 and encoder_calls["rows"] == stats.unique
    torch.testing.assert_close(got, direct(other, texts), rtol=0, atol=1e-5)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    # an in-place change of the weights is a different model too
    with torch.no_grad():
        other.model.ln_final.bias.add_(0.01)
    encoder_calls.update(batches=0, rows=0)
    changed, stats = description_targets(other.model, other.tokenizer, texts, cache_dir=tmp_path, progress=False)
    assert stats.cached == 0 and encoder_calls["rows"] == stats.unique
    torch.testing.assert_close(changed, direct(other, texts), rtol=0, atol=1e-5)


def test_duplicates_are_encoded_once(tiny_clip, texts, encoder_calls):
    doubled = texts + texts[:10]
    got, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, doubled, use_cache=False, progress=False)
    assert stats.unique == len(set(texts)) and encoder_calls["rows"] == stats.unique
    assert torch.equal(got[len(texts):], got[:10])


def test_no_cache_touches_no_file(tiny_clip, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEXT_TARGET_CACHE", str(tmp_path / "env-cache"))
    _, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[:5], use_cache=False, progress=False)
    assert stats.cache_file is None and not (tmp_path / "env-cache").exists()
    _, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[:5], progress=False)
    assert stats.cache_file.parent == tmp_path / "env-cache"  # the environment variable moves the default


def test_overlong_descriptions_one_summary_warning_and_eot_last(tiny_clip, texts, tmp_path):
    batch = [LONG, texts[0], LONG + " again", texts[1]]
    with pytest.warns(DescriptionTruncatedWarning) as record:
        got, stats = description_targets(
            tiny_clip.model, tiny_clip.tokenizer, batch, cache_dir=tmp_path, progress=False, labels=["a", "b", "c", "d"]
        )
    ours = [w for w in record if issubclass(w.category, DescriptionTruncatedWarning)]
    assert len(ours) == 1
    assert "2 of 4 descriptions are longer than the 77-token" in str(ours[0].message)
    assert "class 'a'" in str(ours[0].message)
    assert stats.truncated == 2
    # the cut rows are the tokenizer's own: 77 tokens, EOT last, encoded like encode_text does
    tokenized = tokenize_descriptions(tiny_clip.tokenizer, batch, 77)
    assert tokenized.truncated == [0, 2]
    assert torch.equal(tokenized.tokens, tiny_clip.tokenizer(batch))
    eot = tiny_clip.tokenizer.eot_token_id
    assert (tokenized.tokens[[0, 2], -1] == eot).all()
    torch.testing.assert_close(got, direct(tiny_clip, batch), rtol=0, atol=1e-5)
    # cached or not, the data is reported again
    with pytest.warns(DescriptionTruncatedWarning):
        description_targets(tiny_clip.model, tiny_clip.tokenizer, batch, cache_dir=tmp_path, progress=False)


def test_no_warning_when_everything_fits(tiny_clip, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DescriptionTruncatedWarning)
        description_targets(tiny_clip.model, tiny_clip.tokenizer, texts, use_cache=False, progress=False)


def test_unreadable_cache_names_the_file(tiny_clip, texts, tmp_path):
    bad = tmp_path / f"{text_fingerprint(tiny_clip.model)}.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TargetCacheError, match=str(bad)):
        description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[:3], cache_dir=tmp_path, progress=False)


def test_non_finite_cached_targets_are_refused_naming_the_file(tiny_clip, texts, tmp_path):
    from safetensors.torch import load_file, save_file

    description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[:5], cache_dir=tmp_path, progress=False)
    path = tmp_path / f"{text_fingerprint(tiny_clip.model)}.safetensors"
    tensors = load_file(str(path))
    tensors["targets"][2, 3] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(TargetCacheError, match=rf"{path}: the target cache holds non-finite values"):
        description_targets(tiny_clip.model, tiny_clip.tokenizer, texts[:5], cache_dir=tmp_path, progress=False)


def test_encoding_is_kept_chunk_by_chunk_and_resumes(tiny_clip, texts, tmp_path, monkeypatch):
    """Interrupted in its third chunk, a run keeps two chunks; the rerun encodes only the rest."""
    real = targets_mod.encode_descriptions
    calls = {"n": 0, "rows": 0}

    def flaky(model, tokens, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and calls.get("fail", True):
            raise KeyboardInterrupt
        calls["rows"] += tokens.shape[0]
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(targets_mod, "encode_descriptions", flaky)
    unique = list(dict.fromkeys(texts))
    with pytest.raises(KeyboardInterrupt):
        description_targets(tiny_clip.model, tiny_clip.tokenizer, unique, cache_dir=tmp_path, progress=False, chunk_size=10)
    cache = targets_mod.TargetCache(tmp_path, text_fingerprint(tiny_clip.model))
    assert len(cache.read()) == 20
    calls.update(n=0, rows=0, fail=False)
    got, stats = description_targets(tiny_clip.model, tiny_clip.tokenizer, unique, cache_dir=tmp_path, progress=False, chunk_size=10)
    assert (stats.cached, stats.computed, calls["rows"]) == (20, len(unique) - 20, len(unique) - 20)
    direct = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(unique)), dim=-1)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=0)


def test_non_finite_encodings_are_never_cached(tiny_clip, texts, tmp_path):
    import copy

    from protext.errors import UserError

    broken = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        broken.ln_final.weight[0] = float("nan")
    with pytest.raises(UserError, match="non-finite features .*--pretrained"):
        description_targets(broken, tiny_clip.tokenizer, texts[:4], cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
