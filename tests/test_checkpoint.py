"""Checkpoints: the one path to a class encoder, the weights check, and refusing corrupted files."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

from protext.checkpoint import (
    CheckpointError,
    OtherWeightsError,
    PromptCheckpoint,
    check_weights,
    class_encoder,
    export_coop,
    load_prompts,
    save_prompts,
)
from protext.errors import UserError
from protext.models import load_clip, text_fingerprint
from protext.prompts import PromptedTextEncoder, PromptShapeError

PET = "a photo of a {}, a type of pet."
NAMES = ["beagle", "Abyssinian", "great_pyrenees"]


def _quiet_clip(name: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(name, "random", seed=seed)


def _saved(tmp_path, clip, n_ctx: int, ctx_init, depth: int = 2, drop_key: bool = False, name: str = "p.safetensors"):
    """A checkpoint as training writes it (n_ctx > 4: random context; else from the init phrase)."""
    torch.manual_seed(3)
    encoder = PromptedTextEncoder(clip.model, clip.tokenizer, ["x"], n_ctx=n_ctx, depth=depth, ctx_init=ctx_init)
    path = tmp_path / name
    save_prompts(path, encoder, {"text_tower_fingerprint": text_fingerprint(clip.model), "model": "tiny-clip", "pretrained": "random"})
    if drop_key:  # a checkpoint written before the key existed
        ckpt = load_prompts(path)
        from safetensors.torch import save_file

        meta = {k: json.dumps(v) for k, v in ckpt.meta.items() if k != "context_replaces"}
        save_file(ckpt.state(), str(path), metadata=meta)
    return path


@pytest.mark.parametrize("drop_key", [False, True])
def test_long_context_replaces_the_template_phrase(tiny_clip, tmp_path, drop_key):
    """n_ctx 16: 'X … X beagle, a type of pet.' (published), whichever entry point, old files too."""
    ckpt = load_prompts(_saved(tmp_path, tiny_clip, 16, "a photo of a", drop_key=drop_key))
    assert ckpt.ctx_init is None and ("context_replaces" in ckpt.meta) != drop_key
    via_function = class_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, PET, ckpt)
    via_method = ckpt.build_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, template=PET)
    xs = " ".join(["X"] * 16)
    expected = [f"{xs} beagle, a type of pet.", f"{xs} Abyssinian, a type of pet.", f"{xs} great pyrenees, a type of pet."]
    assert via_function.prompts == expected
    assert torch.equal(via_function.tokens, tiny_clip.tokenizer(expected))
    assert torch.equal(via_method.tokens, via_function.tokens)
    with torch.no_grad():
        assert torch.equal(via_method(), via_function())
    assert torch.equal(via_function.ctx.detach(), ckpt.ctx)


def test_recorded_empty_phrase_keeps_the_template_whole(tiny_clip, tmp_path):
    path = _saved(tmp_path, tiny_clip, 8, None)
    ckpt = load_prompts(path)
    assert ckpt.meta["context_replaces"] == ""
    encoder = class_encoder(tiny_clip.model, tiny_clip.tokenizer, ["beagle"], PET, ckpt)
    assert encoder.prompts == [" ".join(["X"] * 8) + " a photo of a beagle, a type of pet."]


def test_short_context_from_the_init_phrase(tiny_clip, tmp_path):
    ckpt = load_prompts(_saved(tmp_path, tiny_clip, 4, "a photo of a"))
    assert ckpt.meta["context_replaces"] == "a photo of a"
    encoder = class_encoder(tiny_clip.model, tiny_clip.tokenizer, ["beagle"], PET, ckpt)
    assert encoder.prompts == ["a photo of a beagle, a type of pet."]


def test_no_checkpoint_is_tpt_hand_crafted_prompt(tiny_clip):
    """Depth 1, the embeddings of 'a photo of a': exactly CLIP's feature of the full sentence."""
    encoder = class_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, PET)
    sentences = ["a photo of a beagle, a type of pet.", "a photo of a Abyssinian, a type of pet.", "a photo of a great pyrenees, a type of pet."]
    assert (encoder.n_ctx, encoder.depth) == (4, 1)
    assert torch.equal(encoder.tokens, tiny_clip.tokenizer(sentences))
    with torch.no_grad():
        torch.testing.assert_close(encoder(), tiny_clip.model.encode_text(tiny_clip.tokenizer(sentences)), atol=1e-5, rtol=0)


