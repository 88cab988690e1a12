"""Issue 19 through the evaluation loop: the five newer methods run from ``eval`` on the class
features they take, DMN-ZS's oracle variant says what it is, the templates+descriptions features
are one mean, and a bad option is one line naming the flag before torch loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_error_line_before_torch
from protext.evaluation import EvalConfig, evaluate
from synthetic_datasets import noise_folder

NAMES = ["ant", "bee", "cow", "doe", "elk"]
#: the options the folder dataset needs (it has no published values)
NEEDS = {
    "dpe": {"dpe_alpha": 6.0, "dpe_beta": 5.0, "dpe_lr_text": 6e-4, "dpe_lr_image": 6e-4, "dpe_align": 0.5},
    "boost": {"tda_alpha": 2.0, "tda_beta": 5.0, "boost_delta": 1},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("tta2"), NAMES, per_class=3, seed=5, shape=(40, 48))


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("d") / "d.jsonl"
    path.write_text("".join(json.dumps({"classname": c, "description": f"a {c} seen from afar, number {k}."}) + "\n"
                            for c in NAMES for k in range(2)))
    return str(path)


def run(folder: Path, out: Path, clip, tta: str, **settings) -> dict:
    base = dict(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0, progress=False,
                save_logits=True, out=str(out), tta=tta, tta_views=settings.pop("tta_views", 8))
    options = {**NEEDS.get(tta, {}), **settings.pop("tta_options", {})}
    return evaluate(EvalConfig(**{**base, **settings}, tta_options=options or None), clip=clip)


@pytest.mark.parametrize("tta", ["dmn", "dmn-oracle", "dpe", "boost", "otpt", "tps"])
def test_every_new_method_runs_from_eval_and_records_its_settings(tiny_clip, folder, descriptions, tmp_path, tta):
    features = {"method": "template+cupl", "descriptions": descriptions} if tta != "otpt" else {}
    result = run(folder, tmp_path / "r.json", tiny_clip, tta, **features)
    settings = result["tta"]["settings"]
    assert result["tta"]["method"] == tta and settings["views"] == 8 and result["metrics"]["n_images"] == 15
    for name, value in NEEDS.get(tta, {}).items():
        assert settings[name] == value
    if tta.startswith("dmn"):
        assert settings["dmn_memory"] == 50 and settings["dmn_beta"] == 5.5 and settings["crop_scale"] == [0.5, 1.0]
    if tta == "otpt":
        assert settings["otpt_lambda"] == 18.0 and result["tta"]["init"] == "handcrafted"
    assert ("oracle" in result["tta"]) == (tta == "dmn-oracle")
    assert result["timing"]["seconds_per_image"] > 0


def test_the_oracle_rescored_the_fixed_beta2_stream_with_the_best_weight_on_the_labels(tiny_clip, folder, descriptions, tmp_path):
    """The memory is written from the text pseudo-label, so the stream does not depend on beta2: the
    oracle's predictions are the fixed-beta2 run's probabilities fused with the beta2 the labels liked
    best (the first of equal maxima, in the published candidate order)."""
    features = {"method": "template+cupl", "descriptions": descriptions}
    oracle = run(folder, tmp_path / "o.json", tiny_clip, "dmn-oracle", **features)
    chosen = oracle["streams"]["per_seed"][0]["oracle"]
    candidates = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    assert chosen["candidates"] == list(candidates) and "test labels" in chosen["selected_on"]
    by_beta2 = {}
    for beta2 in (candidates[0], chosen["beta2"]):
        fixed = run(folder, tmp_path / f"f{beta2}.json", tiny_clip, "dmn", **features, tta_options={"dmn_beta2": beta2})
        by_beta2[beta2] = fixed
    best = by_beta2[chosen["beta2"]]
    assert [k[0] for k in oracle["predictions"]["topk"]] == [k[0] for k in best["predictions"]["topk"]]
    assert abs(chosen["top1_at_beta2"] - 100.0 * best["metrics"]["acc1"]) < 1e-6
    assert best["metrics"]["acc1"] >= by_beta2[candidates[0]]["metrics"]["acc1"]


def test_templates_and_descriptions_are_one_mean(tiny_clip, folder, descriptions, tmp_path):
    """norm(mean of the normalised features of every template and every description of a class),
    encoded here one text at a time."""
    from protext.evaluation import features as feats

    config = EvalConfig(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random",
                        method="template+cupl", descriptions=descriptions, template="a photo of a {}.")
    lines = [json.loads(line) for line in Path(descriptions).read_text().splitlines()]
    got = feats.class_features(config, tiny_clip, NAMES, "a photo of a {}.", None,
                               feats.read_description_source(descriptions))
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    for label, name in enumerate(NAMES):
        texts = [f"a photo of a {name}."] + [d["description"] for d in lines if d["classname"] == name]
        with torch.no_grad():
            each = torch.cat([F.normalize(model.encode_text(tokenizer([t])).float(), dim=-1) for t in texts])
        want = F.normalize(each.mean(0), dim=-1)
        torch.testing.assert_close(got[label].cpu(), want, rtol=1e-5, atol=1e-5)


BAD = [
    (["--tta", "tda", "--dpe-lr-text", "1e-3"], "--dpe-lr-text"),
    (["--tta", "dmn", "--dmn-beta", "0"], "--dmn-beta"),
    (["--tta", "dmn", "--dmn-memory", "0"], "--dmn-memory"),
    (["--tta", "dmn-oracle", "--dmn-beta2", "2"], "--dmn-beta2"),
    (["--tta", "boost", "--boost-delta", "-1"], "--boost-delta"),
    (["--tta", "otpt", "--otpt-lambda", "nan"], "--otpt-lambda"),
    (["--tta", "tps", "--tta-lr", "0"], "--tta-lr"),
    (["--tta", "zero", "--otpt-lambda", "2"], "--otpt-lambda"),
    (["--method", "ensemble+cupl"], "--descriptions"),
    (["--dpe-align", "0.2"], "--dpe-align"),
    (["--tta", "dmn-oracle", "--stream-runs", "3"], "--stream-runs: --tta dmn-oracle picks beta2 on the test labels"),
    (["--tta", "dmn-oracle", "--scenario", "low"], "--scenario: --tta dmn-oracle picks beta2 on the test labels"),
]


def test_bad_options_are_one_line_naming_the_flag_before_torch(tmp_path):
    assert_one_error_line_before_torch(tmp_path, BAD)


def test_a_published_default_missing_for_the_dataset_names_the_flags(tmp_path):
    from protext.tta import registry

    with pytest.raises(registry.TTAConfigError, match="--dpe-alpha"):
        registry.resolve("dpe", {}, registry.context("my_folder"))
    with pytest.raises(registry.TTAConfigError, match="--tda-alpha and --tda-beta"):
        registry.resolve("boost", {}, registry.context("my_folder"))
    dpe = registry.resolve("dpe", {}, registry.context("ImageNet-A"))
    assert (dpe.dpe_alpha, dpe.dpe_beta, dpe.dpe_lr_text, dpe.dpe_align, dpe.views, dpe.augmix) == (6.0, 5.0, 3e-4, 2.5, 64, True)
    assert registry.resolve("dpe", {}, registry.context("dtd")).views == 1
    boost = registry.resolve("boost", {}, registry.context("imagenet_r"))
    assert (boost.tda_alpha, boost.tda_beta, boost.boost_delta, boost.boost_query, boost.views) == (1.0, 8.0, 3, "selected", 64)
    assert registry.resolve("boost", {}, registry.context("imagenet")).views == 1
    assert registry.resolve("otpt", {}, registry.context("imagenet_v2")).otpt_lambda == 2.0


def test_one_pass_gives_every_method_its_own_run(tiny_clip, folder, descriptions, tmp_path):
    """zero, tda, mta, dmn and boost share one encoding per view recipe (dmn's crops differ): each
    method's predictions equal its single-method run's, and each result says it was shared."""
    from conftest import assert_same_results
    from protext.evaluation import evaluate_many

    base = dict(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0, progress=False,
                save_logits=True, tta_views=8, method="template+cupl", descriptions=descriptions)
    many = evaluate_many(EvalConfig(**base, tta="zero,tda,mta,dmn,boost", out=str(tmp_path / "pass.json"), tda_alpha=2.0,
                                    tda_beta=5.0, tta_options={"boost_delta": 1, "dmn_memory": 4}), clip=tiny_clip)
    assert list(many) == ["zero", "tda", "mta", "dmn", "boost"]
    for name, shared in many.items():
        assert (tmp_path / f"pass-{name}.json").exists() and shared["tta"]["shared_pass"]["methods"] == list(many)
        options = {"boost": {"boost_delta": 1}, "dmn": {"dmn_memory": 4}}.get(name)
        pair = {"tda_alpha": 2.0, "tda_beta": 5.0} if name in ("tda", "boost") else {}
        alone = evaluate(EvalConfig(**base, **pair, tta=name, out=str(tmp_path / f"alone-{name}.json"), tta_options=options),
                         clip=tiny_clip)
        assert alone["tta"]["settings"] == shared["tta"]["settings"]
        assert alone["predictions"]["topk"] == shared["predictions"]["topk"], name
        assert shared["timing"]["flops"]["per_image"] == pytest.approx(alone["timing"]["flops"]["per_image"]), name
        assert_same_results(shared["predictions"]["logits"], alone["predictions"]["logits"], where=name)


@pytest.mark.parametrize("tta", ["dmn", "dmn-oracle", "dpe", "boost"])
def test_online_methods_and_the_oracle_are_refused_under_torchrun(folder, tmp_path, no_model, tta):
    """One ordered stream cannot be split over ranks; the oracle's choice needs the whole stream too."""
    import protext.evaluation.loop as loop
    from protext.distributed import DistContext
    from protext.errors import UserError

    options = NEEDS.get(tta)
    config = EvalConfig(dataset="folder", root=str(folder), tta=tta, out=str(tmp_path / "r.json"), tta_options=options)
    with pytest.raises(UserError, match=f"--tta {tta} adapts online.*one process"):
        loop.prepare(config, DistContext(rank=0, world_size=2))


def test_a_pass_of_several_methods_refuses_what_it_cannot_do(folder, tmp_path):
    from protext.errors import UserError

    base = dict(dataset="folder", root=str(folder), out=str(tmp_path / "r.json"))
    for tta, extra, flag in [("zero,otpt", {}, "otpt tunes prompts"), ("zero,zero", {}, "name each method once"),
                             ("zero,mta", {"tta_batch": 2}, "--tta-batch"), ("zero,tda", {"stream_seeds": [1, 2]}, "--stream-seeds"),
                             ("zero,mta", {"tta_options": {"dpe_align": 0.1}}, "--dpe-align")]:
        with pytest.raises(UserError, match=flag):
            EvalConfig(**base, tta=tta, **extra).validate()
    with pytest.raises(UserError, match="evaluate_many"):
        evaluate(EvalConfig(**base, tta="zero,mta"))


def test_tps_prototypes_are_the_two_means_averaged(tiny_clip, folder, tmp_path):
    """TPS's published prototypes by hand: the mean of the 80 templates' normalised features and the
    mean of the descriptor sentences' (TPS's rule written out here), averaged, then normalised."""
    import open_clip

    from protext.evaluation import features as feats

    descriptors = {"ant": ["antennae", "has six legs"], "bee": ["used for honey", "stripes"], "cow": ["a large mammal"],
                   "doe": ["often brown"], "elk": ["can be huge", "spots"]}
    sentence = {"antennae": "which is antennae", "has six legs": "which has six legs", "used for honey": "which is used for honey",
                "stripes": "which has stripes", "a large mammal": "which is a large mammal", "often brown": "which often brown",
                "can be huge": "which can be huge", "spots": "which has spots"}
    config = EvalConfig(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random",
                        method="ensemble80+descriptors", descriptions="d.json")
    got = feats.class_features(config, tiny_clip, NAMES, "a photo of a {}.", None, descriptors)
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer

    def mean(texts):
        with torch.no_grad():
            return torch.cat([F.normalize(model.encode_text(tokenizer([t])).float(), dim=-1) for t in texts]).mean(0)

    for label, name in enumerate(NAMES):
        a = mean([t(name) if callable(t) else t.format(name) for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES])
        d = mean([f"{name}, {sentence[x]}" for x in descriptors[name]])
        torch.testing.assert_close(got[label].cpu(), F.normalize((a + d) / 2, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no descriptors for 1 of 5"):
        feats.class_features(config, tiny_clip, NAMES, "a photo of a {}.", None, {**descriptors, "elk": []})
