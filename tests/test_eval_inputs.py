"""Issue 15 for eval: outputs beside the results are outputs, a resumed run checks its images and
classes, one class is never named twice, default result names cannot collide, the resume
fingerprint covers every setting, and every flag is bounded and refused before torch loads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
from conftest import TEST_TIMEOUT
import pytest
from PIL import Image

import protext.evaluation.loop as loop
from protext.eval import main
from protext.evaluation import EvalConfig, evaluate
from protext.evaluation import config as eval_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-clip", "--pretrained", "random", "--workers", "0", "--no-progress"]


def _image(path: Path, seed: int, size: tuple[int, int] = (32, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of 3 classes x 3 noise images, the test's own (tests change it)."""
    root = tmp_path / "images"
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(3):
            _image(root / name / f"{i}.png", 10 * c + i)
    return root


def fail(args: list[str], capsys) -> str:
    """Run the command expecting one ``error:`` line and exit 2; returns that line."""
    code = main([*args, *TINY])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _config(root: Path, **changes) -> EvalConfig:
    base = dict(dataset="folder", root=str(root), model="tiny-clip", pretrained="random", workers=0, progress=False)
    return EvalConfig(**{**base, **changes})


# --------------------------------------------------------------------------------------------------
# 1. the markdown summary and the reliability diagram are outputs too


@pytest.mark.parametrize("sibling", ["notes.md", "notes.reliability.png"])
def test_existing_summary_or_diagram_is_not_replaced(images, tmp_path, capsys, no_model, sibling):
    mine = tmp_path / sibling
    mine.write_bytes(b"my own notes")
    err = fail(["--dataset", "folder", "--root", str(images), "--out", str(tmp_path / "notes.json")], capsys)
    assert str(mine) in err and "already exists" in err and "--overwrite" in err
    assert mine.read_bytes() == b"my own notes" and not (tmp_path / "notes.json").exists()


