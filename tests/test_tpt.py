"""TPT against a direct, hand-written computation of ALGORITHMS.md §5, and fast path == naive path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protext.checkpoint import PromptCheckpoint, load_coop
from protext.prompts import PromptedTextEncoder, PromptShapeError
from protext.checkpoint import class_encoder
from tests.reference.tpt_reference import PromptTuner, TPTConfig  # production's tuner, plus the naive reference path
from protext.tta.tpt import (
    image_generator,
    marginal_entropy,
    n_confident,
    select_confident,
    shared_prefix_features,
    supports_shared_prefix,
    view_entropy,
)



def handcrafted_encoder(model, tokenizer, classnames, template):
    """TPT's hand-crafted start: ``class_encoder`` without a checkpoint."""
    return class_encoder(model, tokenizer, classnames, template)


def checkpoint_encoder(checkpoint, model, tokenizer, classnames, template):
    return class_encoder(model, tokenizer, classnames, template, checkpoint)


NAMES = ["cat", "golden retriever", "Great Dane", "a rather long class name with several words in it", "ox", "tabby"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    """64 'views' (the tuner does not care where they come from; the eval tests use real ones)."""
    return torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def other_views() -> torch.Tensor:
    return torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def deep_encoder(clip, template=TEMPLATE) -> PromptedTextEncoder:
    """A ProText-like encoder: context from 'a photo of a' plus deep prompts (depth 2 = all tiny-clip blocks)."""
    torch.manual_seed(3)
    enc = PromptedTextEncoder(clip.model, clip.tokenizer, NAMES, n_ctx=4, depth=2, ctx_init="a photo of a", template=template)
    with torch.no_grad():  # move away from the init so the deep prompts matter
        enc.ctx.add_(0.05 * torch.randn_like(enc.ctx))
        enc.deep_prompts.normal_(0, 0.5)
    return enc


# --------------------------------------------------------------------------------------------------
# the formulas


def test_entropies_match_their_definitions():
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(0)) * 4
    p = logits.softmax(-1)
    torch.testing.assert_close(view_entropy(logits), -(p * p.log()).sum(-1))
    mean = p.mean(0)
    torch.testing.assert_close(marginal_entropy(logits), -(mean * mean.log()).sum())
    # a class whose probability underflows everywhere contributes 0, not NaN
    extreme = torch.tensor([[0.0, 2000.0, -2000.0], [0.0, 1900.0, -2000.0]])
    assert torch.isfinite(marginal_entropy(extreme)) and float(marginal_entropy(extreme)) == pytest.approx(0.0, abs=1e-6)


def test_selection_count_order_and_ties():
    assert n_confident(64, 0.1) == 6 and n_confident(10, 0.05) == 1 and n_confident(100, 0.1) == 10
    logits = torch.zeros(64, 5)  # all views tie: index order
    assert select_confident(logits, 0.1).tolist() == [0, 1, 2, 3, 4, 5]
    logits[40, 0] = 50.0  # the most confident view comes first
    logits[7, 1] = 20.0
    assert select_confident(logits, 0.1).tolist()[:2] == [40, 7]


def test_image_generator_is_keyed_by_seed_and_index():
    draw = lambda s, i: torch.rand(3, generator=image_generator(s, i))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))


@pytest.mark.parametrize("depth", [1, 2])
def test_shared_prefix_equals_encoder(tiny_clip, depth):
    """Running the prompt prefix once gives the encoder's features and gradients."""
    encoder = deep_encoder(tiny_clip) if depth == 2 else handcrafted_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, TEMPLATE)
    assert supports_shared_prefix(encoder)
    classes = torch.tensor([3, 0, 5])
    want = encoder(classes, truncate=False)
    got = shared_prefix_features(encoder, classes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in encoder.parameters()]
    for g_want, g_got in zip(torch.autograd.grad((want * weights).sum(), params), torch.autograd.grad((got * weights).sum(), params)):
        # fp32 summation order differs (one prefix instead of n copies): ~1e-6 of the gradient's scale
        torch.testing.assert_close(g_got, g_want, atol=1e-5 * float(g_want.abs().max()), rtol=0)


# --------------------------------------------------------------------------------------------------
# §5 by hand


