"""The training job's Python API and its pre-flight against the model (issue 16).

``TrainJob`` takes its hyper-parameters as fields (``depth=2``), like ``EvalConfig`` takes its
options; the old ``overrides`` dict still works, with a deprecation warning. A depth or context the
model's text tower cannot hold is refused from the architecture's config file, before any weights
load, in one line that names the flag and the value that fits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import TEST_TIMEOUT
from protext.presets import OVERRIDABLE, PresetError, resolve

REPO = Path(__file__).resolve().parents[1]
TINY_DEPTH_NOTE = "depth: the preset's 9 is above tiny-clip's 2 text blocks; using 2"


def _jsonl(path: Path) -> Path:
    rows = [(c, f"a {c} photo number {i}") for c in ("banded", "dotted", "striped") for i in range(6)]
    path.write_text("".join(json.dumps({"classname": c, "description": d}) + "\n" for c, d in rows))
    return path


@pytest.fixture
def refuse_loading(monkeypatch):
    """Any attempt to load weights fails the test: the checks must come first."""
    import protext.models
    import protext.training as training

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts were checked against it")

    monkeypatch.setattr(training, "_load_model", refuse)
    monkeypatch.setattr(protext.models, "load_clip", refuse)


# -------------------------------------------------------------------------------------------------- (a) fields


def test_hyperparameters_are_fields_of_the_job():
    from protext.training import TrainJob

    job = TrainJob("d.jsonl", preset="text_only/dtd", n_ctx=2, depth=2, ctx_init="a photo of a", lr=0.5, epochs=3,
                   warmup_epochs=1, batch_size=16, loss="l1", loss_weight=2.0)
    settings = job.settings()
    assert (settings.n_ctx, settings.depth, settings.ctx_init, settings.lr, settings.epochs, settings.warmup_epochs,
            settings.batch_size, settings.loss, settings.loss_weight) == (2, 2, "a photo of a", 0.5, 3, 1, 16, "l1", 2.0)
    assert settings.preset == "text_only/dtd" and settings.split == "all"


def test_every_overridable_value_is_a_keyword_field():
    from protext.training import TrainJob

    fields = {f.name: f for f in dataclasses.fields(TrainJob)}
    assert set(OVERRIDABLE) <= set(fields)
    for name in OVERRIDABLE:
        assert fields[name].default is None  # None: the preset's
        if name != "split":  # split kept its old positional place
            assert fields[name].kw_only, name
    with pytest.raises(TypeError):
        TrainJob("d.jsonl", None, None, None, {}, None, None, True, False, False, "tiny-clip", "random", "cpu", "fp32", 1,
                 True, False, 4)  # n_ctx cannot be passed by position


def test_unset_fields_take_the_preset_and_merge_as_resolve_does():
    from protext.training import TrainJob

    assert TrainJob("d.jsonl", preset="base2novel/dtd").settings() == resolve("base2novel/dtd")
    assert TrainJob("d.jsonl").settings() == resolve(None)
    # one rule for the merge: a new loss without a weight takes that loss's published factor
    assert TrainJob("d.jsonl", loss="l1").settings().loss_weight == 1.0
    assert TrainJob("d.jsonl", loss="l1", loss_weight=5.0).settings().loss_weight == 5.0
    assert TrainJob("d.jsonl", ctx_init="none").settings().ctx_init is None
    assert TrainJob("d.jsonl", preset="base2novel/dtd", split="all").settings().split == "all"


def test_field_values_are_checked_with_the_flag_named():
    from protext.training import TrainJob

    with pytest.raises(PresetError, match=r"^--depth must be at least 1, got 0\.$"):
        TrainJob("d.jsonl", depth=0).settings()
    with pytest.raises(PresetError, match=r"^--loss must be one of mse, l1, got 'huber'\.$"):
        TrainJob("d.jsonl", loss="huber").settings()


def test_overrides_still_work_but_warn_and_move_into_the_fields():
    from protext.training import TrainJob

    with pytest.warns(DeprecationWarning, match=r"TrainJob\(overrides=\.\.\.\) is deprecated: pass hyper-parameters as "
                      r"fields") as caught:
        job = TrainJob("d.jsonl", preset="text_only/dtd", overrides={"depth": 2, "epochs": 3, "lr": None})
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert (job.depth, job.epochs, job.lr, job.overrides) == (2, 3, None, {})
    assert job.settings() == TrainJob("d.jsonl", preset="text_only/dtd", depth=2, epochs=3).settings()
    # folded once: a copy with another value is that value, not a clash with the old dict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(job, depth=1).settings().depth == 1


def test_a_value_given_both_ways_must_agree():
    from protext.training import TrainJob

    with pytest.warns(DeprecationWarning):
        assert TrainJob("d.jsonl", depth=2, overrides={"depth": 2}).depth == 2
    with pytest.warns(DeprecationWarning), pytest.raises(
        TypeError, match=r"^TrainJob: depth given twice, depth=2 and overrides\['depth'\]=3; pass it once, as depth=\.$"
    ):
        TrainJob("d.jsonl", depth=2, overrides={"depth": 3})
    with pytest.warns(DeprecationWarning), pytest.raises(PresetError, match=r"^cannot override width; overridable: "):
        TrainJob("d.jsonl", overrides={"width": 3})


def test_the_command_line_builds_the_job_from_fields_without_a_warning():
    from protext.train import build_parser, job_from_args

    args = build_parser().parse_args(["--descriptions", "d.jsonl", "--depth", "2", "--lr", "0.1", "--split", "base",
                                      "--classes", "c.txt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job = job_from_args(args)
    assert (job.depth, job.lr, job.split, job.n_ctx, job.overrides) == (2, 0.1, "base", None, {})


def test_a_job_with_field_hyperparameters_trains(tmp_path, tiny_clip):
    from protext.checkpoint import load_prompts
    from protext.training import TrainJob, run_training

    out = tmp_path / "f.safetensors"
    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), model="tiny-clip", pretrained="random", out=out,
                   cache_dir=tmp_path / "cache", n_ctx=2, depth=2, epochs=2, warmup_epochs=0, batch_size=8)
    outcome = run_training(job, clip=tiny_clip, progress=False, report=lambda line: None)
    assert outcome.complete and len(outcome.history) == 2 and outcome.history[0].steps == 2
    hyper = load_prompts(out).meta["hyperparameters"]
    assert (hyper["n_ctx"], hyper["depth"], hyper["epochs"], hyper["batch_size"]) == (2, 2, 2, 8)


# -------------------------------------------------------------------------------------------------- (b) the tower


def test_tower_shapes_come_from_the_config_files():
    from protext.architectures import TowerShape, text_tower_shape

    assert text_tower_shape("tiny-clip") == TowerShape("tiny-clip", 2, 77)  # protext's own config
    assert text_tower_shape("ViT-B-16") == TowerShape("ViT-B-16", 12, 77)  # open_clip's
    assert text_tower_shape("ViT-L-14-quickgelu") == TowerShape("ViT-L-14-quickgelu", 12, 77)
    assert text_tower_shape("no-such-model") is None
    assert text_tower_shape("hf-hub:timm/some-model") is None


def test_reading_a_tower_shape_imports_neither_torch_nor_open_clip():
    code = ("import sys; from protext.architectures import text_tower_shape; assert text_tower_shape('ViT-B-16'); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_check_prompt_fits_names_the_flag_and_the_value_that_fits():
    from protext.architectures import PromptFitError, TowerShape, check_prompt_fits

    shape = TowerShape("small", 4, 16)
    check_prompt_fits(shape, 13, 4)  # 13 context tokens + start, end, one class token = 16
    with pytest.raises(PromptFitError, match=r"^--depth 5: small's text tower has only 4 blocks; pass --depth 4 or less\.$"):
        check_prompt_fits(shape, 4, 5)
    with pytest.raises(PromptFitError, match=r"^--n-ctx 14: small's text context holds 16 tokens, and start, end and a "
                       r"class name need 3; pass --n-ctx 13 or less\.$"):
        check_prompt_fits(shape, 14, 4)


@pytest.mark.parametrize(
    "depth,given,used,note",
    [
        (9, False, 4, "depth: the preset's 9 is above small's 4 text blocks; using 4"),  # the preset's, above: lowered
        (5, False, 4, "depth: the preset's 5 is above small's 4 text blocks; using 4"),
        (4, False, 4, None),  # the preset's, equal: as it is, no line
        (3, False, 3, None),  # the preset's, below
        (4, True, 4, None),  # the user's, equal
        (1, True, 1, None),  # the user's, below
    ],
)
def test_the_one_depth_rule(depth, given, used, note):
    """What train, reproduce, the quickstart and TrainJob all do: one function decides."""
    from protext.architectures import TowerShape, fit_prompts

    assert fit_prompts(TowerShape("small", 4, 16), 4, depth, depth_given=given) == (used, note)


def test_the_one_depth_rule_refuses_a_given_depth_above_the_tower():
    from protext.architectures import PromptFitError, TowerShape, fit_prompts

    shape = TowerShape("small", 4, 16)
    for depth in (5, 9):
        with pytest.raises(PromptFitError, match=rf"^--depth {depth}: small's text tower has only 4 blocks; pass --depth 4 or less\.$"):
            fit_prompts(shape, 4, depth, depth_given=True)
    # a lowered preset depth does not excuse a context the tower cannot hold
    with pytest.raises(PromptFitError, match=r"^--n-ctx 14: "):
        fit_prompts(shape, 14, 9, depth_given=False)


def test_train_fits_a_preset_deeper_than_the_model_in_one_line(tmp_path, capsys):
    from protext.checkpoint import load_prompts
    from protext.train import main

    out = tmp_path / "x.safetensors"
    code = main(["--descriptions", str(_jsonl(tmp_path / "d.jsonl")), "--model", "tiny-clip", "--pretrained", "random",
                 "--preset", "text_only/dtd", "--epochs", "2", "--warmup-epochs", "0", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 0, lines
    assert [line for line in lines if line.startswith("depth")] == [TINY_DEPTH_NOTE]  # said once, by the run
    training = next(i for i, line in enumerate(lines) if line.startswith("training: "))
    assert lines.index(TINY_DEPTH_NOTE) < training and ", depth 2, " in lines[training]
    meta = load_prompts(out).meta
    assert meta["depth_note"] == TINY_DEPTH_NOTE
    assert meta["hyperparameters"]["depth"] == 2 and meta["preset_values"]["depth"] == 9


def test_a_preset_that_fits_records_no_note(tmp_path, tiny_clip):
    from protext.checkpoint import load_prompts
    from protext.training import TrainJob, run_training

    lines: list[str] = []
    out = tmp_path / "x.safetensors"
    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), preset="text_only/dtd", model="tiny-clip", pretrained="random", out=out,
                   cache_dir=tmp_path / "cache", depth=2, epochs=2, warmup_epochs=0)
    outcome = run_training(job, clip=tiny_clip, progress=False, report=lines.append)
    assert outcome.complete and outcome.depth_note is None and outcome.settings.depth == 2
    assert not [line for line in lines if line.startswith("depth:")]
    assert "depth_note" not in load_prompts(out).meta


def test_an_explicit_depth_is_named_as_the_users(tmp_path, capsys, refuse_loading):
    from protext.train import main

    code = main(["--descriptions", str(_jsonl(tmp_path / "d.jsonl")), "--model", "tiny-clip", "--pretrained", "random",
                 "--depth", "3", "--out", str(tmp_path / "x.safetensors"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == "error: --depth 3: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less.\n"
    code = main(["--descriptions", str(_jsonl(tmp_path / "d.jsonl")), "--model", "tiny-clip", "--pretrained", "random",
                 "--preset", "text_only/dtd", "--depth", "9", "--out", str(tmp_path / "x.safetensors"), "--quiet"])
    assert code == 2  # the preset's value typed by hand is the user's: refused, not lowered
    assert capsys.readouterr().err == "error: --depth 9: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less.\n"


def test_the_library_takes_the_same_rule_before_loading(tmp_path, refuse_loading):
    from protext.training import TrainJob, TrainJobError, run_training

    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), preset="text_only/dtd", model="tiny-clip", pretrained="random",
                   out=tmp_path / "x.safetensors", cache_dir=tmp_path / "cache")
    lines: list[str] = []
    with pytest.raises(AssertionError, match="the model was loaded"):  # lowered and said, then on to loading
        run_training(job, progress=False, report=lines.append)
    assert lines[0] == TINY_DEPTH_NOTE and lines.count(TINY_DEPTH_NOTE) == 1  # the run's first line
    job = dataclasses.replace(job, depth=9)
    with pytest.raises(TrainJobError, match=r"^--depth 9: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less\.$"):
        run_training(job, progress=False, report=lines.append)


def test_the_library_fits_a_preset_once_and_reports_it(tmp_path, tiny_clip):
    from protext.checkpoint import load_prompts
    from protext.training import TrainJob, run_training

    lines: list[str] = []
    out = tmp_path / "x.safetensors"
    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), model="tiny-clip", pretrained="random", out=out,
                   cache_dir=tmp_path / "cache", epochs=2, warmup_epochs=0)  # no preset: cross_dataset's depth 9
    outcome = run_training(job, clip=tiny_clip, progress=False, report=lines.append)
    assert outcome.complete and lines.count(TINY_DEPTH_NOTE) == 1
    assert outcome.depth_note == TINY_DEPTH_NOTE and outcome.settings.depth == 2 and job.settings().depth == 9
    assert load_prompts(out).meta["depth_note"] == TINY_DEPTH_NOTE


def test_a_given_model_is_checked_on_its_loaded_tower(tmp_path, tiny_clip):
    from protext.training import TrainJob, TrainJobError, run_training

    # the job's --model has no config file here; the loaded tower decides, with the same message
    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), model="some-model-without-a-config", pretrained="random",
                   out=tmp_path / "x.safetensors", cache_dir=tmp_path / "cache", depth=3)
    with pytest.raises(TrainJobError, match=r"^--depth 3: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less\.$"):
        run_training(job, clip=tiny_clip, progress=False, report=lambda line: None)


def test_a_model_without_a_config_is_fitted_once_loaded(tmp_path, tiny_clip, monkeypatch):
    import protext.training as training
    from protext.training import TrainJob, run_training

    monkeypatch.setattr(training, "_load_model", lambda job, device: tiny_clip)  # a model known only once loaded
    lines: list[str] = []
    job = TrainJob(_jsonl(tmp_path / "d.jsonl"), model="some-model-without-a-config", pretrained="random",
                   out=tmp_path / "x.safetensors", cache_dir=tmp_path / "cache", epochs=2, warmup_epochs=0)
    outcome = run_training(job, progress=False, report=lines.append)
    assert outcome.complete and lines.count(TINY_DEPTH_NOTE) == 1 and outcome.settings.depth == 2


# -------------------------------------------------------------------------------------------------- layering


def test_evaluation_hashes_files_without_importing_training(tmp_path):
    probe = tmp_path / "f.bin"
    probe.write_bytes(b"protext" * 1000)
    code = (f"import sys; from protext.evaluation.features import file_digest; print(file_digest({str(probe)!r})); "
            "print('protext.training' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    import hashlib

    assert done.stdout.split() == [hashlib.sha256(b"protext" * 1000).hexdigest(), "False"]


def test_the_package_keeps_the_single_module_names():
    import protext.training as training

    for name in ("TrainJob", "TrainConfig", "TextPairs", "EpochRecord", "TrainResult", "TrainOutcome", "ClassSelection",
                 "NonFiniteLossError", "ResumeStateError", "TrainJobError", "TrainLockError", "run_training", "train",
                 "fast_batch_loss", "prompt_loss", "select_classes", "side_paths", "run_lock", "load_resume_state",
                 "save_resume_state", "run_identity", "write_history", "plot_history", "resolve_precision",
                 "check_output_paths", "check_resume_inputs", "file_sha256", "STATE_FORMAT", "PRECISIONS", "LOSSES"):
        assert hasattr(training, name), name