def test_overwrite_replaces_the_summary_and_diagram(tiny_clip, images, tmp_path):
    for name in ("notes.md", "notes.reliability.png"):
        (tmp_path / name).write_bytes(b"old")
    evaluate(_config(images, limit=2, out=str(tmp_path / "notes.json"), overwrite=True), clip=tiny_clip)
    assert (tmp_path / "notes.md").read_text().startswith("| dataset")
    assert (tmp_path / "notes.reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_folder_and_colliding_names_are_refused(images, tmp_path, capsys, no_model):
    (tmp_path / "r.md").mkdir()
    err = fail(["--dataset", "folder", "--root", str(images), "--out", str(tmp_path / "r.json")], capsys)
    assert f"{tmp_path / 'r.md'} is a directory" in err and "markdown" in err
    # --out r2.md: the JSON would overwrite the summary written just before it
    err = fail(["--dataset", "folder", "--root", str(images), "--out", str(tmp_path / "r2.md")], capsys)
    assert "would both be" in err and "FILE.json" in err


def test_files_of_a_killed_run_do_not_block_its_rerun(tiny_clip, images, tmp_path, monkeypatch):
    """write_results writes the summary and diagram before the JSON: a kill between them leaves
    this run's own files, which the rerun (it has a log) may replace."""
    config = _config(images, limit=4, batch_size=2, out=str(tmp_path / "r.json"))
    real = loop._zeroshot_batch
    calls = [0]

    def stop_second(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_zeroshot_batch", stop_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, clip=tiny_clip)
    monkeypatch.undo()
    (tmp_path / "r.md").write_text("written by the killed run")
    payload = evaluate(config, clip=tiny_clip)
    assert payload["metrics"]["n_images"] == 4 and (tmp_path / "r.md").read_text().startswith("| dataset")


# --------------------------------------------------------------------------------------------------
# 2. a resumed run checks that its images and classes are the ones it started on


def _stop_after_first_batch(monkeypatch) -> None:
    real = loop._zeroshot_batch
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_zeroshot_batch", wrapped)


@pytest.mark.parametrize("change", ["replace_and_remove", "replace_only", "rename_class"])
def test_resume_on_a_changed_folder_is_refused_and_the_log_kept(tiny_clip, images, tmp_path, capsys, monkeypatch, change):
    out = tmp_path / "r.json"
    args = ["--dataset", "folder", "--root", str(images), "--batch-size", "2", "--out", str(out)]
    _stop_after_first_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(images, batch_size=2, out=str(out)), clip=tiny_clip)
    monkeypatch.undo()
    (log,) = tmp_path.glob("r.json.resume-*.rank0.jsonl")
    kept = log.read_bytes()
    assert len(kept.splitlines()) == 3  # header + the first batch's 2 images
    if change == "rename_class":
        (images / "cow").rename(images / "cow2")
    else:
        _image(images / "ant" / "0.png", 999, size=(30, 41))  # another picture under the same name
        if change == "replace_and_remove":
            (images / "bee" / "1.png").unlink()
    err = fail(args, capsys)
    assert str(log) in err and "other inputs" in err and "--overwrite" in err
    assert {"replace_and_remove": "held 9 images then and 8 now", "replace_only": "replaced, renamed or relabelled",
            "rename_class": "the class names changed"}[change] in err
    assert log.read_bytes() == kept and not out.exists()
    # --overwrite starts over on today's folder: the result is a fresh run's
    assert main([*args, "--overwrite", *TINY]) == 0
    fresh = evaluate(_config(images, batch_size=2, out=str(tmp_path / "fresh.json")), clip=tiny_clip)
    assert json.loads(out.read_text())["predictions"] == fresh["predictions"]
    assert not list(tmp_path.glob("r.json.resume-*"))


def test_finished_result_on_a_changed_folder_is_not_this_run(tiny_clip, images, tmp_path, capsys):
    out = tmp_path / "r.json"
    evaluate(_config(images, out=str(out)), clip=tiny_clip)
    before = out.read_bytes()
    _image(images / "bee" / "2.png", 777, size=(33, 40))
    err = fail(["--dataset", "folder", "--root", str(images), "--out", str(out)], capsys)
    assert "other images or classes" in err and "--overwrite" in err
    assert out.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# 3. one class is never named twice


def test_duplicate_class_folders_are_refused(images, tmp_path, capsys, no_model):
    _image(images / "Ant" / "0.png", 5)
    err = fail(["--dataset", "folder", "--root", str(images), "--out", str(tmp_path / "r.json")], capsys)
    assert "'Ant'" in err and "'ant'" in err and "one class" in err and str(images) in err


def test_clip_imagenet_names_keep_their_two_coincidences():
    from protext.classlists import IMAGENET_COINCIDENCES, ClassListError, duplicate_classes, read_classes
    from protext.evaluation.preflight import check_classes

    names = read_classes("imagenet")
    assert set(duplicate_classes(names)) == IMAGENET_COINCIDENCES  # the published list, as it is
    check_classes(names, EvalConfig(dataset="imagenet", root="x"), "--classes imagenet")  # accepted there
    with pytest.raises(ClassListError, match="'missile'"):
        check_classes(names, EvalConfig(dataset="dtd", root="x"), "--classes names.txt")


def test_per_class_results_keep_two_labels_with_one_name_apart():
    from protext.results import Prediction, compute_metrics

    predictions = [Prediction(0, 0, (0, 1)), Prediction(1, 2, (0, 2)), Prediction(2, 1, (1, 0))]
    metrics = compute_metrics(predictions, ["missile", "ox", "missile"])
    assert metrics.per_class == {"missile [0]": {"accuracy": 100.0, "n": 1}, "ox": {"accuracy": 100.0, "n": 1},
                                 "missile [2]": {"accuracy": 0.0, "n": 1}}
    assert metrics.mean_per_class == pytest.approx(200.0 / 3)


def test_class_key_is_the_descriptions_rule():
    from protext.classlists import class_key
    from protext.descriptions import normalize_classname

    for name in ["Golden_Retriever", "  golden   retriever ", "GOLDEN retriever", "ox", "Ox_", "a__b"]:
        assert class_key(name) == normalize_classname(name)


# --------------------------------------------------------------------------------------------------
# 4. default result names that cannot collide, and the real problem reported first


def test_default_names_differ_for_different_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"
    assert _config(a).output_path() != _config(b).output_path()  # same folder name, two folders
    assert _config(a).output_path() == _config(a).output_path()  # the same command: the same name
    assert _config(a).output_path() == _config(a, workers=7, progress=True).output_path()  # no result changes
    ckpt = dict(method="prompts")
    own, coop = _config(a, prompts="ck/dtd.safetensors", **ckpt), _config(a, prompts="ck/dtd.pth", **ckpt)
    assert own.output_path() != coop.output_path()
    name = own.output_path().name
    assert name.startswith(f"folder_imgs-all-prompts-tiny-clip-random-dtd.safetensors-") and name.endswith(".json")
    # one relative --root from two working folders is two folders
    first = _config(Path("imgs")).output_path()
    a.mkdir(parents=True)
    monkeypatch.chdir(a.parent)
    assert _config(Path("imgs")).output_path() != first
    named = EvalConfig(dataset="dtd", root="DATA", model="ViT-B-16", pretrained="openai", tta="tpt")
    assert named.output_path().name.startswith("dtd-all-clip-tpt-ViT-B-16-openai-")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(EvalConfig)])
