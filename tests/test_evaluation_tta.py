"""Issue 10 through the evaluation loop: every TTA method on every kind of class features, online
streams (seeded order, several seeds, resume through the adapter's state, refused under torchrun),
batched adaptation, the ensemble features, and the flags that change an outcome."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import protext.evaluation.loop as loop
from protext.checkpoint import save_prompts
from protext.distributed import DistContext
from protext.errors import UserError
from protext.evaluation import EvalConfig, evaluate
from protext.prompts import PromptedTextEncoder
from synthetic_datasets import noise_folder

NAMES = ["ant", "bee", "cow", "doe", "elk", "fox", "gnu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """7 classes x 2 noise images (top-5 is not trivially 100 with 7 classes)."""
    return noise_folder(tmp_path_factory.mktemp("tta"), NAMES, per_class=2, seed=11, shape=(36, 44))


def run(folder: Path, out: Path, clip, **settings) -> dict:
    base = dict(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0, progress=False,
                save_logits=True, out=str(out))
    return evaluate(EvalConfig(**{**base, **settings}), clip=clip)


def logits(result: dict) -> torch.Tensor:
    return torch.tensor(result["predictions"]["logits"])


@pytest.fixture(scope="module")
def inputs(tiny_clip, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    desc = folder / "d.jsonl"
    desc.write_text("".join(json.dumps({"classname": c, "description": f"a {c} in the wild, view {k}."}) + "\n" for c in NAMES for k in range(2)))
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=2)
    ckpt = folder / "p.safetensors"
    save_prompts(ckpt, encoder)
    return {"descriptions": str(desc), "prompts": str(ckpt)}


@pytest.mark.parametrize("tta", ["tpt", "ctpt", "zero", "tda", "mta"])
@pytest.mark.parametrize("method", ["clip", "cupl", "prompts"])
def test_every_method_on_every_kind_of_class_features(tiny_clip, folder, inputs, tmp_path, tta, method):
    if tta in ("tpt", "ctpt") and method == "cupl":
        with pytest.raises(UserError, match="--method cupl has none"):
            run(folder, tmp_path / "r.json", tiny_clip, method=method, tta=tta, tta_views=4, **{k: v for k, v in inputs.items() if k == "descriptions"})
        return
    extra = {"descriptions": inputs["descriptions"]} if method == "cupl" else {"prompts": inputs["prompts"]} if method == "prompts" else {}
    views = {"tda": 1}.get(tta, 8)
    tda = {"tda_alpha": 2.0, "tda_beta": 5.0} if tta == "tda" else {}
    result = run(folder, tmp_path / "r.json", tiny_clip, method=method, tta=tta, tta_views=views, limit=5, **extra, **tda)
    assert result["method"] == f"{method} + {tta.upper()}" and result["metrics"]["n_images"] == 5
    assert result["tta"]["method"] == tta and result["tta"]["settings"]["views"] == views
    for key in ("ece", "acc1", "acc5", "mean_per_class_recall"):
        assert key in result["metrics"]
    assert result["timing"]["seconds_per_image"] > 0 and result["timing"]["peak_memory"]["mib"] > 0
    assert (tmp_path / "r.reliability.png").exists()


def test_ctpt_with_lambda_zero_is_tpt(tiny_clip, folder, tmp_path):
    tpt = run(folder, tmp_path / "tpt.json", tiny_clip, tta="tpt", tta_views=8, limit=4)
    zero = run(folder, tmp_path / "ctpt0.json", tiny_clip, tta="ctpt", tta_views=8, limit=4, ctpt_lambda=0.0)
    fifty = run(folder, tmp_path / "ctpt.json", tiny_clip, tta="ctpt", tta_views=8, limit=4)
    torch.testing.assert_close(logits(zero), logits(tpt), atol=1e-6, rtol=0)
    assert fifty["tta"]["settings"]["ctpt_lambda"] == 50.0
    assert not torch.allclose(logits(fifty), logits(tpt), atol=1e-5)


def test_tta_batch_gives_the_same_predictions_as_one_at_a_time(tiny_clip, folder, tmp_path):
    for tta in ("tpt", "zero"):
        one = run(folder, tmp_path / f"{tta}1.json", tiny_clip, tta=tta, tta_views=8)
        three = run(folder, tmp_path / f"{tta}3.json", tiny_clip, tta=tta, tta_views=8, tta_batch=3)
        assert three["predictions"]["topk"] == one["predictions"]["topk"]
        torch.testing.assert_close(logits(three), logits(one), atol=1e-5, rtol=0)


def test_flags_that_change_a_tta_outcome(tiny_clip, folder, tmp_path):
    plain = run(folder, tmp_path / "a.json", tiny_clip, tta="tpt", tta_views=8, limit=4)
    no_augmix = run(folder, tmp_path / "b.json", tiny_clip, tta="tpt", tta_views=8, limit=4, augmix=False)
    assert plain["tta"]["settings"]["augmix"] is True and no_augmix["tta"]["settings"]["augmix"] is False
    assert not torch.allclose(logits(plain), logits(no_augmix), atol=1e-5)
    select = run(folder, tmp_path / "c.json", tiny_clip, tta="tpt", tta_views=8, limit=4, tta_selection=0.5)
    assert not torch.allclose(logits(plain), logits(select), atol=1e-5)
    hard = run(folder, tmp_path / "d.json", tiny_clip, tta="zero", tta_views=16, limit=4)
    soft = run(folder, tmp_path / "e.json", tiny_clip, tta="zero", tta_views=16, limit=4, zero_votes="fp16")
    assert hard["tta"]["settings"]["zero_votes"] == "hard" and soft["tta"]["settings"]["zero_votes"] == "fp16"
    assert not torch.equal(logits(hard), logits(soft))  # soft votes are not whole numbers
    weak = run(folder, tmp_path / "f.json", tiny_clip, tta="tda", tta_views=1, tda_alpha=0.0, tda_beta=5.0)
    strong = run(folder, tmp_path / "g.json", tiny_clip, tta="tda", tta_views=1, tda_alpha=50.0, tda_beta=1.0)
    assert not torch.allclose(logits(weak), logits(strong), atol=1e-4)


def test_ensemble_features_are_the_seven_templates_averaged(tiny_clip, folder, tmp_path):
    from protext.tta.zero import ENSEMBLE_TEMPLATES

    result = run(folder, tmp_path / "r.json", tiny_clip, method="ensemble", limit=3)
    assert result["template"]["templates"] == list(ENSEMBLE_TEMPLATES) and len(ENSEMBLE_TEMPLATES) == 7
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    with torch.no_grad():
        per_class = []
        for name in NAMES:
            feats = F.normalize(model.encode_text(tok([t.format(name) for t in ENSEMBLE_TEMPLATES])), dim=-1)
            per_class.append(F.normalize(feats.mean(0), dim=-1))
        text = torch.stack(per_class)
        paths = [folder / "ant" / "0.png", folder / "ant" / "1.png", folder / "bee" / "0.png"]
        img = F.normalize(model.encode_image(torch.stack([tiny_clip.preprocess(Image.open(p).convert("RGB")) for p in paths])), dim=-1)
    torch.testing.assert_close(logits(result), model.logit_scale.exp() * img @ text.t(), atol=1e-5, rtol=0)
    zero = run(folder, tmp_path / "z.json", tiny_clip, method="ensemble", tta="zero", tta_views=8, limit=3)  # ZERO+Ensemble
    assert zero["method"] == "ensemble + ZERO" and zero["template"]["templates"] == list(ENSEMBLE_TEMPLATES)


def _reference_stream(clip, folder: Path, order: list[int], alpha: float, beta: float) -> torch.Tensor:
    """TDA over ``order`` driven by hand through the library: the stream the loop must reproduce."""
    from protext.tta import TTAConfig, build_adapter, view_maker
    from protext.tta.tpt import image_generator
    from protext.tta.views import model_preprocess_cfg
    from protext.zeroshot import clip_text_features

    config = TTAConfig(method="tda", views=1, tda_alpha=alpha, tda_beta=beta)
    text = clip_text_features(clip.model, clip.tokenizer, NAMES, "a photo of a {}.")
    adapter = build_adapter(config, clip.model, "folder", text_features=text)
    make = view_maker(config, "folder", model_preprocess_cfg(clip.model))
    paths = [folder / n / f"{i}.png" for n in NAMES for i in range(2)]
    out = torch.zeros(len(paths), len(NAMES))
    for index in order:
        out[index] = adapter.adapt(make(Image.open(paths[index]).convert("RGB"), generator=image_generator(0, index))).logits
    return out


def test_tda_streams_are_seeded_permutations_with_mean_and_spread(tiny_clip, folder, tmp_path):
    result = run(folder, tmp_path / "r.json", tiny_clip, tta="tda", tta_views=1, tda_alpha=3.0, tda_beta=2.0, stream_seeds=[1, 2])
    streams = result["streams"]
    assert streams["seeds"] == [1, 2] and len(streams["per_seed"]) == 2
    orders = [loop.stream_order(14, seed) for seed in (1, 2)]
    assert sorted(orders[0]) == list(range(14)) and orders[0] != orders[1]
    for seed_result, order in zip(streams["per_seed"], orders):
        assert seed_result["first_indices"] == order[:10]
        want = _reference_stream(tiny_clip, folder, order, 3.0, 2.0)
        torch.testing.assert_close(torch.tensor(seed_result["predictions"]["logits"]), want, atol=1e-5, rtol=0)
    top1 = [s["metrics"]["top1"] for s in streams["per_seed"]]
    assert result["metrics"]["top1"] == pytest.approx(sum(top1) / 2)
    assert streams["summary"]["top1"]["std"] == pytest.approx(float(np.std(top1, ddof=1)))


def test_tda_stream_resumes_through_the_adapter_state(tiny_clip, folder, tmp_path, monkeypatch):
    settings = dict(tta="tda", tta_views=1, tda_alpha=3.0, tda_beta=2.0, stream_seeds=[4])
    whole = run(folder, tmp_path / "whole.json", tiny_clip, **settings)
    monkeypatch.setattr(loop, "STATE_EVERY", 5)
    real = loop._adapt
    calls = [0]

    def stop_after_12(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_adapt", stop_after_12)
    with pytest.raises(KeyboardInterrupt):
        run(folder, tmp_path / "r.json", tiny_clip, **settings)
    assert list(tmp_path.glob("r.json.resume-*.stream4.state.pt"))
    calls[0] = -100  # no more interruptions; count from here
    resumed = run(folder, tmp_path / "r.json", tiny_clip, **settings)
    assert calls[0] == -100 + 14 - 10  # continued from the state saved after 10 images
    assert resumed["streams"]["per_seed"][0]["resumed_at"] == 10
    assert resumed["streams"]["per_seed"][0]["predictions"] == whole["streams"]["per_seed"][0]["predictions"]
    assert resumed["metrics"] == whole["metrics"]
    assert not list(tmp_path.glob("r.json.resume-*"))


def test_online_method_refused_under_torchrun(folder, tmp_path):
    config = EvalConfig(dataset="folder", root=str(folder), tta="tda", tda_alpha=2.0, tda_beta=5.0, out=str(tmp_path / "r.json"))
    with pytest.raises(UserError, match="--tta tda adapts online.*one process"):
        loop.prepare(config, DistContext(rank=0, world_size=2))


def test_tda_without_published_pair_names_our_flags(folder, tmp_path):
    config = EvalConfig(dataset="folder", root=str(folder), tta="tda", out=str(tmp_path / "r.json"))
    with pytest.raises(UserError, match="--tda-alpha and --tda-beta"):
        loop.prepare(config, DistContext())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="go together"):
            EvalConfig(dataset="folder", root=".", tta="tda", tda_alpha=1.0).validate()
