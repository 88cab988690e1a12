"""``--stream-runs N``: OGA's N seeded orders of an online method, replayed from one encoding, equal
N full runs; finished runs survive a kill; the tail accuracy; bad requests refused before torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line_before_torch
from protext.evaluation import EvalConfig, evaluate
from synthetic_datasets import noise_folder

NAMES = ["ant", "bee", "cow", "doe"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("orders"), NAMES, per_class=4, seed=3, shape=(40, 40))


def _config(folder: Path, out: Path, **extra) -> EvalConfig:
    return EvalConfig(dataset="folder", root=str(folder), model="tiny-clip", pretrained="random", workers=0,
                      progress=False, out=str(out), tta="tda", tda_alpha=2.0, tda_beta=5.0, tta_views=4, **extra)


def _full_runs(clip, folder: Path, n_runs: int, master: int) -> list[float]:
    """N full runs by hand: OGA's orders drawn here with numpy, views made afresh in every run,
    a fresh TDA each time; the accuracy of each run in percent."""
    from protext.datasets import build_dataset
    from protext.evaluation.data import SeededViews
    from protext.tta import TTAConfig, build_adapter
    from protext.tta.api import views_for_recipe
    from protext.tta.registry import ViewRecipe
    from protext.tta.views import model_preprocess_cfg
    from protext.zeroshot import clip_text_features

    dataset = build_dataset("folder", str(folder), split="all", partition="test")
    text = clip_text_features(clip.model, clip.tokenizer, list(dataset.classnames), "a photo of a {}.")
    maker = SeededViews(views_for_recipe(ViewRecipe(4, False), model_preprocess_cfg(clip.model)), 0)
    seeds = np.random.default_rng(master).choice(range(10000 * n_runs), size=n_runs, replace=False)
    accuracies = []
    for seed in seeds:
        order = np.random.default_rng(int(seed)).choice(range(len(dataset)), len(dataset), replace=False)
        adapter = build_adapter(TTAConfig(method="tda", tda_alpha=2.0, tda_beta=5.0, views=4), clip.model, "folder",
                                text_features=text)
        right = 0
        for index in order.tolist():
            image, label = dataset[index]
            right += int(adapter.adapt(maker(image, index)).logits.argmax()) == label
        accuracies.append(100.0 * right / len(dataset))
    return accuracies


def test_replayed_orders_equal_full_runs_and_the_tail_is_the_worst_tenth(tiny_clip, folder, tmp_path):
    result = evaluate(_config(folder, tmp_path / "r.json", stream_runs=4, stream_seed=7), clip=tiny_clip)
    runs = result["runs"]
    got = [run["top1"] for run in runs["per_run"]]
    want = _full_runs(tiny_clip, folder, 4, 7)
    assert got == pytest.approx(want, abs=1e-9)
    assert runs["seeds"] == [int(s) for s in np.random.default_rng(7).choice(range(40000), size=4, replace=False)]
    top1 = runs["summary"]["top1"]
    assert top1["tail_runs"] == 1 and top1["eta"] == pytest.approx(min(want))  # ceil(0.1 * 4) = 1 run
    assert top1["mean"] == pytest.approx(sum(want) / 4) and result["metrics"]["top1_eta"] == top1["eta"]
    assert "eta" not in runs["summary"]["ece"]
    flops = result["timing"]["flops"]  # the image tower on 4 views and TDA's own arithmetic, counted on real calls
    assert result["timing"]["gflops_per_image"] > 0 and flops["per_image"]["image_tower"] > 0 and flops["images_counted"] == 1
    assert not (tmp_path / "r.json.runs.jsonl").exists()  # the log goes once the results are written
    from PIL import Image as PILImage

    with PILImage.open(tmp_path / "r.runs.png") as picture:  # the spread of runs, tail marked
        assert picture.size[0] > 100


def test_a_killed_job_keeps_its_finished_runs(tiny_clip, folder, tmp_path, monkeypatch):
    import protext.evaluation.orders as orders

    computed: list[int] = []
    real = orders._one_run

    def counting(setup, tta_cfg, text, encoded, labels, r, seed, batches, done, *rest):
        if done is None or r == 0:
            computed.append(r)
        if r == 2 and len(computed) == 3 and computed == [0, 1, 2]:
            raise KeyboardInterrupt  # killed during run 2
        return real(setup, tta_cfg, text, encoded, labels, r, seed, batches, done, *rest)

    monkeypatch.setattr(orders, "_one_run", counting)
    config = _config(folder, tmp_path / "r.json", stream_runs=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, clip=tiny_clip)
    lines = (tmp_path / "r.json.runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines[1:]] == [0, 1]
    computed.clear()
    resumed = evaluate(config, clip=tiny_clip)
    assert computed == [0, 2]  # run 1 comes from the log; run 0 again for the predictions it keeps
    fresh = evaluate(_config(folder, tmp_path / "fresh.json", stream_runs=3), clip=tiny_clip)
    assert [r["top1"] for r in resumed["runs"]["per_run"]] == [r["top1"] for r in fresh["runs"]["per_run"]]


BAD = [
    (["--tta", "tda", "--tda-alpha", "2", "--tda-beta", "5", "--stream-runs", "0"], "--stream-runs"),
    (["--tta", "zero", "--stream-runs", "5"], "does not depend on the stream order"),
    (["--tta", "tda", "--tda-alpha", "2", "--tda-beta", "5", "--stream-seed", "3"], "--stream-seed"),
    (["--tta", "tda", "--tda-alpha", "2", "--tda-beta", "5", "--stream-runs", "3", "--stream-seeds", "1,2"], "--stream-runs"),
    (["--stream-runs", "3"], "--stream-runs"),
    (["--tta", "tpt", "--scenario", "low"], "--scenario"),
    (["--tta", "zero", "--tasks", "0", "--scenario", "low"], "--tasks"),
    (["--tta", "zero", "--tasks", "3"], "--tasks"),
]


def test_bad_requests_are_one_line_before_torch(tmp_path):
    assert_one_error_line_before_torch(tmp_path, BAD)


def test_a_batch_scenario_replays_each_task_with_a_fresh_adapter(tiny_clip, folder, tmp_path):
    """StatA's very-low setting on 16 images: every task's score is the accuracy of a fresh TDA over
    its images in the drawn order (checked by hand on views made afresh), the mean over tasks is the
    headline, and the draws are seeded (the same seed, the same tasks)."""
    from protext import streams
    from protext.datasets import build_dataset
    from protext.evaluation.data import SeededViews
    from protext.tta import TTAConfig, build_adapter
    from protext.tta.api import views_for_recipe
    from protext.tta.registry import ViewRecipe
    from protext.tta.views import model_preprocess_cfg
    from protext.zeroshot import clip_text_features

    result = evaluate(_config(folder, tmp_path / "s.json", scenario="very_low", tasks=3), clip=tiny_clip)
    runs = result["runs"]
    assert runs["kind"] == "tasks" and runs["seed"] == 1 and (runs["batch_size"], runs["k_min"], runs["k_max"]) == (64, 1, 4)
    dataset = build_dataset("folder", str(folder), split="all", partition="test")
    labels = [dataset[i][1] for i in range(len(dataset))]
    tasks = streams.batch_tasks(labels, 1, 4, 64, 3, np.random.default_rng(1))
    text = clip_text_features(tiny_clip.model, tiny_clip.tokenizer, list(dataset.classnames), "a photo of a {}.")
    maker = SeededViews(views_for_recipe(ViewRecipe(4, False), model_preprocess_cfg(tiny_clip.model)), 0)
    want = []
    for task in tasks:
        adapter = build_adapter(TTAConfig(method="tda", tda_alpha=2.0, tda_beta=5.0, views=4), tiny_clip.model, "folder",
                                text_features=text)
        right = sum(int(adapter.adapt(maker(dataset[i][0], int(i))).logits.argmax()) == labels[i] for i in task)
        want.append(100.0 * right / len(task))
    assert [r["top1"] for r in runs["per_run"]] == pytest.approx(want, abs=1e-9)
    assert [r["images"] for r in runs["per_run"]] == [len(t) for t in tasks]
    assert result["metrics"]["top1_mean_over_runs"] == pytest.approx(sum(want) / 3)


def test_an_online_scenario_needs_a_full_batch_before_the_model_loads(folder, tmp_path, no_model):
    from protext.errors import UserError

    with pytest.raises(UserError, match="batches of 128"):
        evaluate(_config(folder, tmp_path / "o.json", scenario="online-medium"))