def test_every_result_changing_setting_changes_the_default_name(name):
    if name in NOT_IN_NAME:
        assert _changed_name(name) is False
    else:
        assert _changed_name(name) is True


def test_a_mistyped_root_is_reported_before_the_results_file(tiny_clip, images, tmp_path, capsys, no_model):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"settings": {"dataset": "folder"}}))  # a result of other settings
    err = fail(["--dataset", "folder", "--root", str(images) + "_typo", "--out", str(out)], capsys)
    assert f"{images}_typo" in err and "does not exist" in err and "already holds" not in err


# --------------------------------------------------------------------------------------------------
# 5. the resume fingerprint covers every setting; a new field fails here until classified

#: fields left out of the fingerprint, each with why a finished image's result does not depend on it
NOT_IN_FINGERPRINT = {
    "out": "where the results go, not what they are",
    "overwrite": "whether an existing result may be replaced",
    "workers": "how many processes decode images; each image's tensor is the same",
    "progress": "whether a bar is drawn",
    "limit": "how many images; each episodic or zero-shot image's result is the same (online methods: see below)",
}
#: fields in the fingerprint: each can change a finished image's prediction (a new field must be
#: added here or above, with its reason, before this module passes)
IN_FINGERPRINT = (
    "dataset", "root", "split", "classes", "model", "pretrained", "device", "precision", "method", "template",
    "templates", "descriptions", "prompts", "allow_other_weights", "tta", "tta_views", "tta_selection", "tta_steps",
    "tta_lr", "tta_init", "tta_tune", "tta_batch", "tta_naive", "ctpt_lambda", "tda_alpha", "tda_beta", "zero_votes",
    "augmix", "tta_options", "stream_seeds", "stream_runs", "stream_seed", "scenario", "tasks", "batch_size", "seed", "save_logits",
)
#: fields left out of the default results name (limit is in it: a smoke run must not take the full run's name)
NOT_IN_NAME = {k: v for k, v in NOT_IN_FINGERPRINT.items() if k != "limit"}


def _other_value(name: str, value):
    """A value of the field's type that differs from ``value``."""
    kind = typing.get_type_hints(EvalConfig)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    kind = args[0] if args else kind
    if kind is bool:
        return not value
    if kind is int:
        return (value or 0) + 3
    if kind is float:
        return (value or 0.0) + 0.25
    if kind is str:
        return (value or "") + "x"
    if typing.get_origin(kind) is list:
        return [*(value or []), 11]
    if typing.get_origin(kind) is dict:
        return {**(value or {}), "dmn_beta": 7.0}
    raise AssertionError(f"EvalConfig.{name}: no test value for type {kind}; extend _other_value")


def _base() -> EvalConfig:
    return EvalConfig(dataset="folder", root="imgs")


def _changed_fingerprint(name: str, **base) -> bool:
    config = dataclasses.replace(_base(), **base)
    changed = dataclasses.replace(config, **{name: _other_value(name, getattr(config, name))})
    return config.fingerprint({}) != changed.fingerprint({})


def _changed_name(name: str) -> bool:
    """Whether the field changes the hash in the default name (``out`` replaces the name itself)."""
    config = _base()
    changed = dataclasses.replace(config, **{name: _other_value(name, getattr(config, name))})
    return config.identity() != changed.identity()


def test_every_field_is_classified():
    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    unclassified = set(fields) - set(IN_FINGERPRINT) - set(NOT_IN_FINGERPRINT)
    assert not unclassified, f"classify {sorted(unclassified)}: in the resume fingerprint, or excluded with a reason"
    assert set(IN_FINGERPRINT) | set(NOT_IN_FINGERPRINT) == set(fields), "a classified field no longer exists"
    assert not set(IN_FINGERPRINT) & set(NOT_IN_FINGERPRINT)
    assert set(eval_config._NOT_IN_FINGERPRINT) == set(NOT_IN_FINGERPRINT), "the code's exclusions differ from the documented ones"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(EvalConfig)])
def test_every_setting_changes_the_resume_fingerprint(name):
    if name in NOT_IN_FINGERPRINT:
        assert not _changed_fingerprint(name), f"{name} is documented as not changing a result"
    else:
        assert _changed_fingerprint(name), f"changing {name} reuses another run's log: classify it above"


def test_limit_changes_an_online_streams_fingerprint():
    # an online method's stream is a permutation of the first `limit` images: another limit, another stream
    assert _changed_fingerprint("limit", tta="tda")


def test_input_file_contents_change_the_fingerprint():
    config = _base()
    assert config.fingerprint({"--prompts": "a"}) != config.fingerprint({"--prompts": "b"})


# --------------------------------------------------------------------------------------------------
# 6. every flag bounded, refused before torch is imported