def reference_tpt(clip, encoder: PromptedTextEncoder, views: torch.Tensor, tune: str = "all", lr: float = 5e-3):
    """ALGORITHMS.md §5 written out directly: 77-token text, every view, a fresh AdamW."""
    model = clip.model
    with torch.no_grad():
        image = F.normalize(model.encode_image(views), dim=-1)
    scale = model.logit_scale.exp()
    params = [encoder.ctx] + ([encoder.deep_prompts] if tune == "all" and encoder.deep_prompts is not None else [])
    for p in encoder.parameters():
        p.requires_grad_(any(p is q for q in params))
    text = F.normalize(encoder(truncate=False), dim=-1)
    logits = scale * image @ text.t()
    probs = logits.softmax(-1)
    entropy = -(probs * logits.log_softmax(-1)).sum(-1).detach()
    k = int(64 * 0.1)
    chosen = sorted(range(64), key=lambda v: (float(entropy[v]), v))[:k]
    mean = probs[chosen].mean(0)
    loss = -(mean * mean.log()).sum()
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    with torch.no_grad():
        final = scale * image[0] @ F.normalize(encoder(truncate=False), dim=-1).t()
    return chosen, float(loss.detach()), encoder.prompt_state(), final


def _clone(clip, encoder: PromptedTextEncoder) -> PromptedTextEncoder:
    twin = PromptedTextEncoder(
        clip.model, clip.tokenizer, encoder.classnames, encoder.n_ctx, encoder.depth, encoder.ctx_init, encoder.template
    )
    twin.load_prompt_state(encoder.prompt_state())
    return twin


@pytest.mark.parametrize("kind,tune", [("handcrafted", "all"), ("deep", "all"), ("deep", "shallow")])
@pytest.mark.parametrize("naive", [False, True])
def test_step_equals_hand_computation(tiny_clip, views, kind, tune, naive):
    encoder = handcrafted_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, TEMPLATE) if kind == "handcrafted" else deep_encoder(tiny_clip)
    init = encoder.prompt_state()
    chosen, loss, tuned, final = reference_tpt(tiny_clip, _clone(tiny_clip, encoder), views, tune)

    tuner = PromptTuner(tiny_clip.model, encoder, TPTConfig(tune=tune, naive=naive, token_budget=24))
    out = tuner.adapt(views, return_tuned=True)
    assert out.selected.tolist() == chosen
    assert out.losses[0] == pytest.approx(loss, abs=1e-5)
    for name, value in tuned.items():
        torch.testing.assert_close(out.tuned[name], value, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, final, atol=1e-5, rtol=0)
    assert not torch.allclose(out.tuned["ctx"], init["ctx"])  # the step did something
    if kind == "deep":
        moved = not torch.allclose(out.tuned["deep_prompts"], init["deep_prompts"])
        assert moved == (tune == "all")
    # and the encoder is back at its initialisation
    for name, value in encoder.prompt_state().items():
        assert torch.equal(value, init[name])


@pytest.mark.parametrize("steps", [0, 2])
def test_fast_equals_naive(tiny_clip, views, steps):
    encoder = deep_encoder(tiny_clip, "a photo of a {}, a type of pet.")
    fast = PromptTuner(tiny_clip.model, encoder, TPTConfig(steps=steps, token_budget=24)).adapt(views, return_tuned=True)
    naive = PromptTuner(tiny_clip.model, encoder, TPTConfig(steps=steps, naive=True)).adapt(views, return_tuned=True)
    unshared = PromptTuner(tiny_clip.model, encoder, TPTConfig(steps=steps, shared_prefix=False)).adapt(views, return_tuned=True)
    chunked = PromptTuner(tiny_clip.model, encoder, TPTConfig(steps=steps, naive=True, naive_class_chunk=4)).adapt(views, return_tuned=True)
    for other in (naive, unshared, chunked):
        assert fast.selected.tolist() == other.selected.tolist()
        assert fast.losses == pytest.approx(other.losses, abs=1e-5)
        torch.testing.assert_close(fast.logits, other.logits, atol=1e-5, rtol=0)
        for name in fast.tuned:
            torch.testing.assert_close(fast.tuned[name], other.tuned[name], atol=1e-5, rtol=0)
    assert len(fast.losses) == steps
    if steps == 0:  # no tuning: the zero-shot prediction of view 0
        with torch.no_grad():
            image = F.normalize(tiny_clip.model.encode_image(views[:1]), dim=-1)[0]
            text = F.normalize(encoder(truncate=False), dim=-1)
        torch.testing.assert_close(fast.logits, tiny_clip.model.logit_scale.exp() * image @ text.t(), atol=1e-5, rtol=0)


