"""PromptedTextEncoder's options, defaults and messages against hand-written references (ALGORITHMS.md §1–§2).

tests/test_prompts.py holds the exactness tests on tiny-clip and a random ViT-B/16; this file covers
what they leave open: the defaults (n_ctx 4, depth 9) on a tiny tower with enough blocks, prompt
depths above 2, the placeholder and ``replaces`` variants of the prompt text, normalised and
cut-short runs, buffers, and every refusal's message. References splice tokens and call the
open_clip blocks by hand; none uses protext's own helpers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from protext.prompts import PromptedTextEncoder, PromptShapeError, splice_context

N_BLOCKS = 10  # more than ProText's depth 9, so "blocks >= depth are untouched" has blocks to check


@pytest.fixture(scope="module")
def deep_clip(tiny_clip):
    """A random CLIP whose text tower has 10 blocks of width 32 (tiny-clip has 2), real tokenizer."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CLIP(
            embed_dim=24,
            vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=16, image_size=32),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=N_BLOCKS),
            quick_gelu=True,
        )
    model.eval().requires_grad_(False)
    return model, tiny_clip.tokenizer


def reference(model, tokenizer, prompts, ctx, deep=None, depth=1):
    """§1–§2 by hand on the full 77 tokens: E(tokens), positions 1..n_ctx overwritten by ``ctx``,
    positional embedding, then before block i (1 <= i < depth) the same positions overwritten by
    ``deep[i - 1]``; final LayerNorm, state at the largest token id, times the projection."""
    tokens = tokenizer(prompts)
    n_ctx = ctx.shape[0]
    x = model.token_embedding(tokens).clone()
    x[:, 1 : 1 + n_ctx] = ctx
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i < depth:
            x = x.clone()
            x[:, 1 : 1 + n_ctx] = deep[i - 1]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    eot = tokens.argmax(dim=-1)
    return x[torch.arange(len(prompts)), eot] @ model.text_projection


def phrase_embeddings(model, tokenizer, phrase, n):
    """E of the first ``n`` tokens of ``phrase`` (position 0 is start-of-text)."""
    return model.token_embedding(tokenizer([phrase])[0, 1 : 1 + n])


# --------------------------------------------------------------------------------------------------
# splice_context


def test_splice_context_overwrites_positions_1_to_n_ctx_per_row_or_shared_in_the_hidden_dtype():
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 5).to(torch.bfloat16)
    before = hidden.clone()
    shared = torch.randn(4, 5)  # fp32 vectors into a bf16 tower: the tower's dtype wins
    per_row = torch.randn(3, 4, 5)

    expected = hidden.clone()
    expected[:, 1:5] = shared.to(torch.bfloat16)
    out = splice_context(hidden, shared, 4)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape
    assert torch.equal(out, expected)

    expected = hidden.clone()
    for row in range(3):  # per-image copies: row r gets its own vectors
        expected[row, 1:5] = per_row[row].to(torch.bfloat16)
    assert torch.equal(splice_context(hidden, per_row, 4), expected)
    assert torch.equal(hidden, before)  # the input is not written to


# --------------------------------------------------------------------------------------------------
# defaults and prompt depth on a 10-block tower


def test_defaults_are_four_init_vectors_and_depth_nine(deep_clip):
    model, tokenizer = deep_clip
    encoder = PromptedTextEncoder(model, tokenizer, ["dog", "sea_lion"])
    assert encoder.prompts == ["a photo of a dog.", "a photo of a sea lion."]
    assert (encoder.n_ctx, encoder.depth, encoder.ctx_init) == (4, 9, "a photo of a")
    assert tuple(encoder.ctx.shape) == (4, 32) and tuple(encoder.deep_prompts.shape) == (8, 4, 32)
    torch.testing.assert_close(encoder.ctx.data, phrase_embeddings(model, tokenizer, "a photo of a", 4))
    with torch.no_grad():
        expected = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=9)
        torch.testing.assert_close(encoder(), expected, atol=1e-5, rtol=0)


