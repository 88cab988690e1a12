"""Issue 17 item 3: every result records GFLOPs per image, counted on the real calls by part.

The expected figures are counted here part by part, each with :func:`protext.flops.count_flops` on
the real modules the run used (the image encoder on V views, the tuner's text forwards, the backward
through the text tower) or written from the shapes (the method's logits), and compared with the
integer FLOPs the result records: exactly, since FLOP counts are integers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import protext.evaluation.loop as loop
from protext.evaluation import EvalConfig, evaluate
from protext.evaluation.cost import flops_record
from protext.flops import PARTS, PartCounter, count_flops, counted_as, image_tower_gflops, once_per_run
from synthetic_datasets import noise_folder

NAMES = ["ant", "bee", "cow", "doe", "elk"]
#: the options the folder dataset needs (it has no published values), as tests/test_evaluation_tta2.py
NEEDS = {
    "tda": {"tda_alpha": 2.0, "tda_beta": 5.0},
    "dpe": {"dpe_alpha": 6.0, "dpe_beta": 5.0, "dpe_lr_text": 6e-4, "dpe_lr_image": 6e-4, "dpe_align": 0.5},
    "boost": {"tda_alpha": 2.0, "tda_beta": 5.0, "boost_delta": 1},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("cost"), NAMES, per_class=2, seed=17, shape=(36, 44))


def run(folder: Path, out: Path, clip, **settings) -> dict:
    base = dict(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0, progress=False,
                out=str(out))
    options = NEEDS.get(settings.get("tta") or "", {})
    return evaluate(EvalConfig(**{**base, **settings}, tta_options=options or None), clip=clip)


def test_the_parts_of_a_counter_add_up_and_follow_the_marked_calls():
    tower, head = nn.Linear(6, 5), nn.Linear(5, 3)

    @counted_as("text")
    def text(x):
        return tower(x)

    @once_per_run
    def reused(x):
        return text(x)

    x = torch.randn(4, 6)
    with PartCounter() as counter:
        loss = head(text(x)).sum()
        loss.backward()
        reused(x)
    linear = 2 * 4 * 6 * 5
    assert counter.per_call["text_forward"] == linear
    assert counter.per_call["method"] == 2 * 4 * 5 * 3
    # backward: the head's input and weight gradients are the method's; then the tower's weight
    # gradient (its input needs none) is the text tower's
    assert counter.per_call["method_backward"] == 2 * (2 * 4 * 5 * 3)
    assert counter.per_call["text_backward"] == 2 * 4 * 6 * 5
    assert counter.once["text_forward"] == linear and sum(counter.once.values()) == linear
    assert sum(counter.per_call.values()) + sum(counter.once.values()) == counter.get_total_flops()
    with PartCounter():
        with pytest.raises(RuntimeError, match="do not nest"):
            PartCounter().__enter__()


def _stash_adapters(monkeypatch) -> list:
    """The adapters the evaluation builds, kept so the test can count their parts by hand."""
    built = []
    real = loop.build_adapter

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_adapter", build)
    return built


def test_a_tpt_step_is_views_times_the_image_tower_plus_the_text_forwards_and_backward(tiny_clip, folder, tmp_path, monkeypatch):
    views = 8
    built = _stash_adapters(monkeypatch)
    result = run(folder, tmp_path / "tpt.json", tiny_clip, tta="tpt", tta_views=views, limit=3)
    (counts,) = result["timing"]["flops"]["counts"]
    tuner = built[0].tuner
    n_classes, dim = tuner.encoder.tokens.shape[0], tiny_clip.model.text_projection.shape[1]
    size = result["timing"]["flops"]["image_tower_check"]["resolution"]

    one_view = count_flops(tuner.image_encoder, torch.zeros(1, 3, size, size))
    image = count_flops(tuner.image_encoder, torch.zeros(views, 3, size, size))
    assert image == views * one_view
    fast_text = count_flops(tuner._text_fast)  # no gradient: the initial features and the prediction's
    grad = torch.randn(n_classes, dim)
    with_grad, backward = 0, 0
    for chunk in tuner.chunks:  # the step's second pass: each class batch re-encoded with gradient, then backward
        feats = []
        with_grad += count_flops(lambda: feats.append(tuner._encode(chunk, True)))
        backward += count_flops(lambda: feats[0].backward(grad[chunk]))
    logits = 2 * views * dim * n_classes  # the step's logits of every view
    predict = 2 * 1 * dim * n_classes  # view 0's under the tuned prompts
    logits_backward = 2 * views * dim * n_classes  # dL/d(text features) from the step's logits

    assert counts["images"] == 1
    assert counts["per_images"] == {"image_tower": image, "image_tower_backward": 0, "text_forward": with_grad + fast_text,
                                    "text_backward": backward, "method": logits + predict, "method_backward": logits_backward}
    assert counts["once"] == {**dict.fromkeys(PARTS, 0), "text_forward": fast_text}  # the initial features, once
    flops = result["timing"]["flops"]
    assert flops["image_tower_check"]["views_encoded_per_image"] == views
    expected = (image + with_grad + fast_text + backward + logits + predict + logits_backward) / 1e9 + fast_text / 3 / 1e9
    assert flops["gflops_per_image"] == pytest.approx(expected, rel=1e-12)


def test_zero_shot_per_image_is_the_image_tower_and_the_class_features_are_spread(tiny_clip, folder, tmp_path, monkeypatch):
    result = run(folder, tmp_path / "zs.json", tiny_clip, batch_size=4, limit=6)
    flops = result["timing"]["flops"]
    (counts,) = flops["counts"]
    one_image = round(image_tower_gflops(tiny_clip.model, flops["image_tower_check"]["resolution"]) * 1e9)
    n_classes, dim = len(NAMES), tiny_clip.model.text_projection.shape[1]
    assert counts["images"] == 4  # the first batch
    assert counts["per_images"]["image_tower"] == 4 * one_image
    assert counts["per_images"]["method"] == 4 * 2 * dim * n_classes  # the logits
    assert sum(counts["per_images"].values()) == 4 * (one_image + 2 * dim * n_classes)
    assert flops["per_image"]["image_tower"] * 1e9 == pytest.approx(one_image, rel=1e-12)
    assert flops["image_tower_check"]["views_encoded_per_image"] == 1
    assert counts["once"]["text_forward"] > 0 and flops["images_in_result"] == 6
    assert flops["once_per_image"]["text_forward"] == pytest.approx(counts["once"]["text_forward"] / 6 / 1e9)


def _methods() -> list[str]:
    from protext.tta import registry

    return [name for name in registry.names() if name != "dmn-oracle"]  # the oracle runs dmn's stream


@pytest.mark.parametrize("tta", [None, *_methods()])
def test_every_result_carries_gflops_per_image_beside_seconds_memory_and_device(tiny_clip, folder, tmp_path, tta):
    out = tmp_path / "r.json"
    result = run(folder, out, tiny_clip, **({"tta": tta, "tta_views": 6} if tta else {}), limit=2)
    written = json.loads(out.read_text())
    for timing in (result["timing"], written["timing"]):
        flops = timing["flops"]
        assert timing["gflops_per_image"] == flops["gflops_per_image"] > 0
        assert timing["seconds_per_image"] > 0 and timing["peak_memory"]["mib"] > 0 and timing["device"]
        assert flops["images_counted"] >= 1 and "first batch" in flops["rule"]
        assert set(flops["per_image"]) == set(PARTS)
        views = flops["image_tower_check"]["views_encoded_per_image"]
        assert views == (1 if tta is None else result["tta"]["settings"]["views"])
    if tta in ("tpt", "ctpt", "otpt"):
        assert result["timing"]["flops"]["per_image"]["text_backward"] > 0


def test_a_path_that_counts_nothing_says_so(tiny_clip):
    record = flops_record([None], 10, tiny_clip.model, "tiny-clip")
    assert record["gflops_per_image"] is None and "does not count" in record["note"]


def test_the_published_profile_is_beside_the_count_for_vit_b16():
    import warnings

    import open_clip

    from protext.evaluation.cost import tower_checks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokens, width = 197, 768  # by hand: patches, 12 blocks (QKV, scores and mix, out, MLP), projection
    blocks = 12 * (2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
                   + 2 * 2 * tokens * width * 4 * width)
    one_view = 2 * 196 * (3 * 16 * 16) * width + blocks + 2 * width * 512
    checks = tower_checks(model, "ViT-B-16", 3 * 64 * one_view, 3)
    assert checks["image_tower_check"]["gflops_per_view"] * 1e9 == pytest.approx(one_view, rel=1e-12)
    image = checks["image_tower_check"]
    assert image["published_gflops"] == 35.13 and abs(image["relative_difference"]) < 0.01
    assert image["views_encoded_per_image"] == 64
    assert checks["text_tower_check"]["published_gflops"] == 5.96
    assert abs(checks["text_tower_check"]["relative_difference"]) < 0.01
