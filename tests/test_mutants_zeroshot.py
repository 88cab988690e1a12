"""Mutation-testing follow-up for :mod:`protext.zeroshot` (issue 16): length batching worked out by hand,
the errors a user reads, and features checked against ``model.encode_text`` one text at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protext.prompts import PromptedTextEncoder
from protext.zeroshot import (
    ZeroShotError,
    clip_text_features,
    cupl_text_features,
    encode_images,
    encode_texts,
    ensemble_text_features,
    length_chunks,
    prompt_features,
    prompt_text_features,
    template_ensemble_features,
    ImageEncoder,
)

NAMES = ["golden_retriever", "ox", "a rather long class name with several words in it"]


def _one_by_one(model, tok, texts) -> torch.Tensor:
    """``model.encode_text`` of each text alone (no batching at all), fp32, unnormalised."""
    with torch.no_grad():
        return torch.cat([model.encode_text(tok([t])).float() for t in texts])


# -- length batching, worked out by hand --------------------------------------------------------------


def test_length_chunks_by_hand():
    # lengths (EOT + 1): 10 4 13 4 31 8 8 6; sorted (ties in index order): 1 3 7 5 6 0 2 4
    eot = torch.tensor([9, 3, 12, 3, 30, 7, 7, 5])
    # 1,3,7,5,6: 5 rows x 8 = 40 fits exactly; 0 makes 6 x 10 > 40; 0,2: 2 x 13; 4 makes 3 x 31 > 40
    chunks = length_chunks(eot, token_budget=40)
    assert [c.tolist() for c in chunks] == [[1, 3, 7, 5, 6], [0, 2], [4]]
    assert all(c.dtype == torch.long for c in chunks)
    # one token less and the fifth row no longer fits
    assert [c.tolist() for c in length_chunks(eot, token_budget=39)] == [[1, 3, 7, 5], [6, 0, 2], [4]]


def test_length_chunks_edges():
    assert length_chunks(torch.tensor([], dtype=torch.long)) == []
    assert [c.tolist() for c in length_chunks(torch.tensor([5]))] == [[0]]
    # a row longer than the budget on its own still gets a batch, alone
    assert [c.tolist() for c in length_chunks(torch.tensor([50, 2, 60]), token_budget=10)] == [[1], [0], [2]]
    assert [c.tolist() for c in length_chunks(torch.tensor([30, 40]), token_budget=10)] == [[0], [1]]  # no empty batch
    # the default budget: 8192 tokens, so 106 rows of 77 tokens (8162) but not 107 (8239)
    full = length_chunks(torch.full((200,), 76))
    assert [len(c) for c in full] == [106, 94]
    assert torch.cat(full).tolist() == list(range(200))


def test_length_chunks_keep_ties_in_index_order():
    eot = torch.tensor([4] * 40 + [2] * 40)
    chunks = length_chunks(eot, token_budget=10 ** 6)
    assert [c.tolist() for c in chunks] == [list(range(40, 80)) + list(range(40))]


# -- text features --------------------------------------------------------------------------------------


def test_encode_texts_is_encode_text_unnormalised_in_input_order(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    texts = ["a photo of an ox.", "a.", "a photo of a very, very, very long and winding name.", "b c."]
    got = encode_texts(model, tok, texts, token_budget=20)  # several batches
    assert got.dtype == torch.float32 and got.shape == (4, 32)
    torch.testing.assert_close(got, _one_by_one(model, tok, texts), atol=1e-5, rtol=0)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(4))


def test_encode_texts_refuses_nothing(tiny_clip):
    with pytest.raises(ZeroShotError) as info:
        encode_texts(tiny_clip.model, tiny_clip.tokenizer, [])
    assert str(info.value) == "no texts to encode."


def test_a_template_without_braces_is_named_with_its_flag(tiny_clip):
    with pytest.raises(ZeroShotError) as info:
        clip_text_features(tiny_clip.model, tiny_clip.tokenizer, NAMES, "a photo of a dog.")
    assert str(info.value) == "--template 'a photo of a dog.' has no '{}' where the class name goes."


def test_clip_features_default_template(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    got = clip_text_features(model, tok, NAMES)
    want = F.normalize(_one_by_one(model, tok, [f"a photo of a {n.replace('_', ' ')}." for n in NAMES]), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cupl_features_average_each_class_own_descriptions(tiny_clip):
    """Classes with 1, 3 and 2 descriptions, given out of order: the mean is per class."""
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    descriptions = {
        "ox": ["a bovine animal.", "a strong animal with horns.", "oxen pull ploughs."],
        "golden retriever": ["a dog with golden fur."],
        "cat": ["a small cat.", "a cat on a mat."],
    }
    names = ["golden_retriever", "ox", "cat"]
    got = cupl_text_features(model, tok, names, descriptions, token_budget=30)
    rows = []
    for key in ("golden retriever", "ox", "cat"):
        per = F.normalize(_one_by_one(model, tok, descriptions[key]), dim=-1)
        rows.append(F.normalize(per.sum(0) / len(per), dim=0))
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [10, 11, 12])
def test_cupl_error_lists_at_most_ten_classes_and_ten_unused_keys(tiny_clip, n):
    names = [f"class{i:02d}" for i in range(n)] + ["ok"]
    descriptions = {"ok": ["fine."], **{f"key{i:02d}": ["x."] for i in range(n)}}
    with pytest.raises(ZeroShotError) as info:
        cupl_text_features(tiny_clip.model, tiny_clip.tokenizer, names, descriptions, source="d.json")
    shown = ", ".join(f"'class{i:02d}'" for i in range(10)) + (f", … ({n} in all)" if n > 10 else "")
    unused = ", ".join(f"'key{i:02d}'" for i in range(10)) + (" …" if n > 10 else "")
    assert str(info.value) == (
        f"d.json has no descriptions for {n} of {n + 1} classes: {shown}. "
        f"Keys in d.json that match no class: {unused}. "
        "Every class needs at least one description; regenerate or re-key the descriptions."
    )


def test_cupl_error_with_few_classes_and_no_unused_key(tiny_clip):
    with pytest.raises(ZeroShotError) as info:
        cupl_text_features(tiny_clip.model, tiny_clip.tokenizer, ["cat", "dog"], {"cat": [], "dog": ["a dog."]})
    assert str(info.value) == (
        "the description file has no descriptions for 1 of 2 classes: 'cat'. "
        "Every class needs at least one description; regenerate or re-key the descriptions."
    )


def test_ensemble_errors_name_the_template(tiny_clip):
    with pytest.raises(ZeroShotError) as info:
        ensemble_text_features(tiny_clip.model, tiny_clip.tokenizer, NAMES, ["a {}.", "a photo."])
    assert str(info.value) == "ensemble template 'a photo.' has no '{}' where the class name goes."
    with pytest.raises(ZeroShotError) as info:
        ensemble_text_features(tiny_clip.model, tiny_clip.tokenizer, NAMES, ())
    assert str(info.value) == "a template ensemble needs at least one template."


def test_template_ensemble_by_name_averages_the_seven(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    seven = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
    got = template_ensemble_features(model, tok, NAMES[:2], "ensemble", token_budget=40)
    rows = []
    for name in NAMES[:2]:
        per = F.normalize(_one_by_one(model, tok, [t.format(name.replace("_", " ")) for t in seven]), dim=-1)
        rows.append(F.normalize(per.mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-5, rtol=0)


# -- learned prompts --------------------------------------------------------------------------------------


def test_prompt_features_unnormalised_and_in_class_order(tiny_clip):
    """Untrained depth-1 prompts from 'a photo of a' are CLIP's features of the full sentences."""
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tok, NAMES, n_ctx=4, depth=1, ctx_init="a photo of a", template="a photo of a {}.")
    want = _one_by_one(model, tok, [f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    with torch.no_grad():
        raw = prompt_features(encoder, token_budget=12, normalize=False)  # one class per batch
        default = prompt_features(encoder)
    torch.testing.assert_close(raw, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(default, F.normalize(want, dim=-1), atol=1e-5, rtol=0)
    fixed = prompt_text_features(encoder)
    assert fixed.dtype == torch.float32 and not fixed.requires_grad
    torch.testing.assert_close(fixed, F.normalize(want, dim=-1), atol=1e-5, rtol=0)


def test_prompt_features_keep_the_graph_when_asked(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tok, NAMES, n_ctx=4, depth=1, ctx_init="a photo of a", template="a photo of a {}.")
    feats = prompt_features(encoder, token_budget=12)
    assert feats.requires_grad
    feats[:, 0].sum().backward()
    assert encoder.ctx.grad is not None and encoder.ctx.grad.abs().sum() > 0


# -- images ---------------------------------------------------------------------------------------------


def _images(model, n=2):
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_image_encoder_fp32_is_the_model_as_it_is(tiny_clip):
    model = tiny_clip.model
    images = _images(model)
    with torch.no_grad():
        want = F.normalize(model.encode_image(images).float(), dim=-1)
    for dtype in (None, torch.float32):
        encoder = ImageEncoder(model, dtype)
        assert encoder.dtype is None and encoder.visual is None
        assert torch.equal(encoder(images), want)
    torch.testing.assert_close(encode_images(model, images, autocast_dtype=torch.float32), want, atol=0, rtol=0)


def test_image_encoder_bf16_runs_a_bf16_copy_and_leaves_the_model_alone(tiny_clip):
    model = tiny_clip.model
    images = _images(model)
    encoder = ImageEncoder(model, torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert next(encoder.visual.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in encoder.visual.parameters()) and not encoder.visual.training
    assert next(model.visual.parameters()).dtype == torch.float32  # the model's own tower is untouched
    with torch.no_grad():
        want = F.normalize(encoder.visual(images.to(torch.bfloat16)).float(), dim=-1)
        fp32 = F.normalize(model.encode_image(images), dim=-1)
    got = encoder(images)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    assert (got - fp32).abs().max() < 0.1  # the same features, to bf16 precision


def test_image_encoder_fp16_autocasts(tiny_clip):
    model = tiny_clip.model
    images = _images(model)
    encoder = ImageEncoder(model, torch.float16)
    assert encoder.dtype == torch.float16 and encoder.visual is None
    got = encoder(images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        raw = model.encode_image(images)
    assert raw.dtype == torch.float16
    assert got.dtype == torch.float32 and torch.equal(got, F.normalize(raw.float(), dim=-1))