_BAD_FLAGS = [
    (["--tta", "tpt", "--tta-views", str(10**12)], "--tta-views"),
    (["--tta", "tpt", "--tta-views", "0"], "--tta-views"),
    (["--tta", "tpt", "--tta-steps", "100000"], "--tta-steps"),
    (["--tta", "zero", "--tta-batch", "100000"], "--tta-batch"),
    (["--tta", "zero", "--tta-batch", "512"], "--tta-batch"),  # 512 x 64 views at once
    (["--tta", "tpt", "--tta-lr", "nan"], "--tta-lr"),
    (["--tta", "tpt", "--tta-lr", "inf"], "--tta-lr"),
    (["--tta", "tpt", "--tta-selection", "nan"], "--tta-selection"),
    (["--tta", "tpt", "--tta-selection", "inf"], "--tta-selection"),
    (["--tta", "ctpt", "--ctpt-lambda", "inf"], "--ctpt-lambda"),
    (["--tta", "tda", "--tda-alpha", "1", "--tda-beta", "inf"], "--tda-beta"),
    (["--tta", "tda", "--tda-alpha=-inf", "--tda-beta", "1"], "--tda-alpha"),
    (["--tta", "tda", "--tda-alpha", "1", "--tda-beta", "1", "--stream-seeds", "-3"], "--stream-seeds"),
    (["--tta", "tda", "--tda-alpha", "1", "--tda-beta", "1", "--stream-seeds", ",".join(map(str, range(101)))], "--stream-seeds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", str(10**9)], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--workers", "-1"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--device", "gpu"], "--device"),
    (["--template", "a {} of {}"], "--template"),
    (["--template", "a photo of a {name}"], "--template"),
    (["--template", "a photo"], "--template"),
    (["--dataset", "dtdd"], "--dataset"),
    (["--method", "prompts", "--prompts", "missing.safetensors"], "--prompts"),
    (["--classes", "missing.txt"], "--classes"),
    (["--classes", "DUP"], "golden_retriever"),
    (["--out="], "--out"),
    (["--classes="], "--classes"),
    (["--root="], "--root"),
]


def test_bad_flags_are_one_line_before_torch(images, tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\nGolden Retriever\ngolden_retriever\n")
    cases = [[a if a != "DUP" else str(dup) for a in args] for args, _ in _BAD_FLAGS]
    script = (
        "import contextlib, io, json, sys\n"
        "from protext.eval import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            code = main(['--dataset', 'folder', '--root', sys.argv[2], '--out', sys.argv[3], *args, '--no-progress'])\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    out.append([code, err.getvalue(), 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    # --dataset given twice: argparse keeps the last, so the bad-name case overrides 'folder'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases), str(images), str(tmp_path / "r.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    for (args, named), (code, err, torch_loaded) in zip(_BAD_FLAGS, json.loads(proc.stdout)):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (args, err)
        assert not torch_loaded, f"{args}: torch was imported before the argument error"
    assert not (tmp_path / "r.json").exists()


def test_absurd_worker_count_is_capped_with_a_line_before_any_process(images, tmp_path, capsys, monkeypatch):
    seen = {}

    def capture(config, clip=None, progress=True):
        seen["workers"] = config.workers
        raise KeyboardInterrupt  # stop before anything starts

    monkeypatch.setattr(loop, "evaluate_shards", capture)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(images, workers=1_000_000, out=str(tmp_path / "r.json")))
    cap = eval_config.max_workers()
    assert seen["workers"] == cap <= 4 * (os.cpu_count() or 1)
    assert f"--workers 1000000 is more than this machine can use; using {cap}" in capsys.readouterr().err


def test_tta_library_bounds_equal_the_flags():
    from protext.tta import TTAConfig, TTAConfigError
    from protext.tta import config as tta_config

    assert (tta_config.MAX_VIEWS, tta_config.MAX_STEPS, tta_config.MAX_BATCH, tta_config.MAX_VIEWS_IN_FLIGHT) == (
        eval_config.MAX_TTA_VIEWS, eval_config.MAX_TTA_STEPS, eval_config.MAX_TTA_BATCH, eval_config.MAX_VIEWS_IN_FLIGHT)
    for bad, flag in [({"views": 10**12}, "--tta-views"), ({"steps": 10**6}, "--tta-steps"), ({"batch": 10**6}, "--tta-batch"),
                      ({"method": "zero", "batch": 512}, "--tta-batch"), ({"selection": float("nan")}, "--tta-selection"),
                      ({"lr": float("nan")}, "--tta-lr")]:
        with pytest.raises(TTAConfigError, match=flag):
            TTAConfig(**bad).validate("dtd")
