"""FLOP counts on real calls, against counts by hand and open_clip's published profile.

Every expected figure is arithmetic written here from the layer shapes (2 FLOPs per multiply-add),
never protext's own formulas; the ViT-B/16 figures are also compared with open_clip's
docs/model_profile.csv (image_gflops 35.13, text_gflops 5.96) within 1 %.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from protext.flops import FLOPS_PER_MAC, PUBLISHED_GFLOPS, count_flops, image_tower_gflops
from protext.text_tower import text_gflops


def vit_image_flops_by_hand(
    size: int = 224, patch: int = 16, width: int = 768, mlp: int = 3072, layers: int = 12, embed: int = 512
) -> int:
    patches = (size // patch) ** 2
    tokens = patches + 1  # the class token
    embedding = 2 * patches * (3 * patch * patch) * width
    qkv = 2 * tokens * width * 3 * width
    attention = 2 * 2 * tokens * tokens * width  # Q·Kᵀ and A·V over all heads
    out = 2 * tokens * width * width
    ffn = 2 * 2 * tokens * width * mlp
    projection = 2 * width * embed  # the class token only
    return embedding + layers * (qkv + attention + out + ffn) + projection


def clip_text_flops_by_hand(tokens: int, width: int = 512, layers: int = 12) -> int:
    qkv = 2 * tokens * width * 3 * width
    attention = 2 * 2 * tokens * tokens * width  # the full square, causal mask or not
    out = 2 * tokens * width * width
    ffn = 2 * 2 * tokens * width * 4 * width
    projection = 2 * width * 512  # the end-of-text token only
    return layers * (qkv + attention + out + ffn) + projection


@pytest.fixture(scope="module")
def vit_b16():
    import open_clip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def test_a_flop_is_half_a_multiply_add_and_the_profile_is_typed_in():
    assert FLOPS_PER_MAC == 2
    assert PUBLISHED_GFLOPS["ViT-B-16"] == {"image": 35.13, "text": 5.96}


def test_linear_counted_exactly_forward_and_backward():
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    assert count_flops(lin, x) == 2 * 4 * 5 * 3  # 60 multiply-adds; the bias add is not counted
    assert count_flops(nn.Linear(5, 3, bias=False), x) == 120

    def step(inp):
        lin(inp).sum().backward()

    # backward: grad of the weight (3x4 @ 4x5), plus grad of the input (4x3 @ 3x5) when it needs one
    assert count_flops(step, x) == 120 + 120
    assert count_flops(step, x.clone().requires_grad_()) == 120 + 120 + 120


def test_conv_counted_exactly():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    assert count_flops(conv, torch.ones(2, 3, 16, 16)) == 2 * 2 * (4 * 4) * 8 * (3 * 4 * 4)


def test_keyword_arguments_are_passed():
    assert count_flops(F.linear, torch.ones(2, 3), weight=torch.ones(4, 3)) == 2 * 2 * 3 * 4


def test_fused_multi_head_attention_is_counted():
    # inference on a batch-first nn.MultiheadAttention takes the fused fast path, which the stock
    # counter leaves at zero; protext's count equals the decomposed path's and the count by hand
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    hand = 2 * 2 * 5 * 16 * 48 + 2 * 2 * 2 * 5 * 5 * 16 + 2 * 2 * 5 * 16 * 16
    with torch.no_grad():
        stock = FlopCounterMode(display=False)
        with stock:
            mha(x, x, x, need_weights=False)
        assert stock.get_total_flops() < hand  # the gap this module closes
        assert count_flops(mha, x, x, x, need_weights=False) == hand
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert count_flops(mha, x, x, x, need_weights=False) == hand
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert count_flops(mha, x, x, x, need_weights=False) == hand  # with grad: no fast path


def test_cross_attention_counts_key_and_value_length():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q, kv = torch.randn(1, 3, 8), torch.randn(1, 7, 8)
    hand = 2 * 3 * 8 * 8 + 2 * 2 * 7 * 8 * 8 + 2 * 3 * 7 * 8 * 2 + 2 * 3 * 8 * 8
    with torch.no_grad():
        assert count_flops(mha, q, kv, kv, need_weights=False) == hand
    assert count_flops(mha, q, kv, kv, need_weights=False) == hand


def test_cpu_attention_forward_and_backward_counted():
    b, h, n, d = 2, 3, 6, 4
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    one_product = 2 * b * h * n * n * d
    assert count_flops(F.scaled_dot_product_attention, q, k, v) == 2 * one_product

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    # backward: scores recomputed, then grad of the scores, V, Q and K: five products
    assert count_flops(step) == 2 * one_product + 5 * one_product


@pytest.mark.slow
def test_vit_b16_image_tower_matches_the_published_profile(vit_b16):
    hand = vit_image_flops_by_hand()
    assert hand == 35_126_906_880
    got = image_tower_gflops(vit_b16)
    assert got * 1e9 == hand
    assert abs(got - PUBLISHED_GFLOPS["ViT-B-16"]["image"]) / 35.13 < 0.01
    # the same count whichever attention kernel runs: fused (no grad), SDPA (grad), fast path off
    image = torch.ones(1, 3, 224, 224)
    assert count_flops(vit_b16.visual, image) == hand


def test_tiny_image_tower_counted_exactly_on_every_kernel(tiny_clip):
    # tiny-clip: 224 px, patch 32, width 64, 2 layers, MLP 256, embedding 32
    hand = vit_image_flops_by_hand(patch=32, width=64, mlp=256, layers=2, embed=32)
    assert hand == 30_382_080
    model = tiny_clip.model
    assert image_tower_gflops(model) * 1e9 == hand  # no grad: the fused attention
    assert image_tower_gflops(model.visual) * 1e9 == hand  # the tower itself
    assert count_flops(model.visual, torch.ones(1, 3, 224, 224)) == hand  # grad: SDPA
    assert count_flops(model.visual, torch.ones(3, 3, 224, 224)) == 3 * hand
    assert image_tower_gflops(model, resolution=224) * 1e9 == hand


@pytest.mark.slow
def test_vit_b16_text_prompt_matches_the_published_profile(vit_b16):
    got = text_gflops(vit_b16)
    assert got * 1e9 == clip_text_flops_by_hand(77) == 5_959_540_736
    assert abs(got - PUBLISHED_GFLOPS["ViT-B-16"]["text"]) / 5.96 < 0.01
    assert text_gflops(vit_b16, None) == got
    # protext stops the tower at the end-of-text token: a 20-token prompt costs its 20 positions
    assert text_gflops(vit_b16, 20) * 1e9 == clip_text_flops_by_hand(20)
    assert text_gflops(vit_b16, 1) * 1e9 == clip_text_flops_by_hand(1)
    # the real call through open_clip costs the same as protext's for a full-length prompt
    with torch.no_grad():
        tokens = torch.ones(1, 77, dtype=torch.long)
        assert count_flops(vit_b16.encode_text, tokens) == clip_text_flops_by_hand(77)


def test_text_gflops_refuses_a_prompt_longer_than_the_context(tiny_clip):
    model = tiny_clip.model
    for n in (0, 10_000):
        with pytest.raises(ValueError, match="n_tokens must be in 1.."):
            text_gflops(model, n)
    assert text_gflops(model, 3) < text_gflops(model, None)