def test_reset_makes_images_independent(tiny_clip, views, other_views):
    """TPT on [a, b] gives for b exactly what TPT on [b] alone gives (prompts and optimiser reset)."""
    encoder = deep_encoder(tiny_clip)
    tuner = PromptTuner(tiny_clip.model, encoder, TPTConfig())
    tuner.adapt(views)
    after_a = tuner.adapt(other_views, return_tuned=True)
    again = tuner.adapt(other_views, return_tuned=True)  # a kept optimiser state would change this
    alone = PromptTuner(tiny_clip.model, deep_encoder(tiny_clip), TPTConfig()).adapt(other_views, return_tuned=True)
    for out in (again, alone):
        assert torch.equal(after_a.logits, out.logits)
        assert after_a.selected.tolist() == out.selected.tolist()
        for name in out.tuned:
            assert torch.equal(after_a.tuned[name], out.tuned[name])


def test_coop_pth_is_a_tpt_init(tiny_clip, tmp_path, views):
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    path = tmp_path / "coop_ctx.pth"
    torch.save({"state_dict": {"ctx": ctx}, "epoch": 50}, path)
    checkpoint = load_coop(path)
    encoder = checkpoint_encoder(checkpoint, tiny_clip.model, tiny_clip.tokenizer, NAMES, "a photo of a {}, a type of pet.")
    assert torch.equal(encoder.ctx.detach(), ctx) and encoder.depth == 1
    # CoOp's context takes the place of 'a photo of a': the rest of the dataset template follows it
    assert encoder.prompts[0] == "X X X X cat, a type of pet."
    out = PromptTuner(tiny_clip.model, encoder, TPTConfig()).adapt(views, return_tuned=True)
    assert out.logits.shape == (len(NAMES),) and torch.isfinite(out.logits).all()
    assert not torch.allclose(out.tuned["ctx"], ctx)
    assert torch.equal(encoder.ctx.detach(), ctx)  # reset


def test_wrong_width_checkpoint_fails_clearly(tiny_clip):
    """A ViT-B-sized (512-wide) checkpoint on the 64-wide tiny-clip names both widths."""
    checkpoint = PromptCheckpoint(torch.zeros(4, 512), torch.zeros(1, 4, 512), {"n_ctx": 4, "depth": 2, "ctx_init": "a photo of a"})
    with pytest.raises(PromptShapeError, match="width 512.*width 64"):
        checkpoint_encoder(checkpoint, tiny_clip.model, tiny_clip.tokenizer, NAMES, TEMPLATE)
    shallow = PromptCheckpoint(torch.zeros(4, 512), None, {"n_ctx": 4, "depth": 1, "ctx_init": None})
    with pytest.raises(PromptShapeError, match="width 512.*width 64"):
        checkpoint_encoder(shallow, tiny_clip.model, tiny_clip.tokenizer, NAMES, TEMPLATE)


def test_bf16_images_and_config_errors(tiny_clip, views):
    encoder = handcrafted_encoder(tiny_clip.model, tiny_clip.tokenizer, NAMES, TEMPLATE)
    fp32 = PromptTuner(tiny_clip.model, encoder, TPTConfig(n_views=64)).adapt(views)
    bf16 = PromptTuner(tiny_clip.model, encoder, TPTConfig(image_dtype=torch.bfloat16)).adapt(views)
    assert torch.isfinite(bf16.logits).all()
    assert torch.allclose(bf16.logits, fp32.logits, atol=0.5)  # bf16 keeps ~3 significant digits
    with pytest.raises(ValueError, match="--tpt-selection"):
        TPTConfig(selection=0.0)
    with pytest.raises(ValueError, match="--tpt-tune"):
        TPTConfig(tune="deep")
    assert math.isclose(TPTConfig().lr, 5e-3) and TPTConfig().n_views == 64