def test_width_mismatch_names_the_checkpoint_file(tiny_clip, tmp_path):
    ckpt = load_prompts(_saved(tmp_path, tiny_clip, 4, "a photo of a", depth=1))
    big = _quiet_clip("ViT-B-16")
    with pytest.raises(PromptShapeError, match=rf"{tmp_path / 'p.safetensors'}: .*width 64 .*width 512"):
        class_encoder(big.model, big.tokenizer, ["beagle"], PET, ckpt)
    deep = load_prompts(_saved(tmp_path, big, 4, "a photo of a", depth=5, name="deep.safetensors"))
    with pytest.raises(PromptShapeError, match=r"deep\.safetensors: prompts of depth 5 .* has 2"):
        class_encoder(tiny_clip.model, tiny_clip.tokenizer, ["beagle"], PET, deep)
    assert issubclass(PromptShapeError, UserError)


def _corrupt_first_floats(path, count: int = 2) -> None:
    """Set the first ``count`` float32 values of the tensor data to NaN (8 bytes for 2)."""
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header
    raw[start : start + 4 * count] = struct.pack("<f", float("nan")) * count
    path.write_bytes(bytes(raw))


def test_nan_bytes_in_a_checkpoint_are_refused_naming_the_file(tiny_clip, tmp_path):
    path = _saved(tmp_path, tiny_clip, 4, "a photo of a")
    _corrupt_first_floats(path)
    with pytest.raises(CheckpointError, match=rf"{path}: tensor '\w+' holds 2 non-finite values"):
        load_prompts(path)
    pth = tmp_path / "coop.pth"
    torch.save({"state_dict": {"ctx": torch.tensor([[1.0, float("inf")]])}}, pth)
    with pytest.raises(CheckpointError, match=rf"{pth}: tensor 'ctx' holds 1 non-finite"):
        load_prompts(pth)
    assert issubclass(CheckpointError, UserError)


def test_check_weights_compares_fingerprints(tiny_clip, tmp_path):
    path = _saved(tmp_path, tiny_clip, 4, "a photo of a")
    ckpt = load_prompts(path)
    same = check_weights(ckpt, tiny_clip, path)
    assert same.checkpoint == same.model == text_fingerprint(tiny_clip.model) and same.matches
    other = _quiet_clip("tiny-clip", seed=1)
    with pytest.raises(OtherWeightsError, match=rf"{path}: prompts were trained on other text-tower weights.*--allow-other-weights"):
        check_weights(ckpt, other, path)
    with pytest.warns(UserWarning, match="used anyway because of --allow-other-weights"):
        loud = check_weights(ckpt, other.model, path, allow_other=True)
    assert loud.checkpoint == same.model and loud.model == text_fingerprint(other.model) and loud.matches is False
    coop = tmp_path / "ctx.pth"
    export_coop(ckpt, coop)
    unknown = check_weights(load_prompts(coop), tiny_clip, coop)
    assert unknown.checkpoint is None and unknown.matches is None


def test_build_encoder_without_template_uses_the_training_one(tiny_clip, tmp_path):
    ckpt = load_prompts(_saved(tmp_path, tiny_clip, 16, "a photo of a"))
    assert isinstance(ckpt, PromptCheckpoint) and ckpt.path == tmp_path / "p.safetensors"
    encoder = ckpt.build_encoder(tiny_clip.model, tiny_clip.tokenizer, ["beagle"])
    assert encoder.prompts == [" ".join(["X"] * 16) + " beagle."]


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    import os

    from protext.atomic import atomic_write, clean_stale_temps

    dead = tmp_path / ".p.safetensors.4194999-abc123.tmp"  # above any pid Linux hands out: its writer is gone
    live = tmp_path / f".p.safetensors.{os.getpid()}-def456.tmp"  # a writer still running: kept
    other = tmp_path / ".notes.tmp"  # not ours: kept
    for path in (dead, live, other):
        path.write_bytes(b"half")
    assert clean_stale_temps(tmp_path) == [dead]
    dead.write_bytes(b"half")
    atomic_write(tmp_path / "q.json", lambda tmp: open(tmp, "w").write("{}"))
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "q.json").read_text() == "{}"
    assert clean_stale_temps(tmp_path / "missing") == []


def test_checkpoint_bytes_are_canonical_safetensors(tiny_clip, tmp_path):
    """Any safetensors reader opens the file; the same content gives the same bytes (sorted header)."""
    from safetensors import safe_open

    from protext.checkpoint import canonical_safetensors

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1.5, -2.0])}
    meta = {"z": "1", "a": json.dumps({"k": [1, 2]})}
    path = tmp_path / "c.safetensors"
    path.write_bytes(canonical_safetensors(tensors, meta))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == meta
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in tensors.items())
    assert canonical_safetensors(dict(reversed(tensors.items())), dict(reversed(meta.items()))) == path.read_bytes()
    with pytest.raises(ValueError, match="fp32 only"):
        canonical_safetensors({"x": torch.zeros(2, dtype=torch.float64)}, {})