def test_each_block_below_depth_reads_its_own_deep_prompt(deep_clip):
    """Block i must see deep prompt i-1: a reference fed the same vectors in another order differs."""
    model, tokenizer = deep_clip
    torch.manual_seed(4)
    encoder = PromptedTextEncoder(model, tokenizer, ["dog", "cat", "tulip"], n_ctx=4, depth=5)
    with torch.no_grad():
        encoder.deep_prompts.normal_()  # unit scale, so every block's vectors matter visibly
        encoder.ctx.add_(torch.randn_like(encoder.ctx))
        got = encoder()
        expected = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=5)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        shifted = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts.roll(1, 0), depth=5)
    assert (shifted - got).abs().max() > 1e-3


def test_depth_equal_to_the_block_count_is_accepted_and_one_more_is_refused(deep_clip):
    model, tokenizer = deep_clip
    encoder = PromptedTextEncoder(model, tokenizer, ["dog"], depth=N_BLOCKS)
    assert tuple(encoder.deep_prompts.shape) == (N_BLOCKS - 1, 4, 32)
    with torch.no_grad():
        expected = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=N_BLOCKS)
        torch.testing.assert_close(encoder(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=f"prompt depth {N_BLOCKS + 1} is outside 1..{N_BLOCKS}"):
        PromptedTextEncoder(model, tokenizer, ["dog"], depth=N_BLOCKS + 1)
    with pytest.raises(ValueError, match="prompt depth 0 is outside"):
        PromptedTextEncoder(model, tokenizer, ["dog"], depth=0)


# --------------------------------------------------------------------------------------------------
# context length and init phrase


def test_a_single_context_vector_is_the_first_init_word(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tokenizer, ["dog", "golden_retriever"], n_ctx=1, depth=2)
    assert encoder.prompts == ["a photo of a dog.", "a photo of a golden retriever."]
    torch.testing.assert_close(encoder.ctx.data, phrase_embeddings(model, tokenizer, "a photo of a", 1))
    with torch.no_grad():
        encoder.deep_prompts.zero_()  # zero is a value like any other: it must still be spliced in
        expected = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=2)
        torch.testing.assert_close(encoder(), expected, atol=1e-5, rtol=0)


def test_zero_context_vectors_are_refused_with_the_value(tiny_clip):
    with pytest.raises(ValueError, match=r"^n_ctx must be at least 1, got 0\.$"):
        PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=0, depth=1)


def test_init_phrase_shorter_than_the_context_is_refused_with_both_counts(tiny_clip):
    with pytest.raises(ValueError, match=r"^ctx_init 'a dog' has 2 tokens, fewer than n_ctx=3\.$"):
        PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=3, depth=1, ctx_init="a   dog")


def test_init_phrase_underscores_are_spaces_as_in_class_names(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tokenizer, ["dog"], n_ctx=3, depth=1, ctx_init="itap_of_a")
    assert encoder.prompts == ["itap of a dog."] and encoder.ctx_init == "itap of a"
    torch.testing.assert_close(encoder.ctx.data, phrase_embeddings(model, tokenizer, "itap of a", 3))


