"""Class text features for clip / cupl / learned prompts, checked against direct computations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from protext.descriptions import load_cupl_json
from protext.prompts import PromptedTextEncoder
from protext.zeroshot import (
    ZeroShotError,
    clip_text_features,
    cupl_text_features,
    encode_images,
    length_chunks,
    logit_scale,
    prompt_text_features,
    zeroshot_logits,
)

NAMES = ["cat", "golden_retriever", "Great Dane", "a rather long class name with several words in it", "ox"]


def test_length_chunks_cover_every_index_once_within_budget():
    eot = torch.tensor([9, 3, 12, 3, 30, 7, 7, 5])
    chunks = length_chunks(eot, token_budget=40)
    flat = torch.cat(chunks).tolist()
    assert sorted(flat) == list(range(8))
    # batches are runs of increasing length, and each fits the budget at its own longest EOT
    lengths = [int(eot[i]) + 1 for i in flat]
    assert lengths == sorted(lengths)
    assert flat[:2] == [1, 3]  # ties keep index order
    for chunk in chunks:
        assert len(chunk) * (int(eot[chunk].max()) + 1) <= 40 or len(chunk) == 1



def test_the_two_text_batchings_share_one_order_and_differ_in_the_cut():
    """What both docstrings state: zeroshot.length_chunks and text_tower.encode_in_length_batches visit
    rows in the same stable order by length; one cuts by a token budget, the other every batch_size rows."""
    from protext.text_tower import encode_in_length_batches

    eot = torch.tensor([9, 3, 12, 3, 30, 7, 7, 5, 3, 12])
    visited: list[torch.Tensor] = []

    def encode(rows: torch.Tensor) -> torch.Tensor:
        visited.append(rows)
        return eot[rows, None].float()

    by_rows = encode_in_length_batches(eot, encode, batch_size=4)
    assert by_rows[:, 0].tolist() == eot.float().tolist()  # rows come back in input order
    by_budget = length_chunks(eot, token_budget=40)
    assert torch.cat(visited).tolist() == torch.cat(by_budget).tolist()  # one order
    assert [len(rows) for rows in visited] == [4, 4, 2]  # cut by row count
    assert [len(rows) for rows in by_budget] != [4, 4, 2]  # cut by tokens: 4 x (12 + 1) > 40

def test_clip_features_equal_encode_text(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    got = clip_text_features(model, tok, NAMES, "a photo of a {}, a type of pet.", token_budget=30)
    prompts = [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in NAMES]
    with torch.no_grad():
        want = F.normalize(model.encode_text(tok(prompts)), dim=-1)
    assert got.shape == (5, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ZeroShotError, match="no '\\{\\}'"):
        clip_text_features(model, tok, NAMES, "a photo")


def _cupl_reference(model, tok, names, descriptions):
    rows = []
    with torch.no_grad():
        for name in names:
            feats = F.normalize(model.encode_text(tok(descriptions[name])), dim=-1)
            rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows)


def test_cupl_features_equal_reference_with_loose_keys(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    names = ["golden_retriever", "Great Dane", "ox"]
    long_text = "a very long description " * 40  # > 77 tokens: truncated, EOT kept last, as CLIP does
    descriptions = {
        "Golden Retriever": ["a dog with golden fur.", "a friendly retriever.", long_text],
        "great dane": ["a very large dog."],
        "OX": ["a bovine animal used for ploughing.", "a strong animal with horns."],
        "unrelated": ["never used."],
    }
    got = cupl_text_features(model, tok, names, descriptions, token_budget=64)
    keyed = {"golden_retriever": descriptions["Golden Retriever"], "Great Dane": descriptions["great dane"], "ox": descriptions["OX"]}
    torch.testing.assert_close(got, _cupl_reference(model, tok, names, keyed), atol=1e-5, rtol=0)


def test_cupl_missing_classes_are_listed(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    with pytest.raises(ZeroShotError) as err:
        cupl_text_features(model, tok, ["cat", "dog", "ox"], {"cat": ["a cat."], "doggo": ["a dog."], "ox": []}, source="d.jsonl")
    message = str(err.value)
    assert "d.jsonl" in message and "'dog'" in message and "'ox'" in message and "2 of 3" in message
    assert "'doggo'" in message  # the unused key, likely the same class spelled differently


def test_cupl_real_files(tiny_clip, shared_dir):
    """The real DTD CuPL file covers all 47 classes; CuPL's original car keys match none."""
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    names = json.loads((shared_dir / "classnames" / "dtd.json").read_text())
    descriptions = load_cupl_json(shared_dir / "cupl" / "texture_prompts_full.json")
    feats = cupl_text_features(model, tok, names, descriptions)
    assert feats.shape == (47, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(47))
    subset = names[:3]
    keyed = {n: descriptions[n] for n in subset}
    torch.testing.assert_close(feats[:3], _cupl_reference(model, tok, subset, keyed), atol=1e-5, rtol=0)

    cars = json.loads((shared_dir / "classnames" / "cars.json").read_text())
    original = load_cupl_json(shared_dir / "cupl" / "original-keys" / "cars_prompts_full.json")
    with pytest.raises(ZeroShotError, match="196 of 196 classes.*2000 AM General Hummer SUV"):
        cupl_text_features(model, tok, cars, original, source="cars_prompts_full.json")


@pytest.mark.parametrize("template", ["a photo of a {}.", "a photo of a {}, a type of flower."])
def test_untrained_prompts_equal_clip(tiny_clip, template):
    """Depth-1 context initialised from 'a photo of a' is CLIP with the same template, exactly."""
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tok, NAMES, n_ctx=4, depth=1, ctx_init="a photo of a", template=template)
    got = prompt_text_features(encoder, token_budget=40)
    torch.testing.assert_close(got, clip_text_features(model, tok, NAMES, template), atol=1e-5, rtol=0)


def test_images_and_logits(tiny_clip):
    model = tiny_clip.model
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    feats = encode_images(model, images)
    with torch.no_grad():
        want = F.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(feats, want)
    text = torch.randn(4, 32)
    scale = logit_scale(model)
    assert float(scale) == pytest.approx(float(model.logit_scale.exp()))
    logits = zeroshot_logits(feats * 3.0, text, scale)  # unnormalised inputs are normalised
    torch.testing.assert_close(logits, scale * want @ F.normalize(text, dim=-1).t())
    assert logits.shape == (3, 4)
