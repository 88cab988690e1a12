"""EvalConfig in-process: the flag checks, derived settings, results name and resume fingerprint.

Written against mutants of ``protext/evaluation/{config,flags,validation,identity}.py`` that the
existing tests left alive: most flag checks were tested only through ``python -m protext.eval`` in
a subprocess, which mutation testing cannot see. Every expectation is written out by hand from
``--help``, the README and the docstrings (messages: their key words), never from the modules' helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from protext.errors import UserError
from protext.evaluation import config as eval_config
from protext.evaluation.config import EvalConfig, EvalError, max_workers, parse_stream_seeds, uses_descriptions

ALL_TTA = "tpt,ctpt,otpt,zero,tda,mta,dmn,dmn-oracle,dpe,boost,tps"


def _cfg(**kwargs) -> EvalConfig:
    return EvalConfig(**{"dataset": "dtd", "root": "imgs", **kwargs})


def _refused(match: str, **kwargs) -> str:
    """Validate, expecting an EvalError (not a bare TTAConfigError) whose message holds ``match``."""
    with pytest.raises(EvalError) as err:
        _cfg(**kwargs).validate()
    assert type(err.value) is EvalError
    message = str(err.value)
    assert match in message, message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# flags


def test_methods_that_read_descriptions():
    readers = {"cupl", "template+cupl", "ensemble+cupl", "ensemble80+cupl", "ensemble80+descriptors"}
    for method in ("clip", "prompts", "ensemble", "ensemble80", *readers):
        assert uses_descriptions(method) is (method in readers), method


def test_loader_processes_are_four_per_usable_core(monkeypatch):  # no 'worker' in the name: mutmut's -k drops those
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert max_workers() == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(), raising=False)
    assert max_workers() == 4  # at least one core

    def no_affinity(pid):
        raise OSError("not here")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert max_workers() == 20
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert max_workers() == 4
    monkeypatch.delattr(os, "sched_getaffinity")  # not on Linux
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert max_workers() == 12


def test_stream_seeds_parse():
    assert parse_stream_seeds("1,2,3") == [1, 2, 3]
    assert parse_stream_seeds(" 4, ,5,") == [4, 5]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers such as 1,2,3, got 'a,1'"):
        parse_stream_seeds("a,1")
    with pytest.raises(argparse.ArgumentTypeError, match="at least one integer seed, got ' , '"):
        parse_stream_seeds(" , ")


# --------------------------------------------------------------------------------------------------
# validation: the settings that need no --tta


def test_defaults_and_good_settings_pass():
    _cfg().validate()
    _cfg(dataset="folder", device="cuda:1", precision="bf16", split="novel", templates="coop").validate()
    _cfg(template="a {{x}} photo of a {}.", batch_size=8192, workers=0, limit=1, seed=2**63 - 1).validate()
    _cfg(method="prompts", prompts="p.safetensors").validate()
    _cfg(method="cupl", descriptions="d.jsonl").validate()
    assert issubclass(EvalError, UserError)


@pytest.mark.parametrize("flag,field,value", [
    ("--method", "method", "tpt"), ("--split", "split", "train"), ("--precision", "precision", "amp"),
    ("--templates", "templates", "clip"),
])
def test_choices_list_what_is_allowed(flag, field, value):
    message = _refused(f"{flag} must be one of ", **{field: value})
    assert message.endswith(f", got '{value}'.")
    assert {"method": "clip, cupl, prompts", "split": "all, base, novel", "precision": "auto, fp32, bf16, fp16",
            "templates": "protext, coop, tpt"}[field] in message


@pytest.mark.parametrize("device", ["gpu", "cuda:", "xcpu", "cuda:a", "CPU"])
def test_bad_devices(device):
    assert _refused("--device must be auto, cpu, mps, cuda or cuda:N", device=device).endswith(f"got '{device}'.")


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(device):
    _cfg(device=device).validate()


@pytest.mark.parametrize("template", ["a {} of {}", "a photo of a {name}", "a photo", "a {{}} photo", "a { photo {}"])
def test_bad_templates(template):
    message = _refused(f"--template '{template}' must hold exactly one '{{}}'", template=template)
    assert message.endswith("no other braces (write a literal brace as '{{' or '}}').")


def test_dataset_and_empty_paths():
    assert _refused("--dataset: ", dataset="dtdd").endswith(".")
    assert "dtdd" in _refused("--dataset", dataset="dtdd")
    _refused("--root is empty", root="  ")
    for flag, field in (("--out", "out"), ("--classes", "classes"), ("--prompts", "prompts"),
                        ("--descriptions", "descriptions")):
        _refused(f"{flag} is empty; name a file", **{field: " "})
        _refused(f"{flag} is empty", **{field: ""})


@pytest.mark.parametrize("method", ["cupl", "template+cupl", "ensemble+cupl", "ensemble80+cupl", "ensemble80+descriptors"])
def test_description_methods_need_descriptions(method):
    _refused(f"--method {method} needs --descriptions FILE", method=method)


def test_prompts_method_needs_a_checkpoint():
    _refused("--method prompts needs --prompts CHECKPOINT", method="prompts")


@pytest.mark.parametrize("field,flag,bad,want", [
    ("batch_size", "--batch-size", 0, "between 1 and 8192, got 0."),
    ("batch_size", "--batch-size", 8193, "between 1 and 8192, got 8193."),
    ("workers", "--workers", -1, "at least 0, got -1."),
    ("limit", "--limit", 0, "at least 1, got 0."),
    ("seed", "--seed", -1, f"between 0 and {2**63 - 1}, got -1."),
    ("seed", "--seed", 2**63, f"between 0 and {2**63 - 1}, got {2**63}."),
    ("batch_size", "--batch-size", True, "a whole number, got True."),
    ("workers", "--workers", 2.0, "a whole number, got 2.0."),
    ("seed", "--seed", "3", "a whole number, got '3'."),
])
def test_counts_are_bounded(field, flag, bad, want):
    assert _refused(f"{flag} must be {want}", **{field: bad}).endswith(want)


def test_counts_at_their_bounds_and_beyond_without_an_upper_bound():
    _cfg(workers=10**9, limit=10**9, batch_size=1, seed=0).validate()


# --------------------------------------------------------------------------------------------------
# validation: test-time options


@pytest.mark.parametrize("field,value,flag", [
    ("tta_init", "handcrafted", "--tta-init"), ("stream_seeds", [1], "--stream-seeds"), ("stream_runs", 2, "--stream-runs"),
    ("stream_seed", 0, "--stream-seed"), ("scenario", "low", "--scenario"), ("tasks", 1, "--tasks"),
    ("tda_alpha", 1.0, "--tda-alpha"), ("tta_naive", True, "--tta-naive"), ("augmix", False, "--augmix"),
])
def test_tta_options_without_tta(field, value, flag):
    message = _refused(f"{flag} is a test-time adaptation option; add --tta {{{ALL_TTA}}} or drop it.", **{field: value})
    assert message.startswith(flag + " ")


def test_a_run_option_set_to_true_without_tta_is_refused():
    _refused("--stream-runs is a test-time adaptation option", stream_runs=True)


def test_switches_left_off_without_tta_pass():
    _cfg(tta_naive=False, tta_options={"tda_alpha": None}).validate()


def test_unknown_tta_options_name_the_first():
    _refused("tta_options: no method has an option 'aa' (see python -m protext.eval --help).",
             tta="tda", tta_options={"zz": 1, "aa": 2})


def test_tta_options_go_through_the_methods_checks():
    _refused("--tda-alpha", tta="tda", tta_options={"tda_alpha": -1.0, "tda_beta": 1.0})
    _refused("--tta-views", tta="tpt", tta_views=0)
    _cfg(tta="tda", tta_options={"tda_alpha": 1.0, "tda_beta": 2.0}).validate()


def test_a_field_wins_over_tta_options():
    assert _cfg(tda_alpha=2.0, tta_options={"tda_alpha": 1.0}).tta_values() == {"tda_alpha": 2.0}
    assert _cfg(tta_options={"tda_alpha": 1.0, "tda_beta": None}).tta_values() == {"tda_alpha": 1.0}
    # off-by-default switch left off: not given; an on/off option set to off: a choice
    assert _cfg(tta_naive=False, augmix=False).tta_values() == {"augmix": False}
    assert _cfg(tta_naive=True).tta_values() == {"tta_naive": True}
    assert _cfg(tta_options={"tta_naive": False}).tta_values() == {}
    assert _cfg().tta_values() == {}


def test_unknown_method():
    _refused("--tta must be one of tpt, ctpt, otpt, zero, tda, mta, dmn, dmn-oracle, dpe, boost, tps, got 'nope'.", tta="nope")


def test_stream_runs_need_an_online_method():
    message = _refused("--stream-runs: --tta tpt treats every image on its own", tta="tpt", stream_runs=2)
    assert message.endswith("so its result does not depend on the stream order; one run is all there is (drop --stream-runs).")
    _cfg(tta="tda", stream_runs=2).validate()


def test_run_options_name_the_methods_they_are_for():
    _refused("--tta-init does not apply to --tta tda (it is for --tta tpt, ctpt, otpt); drop it.", tta="tda", tta_init="handcrafted")
    _refused("--stream-seeds does not apply to --tta zero (it is for --tta tda, dmn, dmn-oracle, dpe, boost); drop it.",
             tta="zero", stream_seeds=[1])
    _cfg(tta="tpt", tta_init="handcrafted").validate()
    _cfg(tta="dpe", stream_seeds=[1]).validate()


def test_prompt_tuners_start_from_what_init_names():
    _cfg(tta="tpt").validate()  # --method clip: handcrafted
    _refused("--tta-init must be one of handcrafted, prompts, coop, got 'nope'.", tta="tpt", tta_init="nope")
    _refused("--tta-init prompts needs --prompts CHECKPOINT to start from.", tta="ctpt", tta_init="prompts")
    _refused("--tta-init coop needs --prompts CHECKPOINT", tta="otpt", tta_init="coop")
    _cfg(tta="tpt", tta_init="coop", prompts="c.pth").validate()
    _refused("--tta tpt tunes prompt vectors, and --method cupl has none", tta="tpt", method="cupl", descriptions="d.jsonl")


def test_stream_seeds():
    _cfg(tta="tda", stream_seeds=[0, 1, 2]).validate()
    _cfg(tta="tda", stream_seeds=list(range(100))).validate()
    _refused("--stream-seeds must be distinct integers such as 1,2,3, got [1, 1].", tta="tda", stream_seeds=[1, 1])
    _refused("--stream-seeds must be distinct integers", tta="tda", stream_seeds=[])
    _refused("--stream-seeds names 101 streams, each a full pass over the dataset; at most 100.",
             tta="tda", stream_seeds=list(range(101)))
    _refused("--stream-seeds must be between 0 and", tta="tda", stream_seeds=[3, -1])
    _refused("--stream-seeds must be a whole number", tta="tda", stream_seeds=[1.5])


def test_stream_seed_and_tasks_need_what_they_seed_or_count():
    _refused("--stream-seed seeds the orders of --stream-runs or the draws of --scenario", tta="tda", stream_seed=3)
    _refused("--tasks counts the tasks or streams of --scenario; add --scenario NAME", tta="tda", tasks=3)
    _cfg(tta="tda", stream_seed=3, stream_runs=2).validate()
    _cfg(tta="tda", stream_seed=3, scenario="low", tasks=3).validate()


def test_scenarios():
    for name in ("very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all",
                 "online-low", "online-medium", "online-high", "online-separate"):
        _cfg(tta="tda", scenario=name).validate()
    _refused("--scenario must be one of very_low, low,", tta="tda", scenario="middle")
    _refused("--scenario replays each image's encoded views, and --tta tpt tunes prompts", tta="tpt", scenario="low")
    _refused("--scenario draws its own tasks and streams; drop --stream-runs/--stream-seeds.", tta="tda", scenario="low", stream_runs=2)
    _refused("--scenario draws its own tasks", tta="tda", scenario="low", stream_seeds=[1])
    _refused("--tasks must be between 1 and 10000, got 0.", tta="tda", scenario="low", tasks=0)
    _refused("--tasks must be between 1 and 10000, got 10001.", tta="tda", scenario="low", tasks=10001)
    _cfg(tta="tda", scenario="low", tasks=10000).validate()
    _refused("--stream-seed must be between 0 and", tta="tda", scenario="low", stream_seed=-1)
    _refused("--stream-seed must be between 0 and", tta="tda", scenario="low", stream_seed=2**63)


def test_stream_runs():
    _cfg(tta="tda", stream_runs=1).validate()
    _cfg(tta="tda", stream_runs=10000, stream_seed=0).validate()
    _refused("--stream-runs must be between 1 and 10000, got 0.", tta="tda", stream_runs=0)
    _refused("--stream-runs must be between 1 and 10000, got 10001.", tta="tda", stream_runs=10001)
    _refused("--stream-seed must be between 0 and", tta="tda", stream_runs=2, stream_seed=-1)
    _refused("--stream-runs and --stream-seeds are two ways to draw stream orders; use one.",
             tta="tda", stream_runs=2, stream_seeds=[1])


def test_several_methods_in_one_pass():
    _cfg(tta="zero,tda").validate()
    _cfg(tta="zero, tda ,mta").validate()
    _cfg(tta="zero,tda", zero_votes="fp16").validate()  # each method checks only its own options
    _cfg(tta="zero,tda", tda_alpha=1.0, tda_beta=1.0).validate()
    _refused("--tta must be one of", tta="zero,nope")
    _refused("got ''", tta="zero,")
    assert _refused("--tta zero,tpt: tpt tunes prompts through the text tower", tta="zero,tpt").endswith(
        "cannot share one encoding of the views with other methods; run it on its own.")
    _refused("--tta zero,zero: name each method once, at least two of them.", tta="zero,zero")
    _refused("--tda-alpha does not apply to any of --tta zero,mta; drop it.", tta="zero,mta", tda_alpha=1.0)
    _refused("--tda-alpha must be", tta="zero,tda", tda_alpha=-1.0, tda_beta=1.0)
    _refused("--zero-votes", tta="zero,tda", zero_votes="soft")


@pytest.mark.parametrize("field,value,flag", [
    ("tta_batch", 2, "--tta-batch"), ("stream_seeds", [1], "--stream-seeds"), ("tta_init", "handcrafted", "--tta-init"),
    ("stream_runs", 2, "--stream-runs"), ("scenario", "low", "--scenario"),
])
def test_one_pass_refuses_what_adapts_one_stream(field, value, flag):
    message = _refused(f"{flag} is not supported with several methods in one pass", tta="zero,tda", **{field: value})
    assert message.endswith("(it adapts one image at a time over one stream); run the methods one at a time.")


# --------------------------------------------------------------------------------------------------
# derived settings


def test_seeds_default_to_the_papers():
    assert _cfg().scenario_seed == 1 and _cfg(stream_seed=0).scenario_seed == 0 and _cfg(stream_seed=7).scenario_seed == 7
    assert _cfg().stream_seed_or_default == 42 and _cfg(stream_seed=0).stream_seed_or_default == 0


def test_tta_methods_and_label():
    assert _cfg().tta_methods == [] and _cfg(tta="").tta_methods == []
    assert _cfg(tta="zero, tda").tta_methods == ["zero", "tda"]
    assert _cfg().label() == "clip"
    assert _cfg(method="prompts", tta="tpt").label() == "prompts + TPT"


def test_init_and_checkpoint_use():
    assert _cfg(tta="tpt", tta_init="coop", method="cupl").resolved_tta_init() == "coop"
    assert _cfg(tta="tpt").resolved_tta_init() == "handcrafted"
    for path, init in (("a.pth", "coop"), ("a.pt", "coop"), ("a.tar", "coop"), ("a.safetensors", "prompts"), (None, "prompts")):
        assert _cfg(tta="tpt", method="prompts", prompts=path).resolved_tta_init() == init, path
    with pytest.raises(EvalError) as err:
        _cfg(tta="tpt", method="ensemble").resolved_tta_init()
    assert str(err.value).startswith("--tta tpt tunes prompt vectors, and --method ensemble has none (its classes are averaged")
    assert str(err.value).endswith(" text features). Use --method clip or --method prompts, or pass --tta-init.")
    assert _cfg(tta="tpt").tunes_prompts and not _cfg(tta="tda").tunes_prompts and not _cfg().tunes_prompts
    assert _cfg(method="prompts").uses_checkpoint()
    assert not _cfg(tta="tpt").uses_checkpoint()
    assert _cfg(tta="tpt", tta_init="prompts").uses_checkpoint() and _cfg(tta="tpt", tta_init="coop").uses_checkpoint()
    assert not _cfg(tta="tda", tta_init="prompts").uses_checkpoint()


def test_input_paths():
    assert _cfg().input_paths() == {}
    assert _cfg(prompts="p.pth", descriptions="d.jsonl", classes="c.txt", pretrained="w.bin").input_paths() == {
        "--prompts": "p.pth", "--descriptions": "d.jsonl", "--classes": "c.txt", "--pretrained": "w.bin"}
    assert _cfg(pretrained="laion2b_s34b_b88k", classes="").input_paths() == {}


# --------------------------------------------------------------------------------------------------
# identity: the default results name and the resume fingerprint, by hand


def _by_hand_identity(config: EvalConfig) -> dict:
    out = dataclasses.asdict(config)
    for key in ("out", "overwrite", "workers", "progress"):
        del out[key]
    out["root"] = str(Path(config.root).expanduser().resolve())
    return out


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def test_identity_makes_paths_absolute_and_keeps_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _cfg(limit=5, workers=9, out="x.json", overwrite=True, progress=False)
    assert config.identity() == _by_hand_identity(config)
    assert config.identity()["limit"] == 5
    files = _cfg(classes="c.txt", descriptions="~/d.jsonl", prompts="p.pth", pretrained="w.bin").identity()
    assert files["classes"] == str(tmp_path / "c.txt") and files["prompts"] == str(tmp_path / "p.pth")
    assert files["pretrained"] == str(tmp_path / "w.bin")
    assert files["descriptions"] == str(Path.home() / "d.jsonl")
    assert _cfg(classes="DTD").identity()["classes"] == "DTD"  # a built-in list, by its name
    assert _cfg(pretrained="openai").identity()["pretrained"] == "openai"
    (tmp_path / "dtd").write_text("a\n")
    (tmp_path / "openai").mkdir()
    assert _cfg(classes="dtd").identity()["classes"] == str(tmp_path / "dtd")  # a file of that name wins
    assert _cfg(pretrained="openai").identity()["pretrained"] == str(tmp_path / "openai")


def test_default_results_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _cfg()
    want = f"dtd-all-clip-ViT-B-16-openai-{_hash(_by_hand_identity(config))[:10]}.json"
    assert config.output_path() == Path("results") / want
    assert _cfg(out="mine.json").output_path() == Path("mine.json")
    name = _cfg(dataset="folder", root="my pics", split="base", tta="tda", model="ViT B/16",
                pretrained="/w/ck.safetensors").output_path().name
    assert name.startswith("folder_my_pics-base-clip-tda-ViT_B_16-ck.safetensors-")
    assert _cfg(pretrained=f"weights{os.sep}openai").output_path().name.startswith("dtd-all-clip-ViT-B-16-openai-")
    assert _cfg(method="prompts", prompts="ck/p.safetensors").output_path().name.startswith(
        "dtd-all-prompts-ViT-B-16-openai-p.safetensors-")
    assert _cfg(method="cupl", descriptions="d/x.jsonl").output_path().name.startswith("dtd-all-cupl-ViT-B-16-openai-x.jsonl-")
    assert "x.jsonl" not in _cfg(descriptions="d/x.jsonl").output_path().name  # --method clip reads no descriptions
    assert _cfg(tta="tpt", tta_init="coop", prompts="c.pth").output_path().name.startswith("dtd-all-clip-tpt-ViT-B-16-openai-c.pth-")
    # flags validate refuses still get a name, without a source
    assert _cfg(tta="tpt", method="ensemble").output_path().name.startswith("dtd-all-ensemble-tpt-ViT-B-16-openai-")
    assert "-a.jsonl-" not in _cfg(tta="tpt", method="cupl", descriptions="a.jsonl").output_path().name
    stem = _cfg(model="." * 3 + "m" * 50 + "._").output_path().name
    assert stem.startswith("dtd-all-clip-" + "m" * 40 + "-openai-")
    assert _cfg(model="...").output_path().name.startswith("dtd-all-clip-_-openai-")
    assert len(config.output_path().stem.rsplit("-", 1)[1]) == 10
    assert _cfg(model="XL-X").output_path().name.startswith("dtd-all-clip-XL-X-openai-")  # only '.' and '_' are trimmed
    assert _cfg(pretrained="..").output_path().name.startswith("dtd-all-clip-ViT-B-16-_-")  # a tag as is, never dropped


def test_path_objects_from_python_callers_are_named_and_fingerprinted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _cfg(root=Path("imgs"), classes=Path("dtd"))  # a built-in list, kept as given
    assert config.identity()["classes"] == Path("dtd")
    assert config.output_path().name.startswith("dtd-all-clip-ViT-B-16-openai-")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "overwrite", "workers", "progress", "limit")}
    assert config.fingerprint({}) == _hash({"settings": settings, "files": {}})


def test_fingerprint_by_hand():
    config = _cfg(limit=5, workers=9, out="x.json", overwrite=True, progress=False)
    settings = dataclasses.asdict(config)
    for key in ("out", "overwrite", "workers", "progress", "limit"):
        del settings[key]
    digests = {"--prompts": "abc"}
    assert config.fingerprint(digests) == _hash({"settings": settings, "files": digests})
    online = _cfg(tta="tda", limit=5)
    settings = dataclasses.asdict(online)
    for key in ("out", "overwrite", "workers", "progress"):
        del settings[key]
    assert online.fingerprint({}) == _hash({"settings": settings, "files": {}})


def test_config_keeps_every_name_it_had():
    for name in ("SPLITS", "PRECISIONS", "METHODS", "MIXED_FEATURES", "TPS_FEATURES", "TEMPLATE_RULES", "TTA_INITS",
                 "COOP_SUFFIXES", "TTA_METHODS", "ONLINE_METHODS", "PROMPT_TUNERS", "MAX_TTA_VIEWS", "MAX_TTA_STEPS",
                 "MAX_TTA_BATCH", "MAX_VIEWS_IN_FLIGHT", "MAX_BATCH_SIZE", "MAX_STREAM_SEEDS", "MAX_STREAM_RUNS",
                 "SCENARIOS", "MAX_SEED", "WORKERS_PER_CORE", "EvalConfig", "EvalError", "max_workers",
                 "parse_stream_seeds", "uses_descriptions", "_NOT_IN_FINGERPRINT"):
        assert hasattr(eval_config, name), name


def test_batch_stream_update_needs_stream_runs():
    for tta in ("tda", "tda,dmn"):  # a single method and a pass of several
        message = _refused("--stream-update batch is OGA's rule for the batches of 32 of --stream-runs's orders",
                           tta=tta, tta_options={"stream_update": "batch"})
        assert "not for a plain run, --stream-seeds or --scenario;" in message
        assert message.endswith("add --stream-runs N or drop it.")
    _cfg(tta="tda", stream_runs=2, tta_options={"stream_update": "batch"}).validate()
    _cfg(tta="tda", tta_options={"stream_update": "image"}).validate()


# ------------------------------------------------------------------------------------------ command_line


def test_command_line_names_every_non_default_setting_and_each_tta_option_once():
    cfg = _cfg(method="prompts", prompts="ckpt.safetensors", tta="tda", model="tiny-clip", pretrained="random",
               seed=7, out="r.json").with_tta_values({"tda_alpha": 2.0, "augmix": False, "tta_views": 8})
    argv = [str(a) for a in cfg.command_line()]
    # written by hand from --help: the data, the features, then each given test-time option
    assert argv[:6] == ["--dataset", "dtd", "--root", "imgs", "--method", "prompts"]
    assert argv[-2:] == ["--out", "r.json"]
    pairs = argv[6:-2]
    for flag, value in (("--prompts", "ckpt.safetensors"), ("--tta", "tda"), ("--model", "tiny-clip"),
                        ("--pretrained", "random"), ("--seed", "7"), ("--tda-alpha", "2.0"), ("--tta-views", "8")):
        assert pairs[pairs.index(flag) + 1] == value, flag
    assert "--no-augmix" in pairs and "--augmix" not in pairs  # an on/off option turned off is written as its --no- form
    assert "--descriptions" not in pairs and "--device" not in pairs  # defaults stay unsaid
    assert len(pairs) == 2 * 7 + 1


def test_command_line_parses_back_to_the_same_config():
    from protext.eval import parse_config

    cfg = _cfg(method="cupl", descriptions="d.jsonl", tta="tpt,zero", precision="fp32", workers=0,
               out="x.json").with_tta_values({"tta_steps": 2, "tta_views": 16})
    again = parse_config([str(a) for a in cfg.command_line()])
    for field in ("dataset", "root", "method", "descriptions", "tta", "precision", "workers"):
        assert str(getattr(again, field)) == str(getattr(cfg, field)), field
    assert again.tta_values() == cfg.tta_values()


def test_command_line_writes_a_switch_that_is_on_and_a_device_asked_for():
    argv = [str(a) for a in _cfg(tta="tpt", device="cpu", tta_naive=True).command_line()]
    assert argv[argv.index("--device") + 1] == "cpu"
    assert "--tta-naive" in argv and "--no-tta-naive" not in argv


# ------------------------------------------------------------------------------------------ with_tta_values


def test_with_tta_values_puts_each_option_on_its_field_or_in_tta_options():
    cfg = _cfg(tta="tda,dmn", tta_options={"dmn_memory": 8}).with_tta_values(
        {"tda_alpha": 2.0, "dmn_beta": 3.0, "tda_positive_shots": 5, "dpe_shots": None, "tta_views": None})
    assert cfg.tda_alpha == 2.0  # a flag older than the registry keeps its field
    assert cfg.tta_options == {"dmn_memory": 8, "dmn_beta": 3.0, "tda_positive_shots": 5}  # None: not given
    assert _cfg().with_tta_values({"tda_alpha": 1.0}).tta_options is None  # nothing extra: no empty dict
    assert _cfg().with_tta_values({}).tta_options is None


def test_identity_resolves_the_paths_after_a_built_in_class_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ident = _cfg(classes="dtd", descriptions="d.jsonl", prompts="p.pth").identity()
    assert ident["classes"] == "dtd"
    assert (ident["descriptions"], ident["prompts"]) == (str(tmp_path / "d.jsonl"), str(tmp_path / "p.pth"))


def test_stream_update_batch_outside_stream_runs_says_why_in_full():
    message = _refused("--stream-update", tta="tda", tta_options={"stream_update": "batch"})
    assert message == ("--stream-update batch is OGA's rule for the batches of 32 of --stream-runs's orders (the "
                       "whole batch updates the state, then is predicted), not for a plain run, --stream-seeds or "
                       "--scenario; add --stream-runs N or drop it.")


@pytest.mark.parametrize("flag, extra", [("--stream-runs", {"stream_runs": 3}), ("--scenario", {"scenario": "low"})])
def test_dmn_oracle_refuses_replayed_runs_naming_the_flag(flag, extra):
    assert _refused("dmn-oracle", tta="dmn-oracle", **extra) == (
        f"{flag}: --tta dmn-oracle picks beta2 on the test labels after one whole stream, which the replayed runs "
        "do not do; use --tta dmn (beta2 announced) or drop the flag.")
    _cfg(tta="dmn-oracle").validate()  # one plain stream is the oracle's own protocol


# what a user reads, word for word (the checks above match key words; these pin the whole sentence)
WHOLE_MESSAGES = [
    ({"method": "prompts"}, "--method prompts needs --prompts CHECKPOINT (.safetensors, or a CoOp .pth)."),
    ({"workers": -1}, "--workers must be at least 0, got -1."),
    ({"root": ""}, "--root is empty; name the folder that holds the dataset."),
    ({"tta": "tda", "stream_seed": 3},
     "--stream-seed seeds the orders of --stream-runs or the draws of --scenario; add one or drop it."),
    ({"tta": "tda", "tasks": 5}, "--tasks counts the tasks or streams of --scenario; add --scenario NAME or drop it."),
    ({"tta": "tda", "scenario": "low", "stream_runs": 3},
     "--scenario draws its own tasks and streams; drop --stream-runs/--stream-seeds."),
    ({"tta": "tda", "stream_runs": 3, "stream_seeds": [1, 2]},
     "--stream-runs and --stream-seeds are two ways to draw stream orders; use one."),
    ({"tta": "tpt", "scenario": "low"},
     "--scenario replays each image's encoded views, and --tta tpt tunes prompts through the text tower from the "
     "views themselves; run it without --scenario."),
]


@pytest.mark.parametrize("settings, message", WHOLE_MESSAGES, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(WHOLE_MESSAGES)])
def test_refusals_word_for_word(settings, message):
    assert _refused(message.split()[0].rstrip(":"), **settings) == message