def test_no_init_phrase_gives_placeholders_even_for_a_short_context(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    for ctx_init in (None, ""):
        torch.manual_seed(5)
        encoder = PromptedTextEncoder(model, tokenizer, ["dog"], n_ctx=4, depth=1, ctx_init=ctx_init)
        assert encoder.prompts == ["X X X X dog."] and encoder.ctx_init is None
        assert not encoder.uses_init and tuple(encoder.ctx.shape) == (4, 64)


def test_placeholder_context_runs_and_matches_the_reference(tiny_clip):
    """n_ctx > 4: the prompt reads ``X … X {name}.`` and the noise context is what gets spliced in."""
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    torch.manual_seed(6)
    encoder = PromptedTextEncoder(model, tokenizer, ["dog", "sea_lion"], n_ctx=6, depth=2)
    assert encoder.prompts == ["X X X X X X dog.", "X X X X X X sea lion."] and encoder.ctx_init is None
    assert tuple(encoder.ctx.shape) == (6, 64) and tuple(encoder.deep_prompts.shape) == (1, 6, 64)
    with torch.no_grad():
        expected = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=2)
        torch.testing.assert_close(encoder(), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# the class part of the prompt: template and ``replaces``


def test_replaces_names_the_phrase_the_context_stands_for(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    pet = "a photo of a {}, a type of pet."

    def prompts(**kwargs):
        return PromptedTextEncoder(model, tokenizer, ["pug"], depth=1, template=pet, **kwargs).prompts

    # "" drops nothing: the context is followed by the whole template
    assert prompts(replaces="") == ["a photo of a a photo of a pug, a type of pet."]
    assert prompts(n_ctx=8, replaces="") == ["X X X X X X X X a photo of a pug, a type of pet."]
    # a long (placeholder) context still takes the init phrase's place when replaces is left out
    assert prompts(n_ctx=8) == ["X X X X X X X X pug, a type of pet."]
    # replaces is matched with its spaces normalised and without regard to case
    assert prompts(n_ctx=8, replaces="  A photo   of ") == ["X X X X X X X X a pug, a type of pet."]
    assert prompts(n_ctx=8, ctx_init=None, replaces="a photo of a") == ["X X X X X X X X pug, a type of pet."]
    # a template that does not start with the phrase is kept whole
    assert prompts(replaces="a picture of") == ["a photo of a a photo of a pug, a type of pet."]


def test_set_classnames_refuses_an_empty_class_list(tiny_clip):
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], depth=1)
    with pytest.raises(ValueError, match=r"^no class names given\.$"):
        encoder.set_classnames([])
    with pytest.raises(ValueError, match=r"^no class names given\.$"):
        PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, [], depth=1)


def test_set_classnames_without_template_keeps_the_last_one(tiny_clip):
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], depth=1, template="{}, a pet.")
    encoder.set_classnames(["cat", "sea_lion"])
    assert encoder.classnames == ["cat", "sea_lion"]
    assert encoder.prompts == ["a photo of a cat, a pet.", "a photo of a sea lion, a pet."]


def test_a_truncated_class_prompt_is_named_by_its_first_80_characters(tiny_clip):
    long_name = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(ValueError) as raised:
        PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog", long_name, "cat"], depth=1)
    prompt = f"a photo of a {long_name}."
    assert str(raised.value) == f"a class prompt fills the 77-token context and was truncated: '{prompt[:80]}…'"


def test_a_context_as_long_as_the_token_window_is_refused(tiny_clip):
    """76 context vectors leave no room for the end-of-text token (77 positions, 0 is start-of-text)."""
    for n_ctx in (76, 90):
        with pytest.raises(ValueError, match=r"^a prompt is too short to hold the context; check the template\.$"):
            PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=n_ctx, depth=1)


# --------------------------------------------------------------------------------------------------
# forward: cut-short runs, normalisation, subsets


def test_forward_runs_only_up_to_the_longest_requested_eot_by_default(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    names = ["dog", "golden_retriever", "cat"]
    encoder = PromptedTextEncoder(model, tokenizer, names, n_ctx=4, depth=2)
    lengths = []
    hook = model.transformer.resblocks[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encoder()
            encoder(torch.tensor([2, 0]))
            encoder(truncate=False)
    finally:
        hook.remove()
    eot = tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in names]).argmax(dim=-1)
    assert lengths == [int(eot.max()) + 1, int(eot[[2, 0]].max()) + 1, 77]


def test_normalize_gives_unit_rows_in_the_reference_direction(tiny_clip):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    encoder = PromptedTextEncoder(model, tokenizer, ["dog", "cat", "tulip"], n_ctx=4, depth=2)
    with torch.no_grad():
        raw = reference(model, tokenizer, encoder.prompts, encoder.ctx, encoder.deep_prompts, depth=2)
        unit = encoder(normalize=True)
        torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
        torch.testing.assert_close(encoder(), raw, atol=1e-5, rtol=0)  # default: not normalised
    assert (raw.norm(dim=-1) - 1).abs().min() > 1e-2  # so the two checks above are not the same check


# --------------------------------------------------------------------------------------------------
# what is a parameter, a buffer, a borrowed module


def test_only_the_prompt_vectors_are_parameters_and_state(tiny_clip):
    model = tiny_clip.model
    encoder = PromptedTextEncoder(model, tiny_clip.tokenizer, ["dog", "cat"], n_ctx=4, depth=2)
    assert encoder.clip is model
    assert [name for name, _ in encoder.named_parameters()] == ["ctx", "deep_prompts"]
    # the tokenised prompts are non-persistent buffers: they follow .to() but stay out of checkpoints
    assert set(encoder.state_dict()) == {"ctx", "deep_prompts"}
    assert sorted(name for name, _ in encoder.named_buffers()) == ["eot", "tokens"]
    expected = tiny_clip.tokenizer(["a photo of a dog.", "a photo of a cat."])
    assert torch.equal(encoder.tokens, expected) and torch.equal(encoder.eot, expected.argmax(dim=-1))
    moved = encoder.to("meta")  # a second device on any machine: the buffers move with the vectors
    assert moved.tokens.is_meta and moved.eot.is_meta and moved.ctx.is_meta


# --------------------------------------------------------------------------------------------------
# saved prompts


def test_shallow_prompts_round_trip_into_a_shallow_encoder(tiny_clip):
    source = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, depth=1)
    target = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, depth=1)
    state = source.prompt_state()
    assert set(state) == {"ctx"}
    with torch.no_grad():
        state["ctx"] = state["ctx"] + 1
    target.load_prompt_state(state)
    assert torch.equal(target.ctx.data, state["ctx"]) and target.deep_prompts is None
    with torch.no_grad():  # a shallow encoder runs every block untouched after the input context
        expected = reference(tiny_clip.model, tiny_clip.tokenizer, target.prompts, state["ctx"])
        torch.testing.assert_close(target(), expected, atol=1e-5, rtol=0)


def test_loaded_prompts_are_cast_to_the_encoder_dtype(tiny_clip):
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, depth=2)
    ctx = torch.randn(4, 64, dtype=torch.float64)
    deep = torch.randn(1, 4, 64, dtype=torch.float64)
    encoder.load_prompt_state({"ctx": ctx, "deep_prompts": deep})
    assert encoder.ctx.dtype == torch.float32 and encoder.deep_prompts.dtype == torch.float32
    assert torch.equal(encoder.ctx.data, ctx.float()) and torch.equal(encoder.deep_prompts.data, deep.float())


def test_load_prompt_state_messages_name_both_shapes(tiny_clip):
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, depth=2)
    before = encoder.prompt_state()
    deep = before["deep_prompts"]

    def refused(state, message):
        with pytest.raises(PromptShapeError, match=message):
            encoder.load_prompt_state(state)

    refused({"deep_prompts": deep}, r"^saved prompts have no 'ctx' tensor\.$")
    refused(
        {"ctx": torch.zeros(1, 4, 48), "deep_prompts": deep},
        r"^saved context has width 48 but this model's text tower has width 64 "
        r"\(prompts were learned for another CLIP architecture\)\.$",
    )
    refused(
        {"ctx": torch.zeros(4, 48), "deep_prompts": deep},
        r"^saved context has width 48 but this model's text tower has width 64 ",
    )
    refused(
        {"ctx": torch.zeros(2, 64), "deep_prompts": deep}, r"^saved context has n_ctx=2 but this encoder has n_ctx=4\.$"
    )
    refused(
        {"ctx": torch.zeros(4, 64), "deep_prompts": torch.zeros(2, 4, 64)},
        r"^saved deep prompts have shape \(2, 4, 64\) \(depth 3\) but this encoder has depth 2 with width 64\.$",
    )
    refused(
        {"ctx": torch.zeros(4, 64), "deep_prompts": torch.zeros(1, 4, 48)},
        r"^saved deep prompts have shape \(1, 4, 48\) \(depth 2\) but this encoder has depth 2 with width 64\.$",
    )
    refused({"ctx": torch.zeros(4, 64)}, r"^saved prompts are shallow \(depth 1\) but this encoder has depth 2\.$")
    # nothing was half-loaded by the refusals
    assert torch.equal(encoder.ctx.data, before["ctx"]) and torch.equal(encoder.deep_prompts.data, deep)

    shallow = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["dog"], n_ctx=4, depth=1)
    message = r"^saved deep prompts have shape \(1, 4, 64\) \(depth 2\) but this encoder has depth 1 with width 64\.$"
    with pytest.raises(PromptShapeError, match=message):
        shallow.load_prompt_state(before)
