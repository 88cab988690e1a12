"""``python -m protext.train`` and ``python -m protext.export`` end to end on tiny-clip."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import protext
from conftest import TEST_TIMEOUT, reap, sigkill
from protext.checkpoint import load_prompts
from protext.descriptions import import_cupl
from protext.export import main as export_main
from protext.models import load_clip
from protext.prompts import PromptedTextEncoder, PromptShapeError
from protext.train import build_parser, main
from protext.training import load_resume_state

REPO = Path(__file__).resolve().parents[1]
LONG = "a texture described at great length " + " ".join(f"detail{i}" for i in range(100)) + "."


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"classname": c, "description": d}) + "\n" for c, d in rows))
    return path


@pytest.fixture(scope="module")
def dtd_data(shared_dir):
    return json.loads((shared_dir / "cupl" / "texture_prompts_full.json").read_text())


@pytest.fixture
def small_jsonl(tmp_path, dtd_data) -> Path:
    """6 DTD classes x 10 descriptions."""
    return write_jsonl(tmp_path / "small.jsonl", [(c, d) for c in list(dtd_data)[:6] for d in dtd_data[c][:10]])


@pytest.fixture(scope="module")
def dtd_jsonl(tmp_path_factory, shared_dir) -> Path:
    path = tmp_path_factory.mktemp("dtd") / "dtd.jsonl"
    import_cupl(shared_dir / "cupl" / "texture_prompts_full.json", path)
    return path


def cli(desc: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--descriptions", str(desc), "--model", "tiny-clip", "--pretrained", "random", "--depth", "2",
        "--out", str(out), "--cache-dir", str(out.parent / "cache"), "--quiet", *extra,
    ]


def run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in [
        "--descriptions", "--model", "--pretrained", "--preset", "--n-ctx", "--depth", "--ctx-init", "--lr",
        "--epochs", "--warmup-epochs", "--batch-size", "--loss", "--loss-weight", "--seed", "--device",
        "--precision", "--classes", "--split", "--out", "--naive", "--resume", "--overwrite", "--cache-dir",
        "--no-cache", "--keep-last-batch", "--quiet", "--no-shared-prefix",
    ]:
        assert flag in text, flag
    assert "text_only/dtd" in text and "base2novel" in text


def test_run_writes_checkpoint_history_plot_and_metadata(tmp_path, small_jsonl, capsys):
    out = tmp_path / "ck" / "dtd.safetensors"
    code, err = run(capsys, cli(small_jsonl, out, "--preset", "text_only/dtd", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16"))
    assert code == 0, err
    assert "60 descriptions of 6 classes" in err and "done: 3 epochs" in err
    for name in ("dtd.safetensors", "dtd.loss.json", "dtd.loss.png", "dtd.resume.pt"):
        assert (out.parent / name).is_file(), name
    assert (out.parent / "dtd.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = protext.load_prompts(out)  # the public entry point
    meta = ckpt.meta
    assert ckpt.ctx.shape == (16, 64) and ckpt.deep_prompts.shape == (1, 16, 64)
    assert (meta["model"], meta["pretrained"], meta["width"], meta["n_ctx"], meta["depth"]) == ("tiny-clip", "random", 64, 16, 2)
    assert meta["ctx_init"] is None  # n_ctx 16 > 4: random context, "X X ... X {}."
    assert meta["template"] == "{}."
    assert meta["classes"] == [json.loads(line)["classname"] for line in small_jsonl.read_text().splitlines()[::10]]
    assert meta["preset"] == "text_only/dtd" and meta["preset_values"]["lr"] == 0.03
    hyper = meta["hyperparameters"]
    assert (hyper["lr"], hyper["epochs"], hyper["warmup_epochs"], hyper["batch_size"]) == (0.03, 3, 1, 16)
    assert (hyper["loss"], hyper["loss_weight"], hyper["betas"], hyper["weight_decay"]) == ("mse", 1000.0, [0.9, 0.98], 0.1)
    assert (hyper["seed"], hyper["precision"], hyper["n_ctx"], hyper["depth"]) == (1, "fp32", 16, 2)
    assert meta["descriptions_sha256"] == hashlib.sha256(small_jsonl.read_bytes()).hexdigest()
    assert meta["protext_version"] == protext.__version__
    assert meta["epochs_done"] == 3 and meta["complete"] is True

    history = json.loads((out.parent / "dtd.loss.json").read_text())
    assert history["status"] == "complete" and len(history["epochs"]) == 3
    assert meta["final_loss"] == pytest.approx(history["final_loss"]) == pytest.approx(history["epochs"][-1]["loss"])
    assert [e["lr"] for e in history["epochs"]] == pytest.approx([1e-5, 0.03, 0.03 * 0.5 * (1 + math.cos(math.pi / 3))])
    assert all(len(s) == 3 for s in history["step_losses"])  # 60 samples, batch 16: the last 12 dropped

    # round trip: the checkpoint rebuilds the trained encoder, which the saved state also holds
    state = load_resume_state(out.parent / "dtd.resume.pt")
    assert torch.equal(state["prompts"]["ctx"], ckpt.ctx) and torch.equal(state["prompts"]["deep_prompts"], ckpt.deep_prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("tiny-clip", "random")
    encoder = ckpt.build_encoder(clip.model, clip.tokenizer, meta["classes"])
    assert torch.equal(encoder.ctx.detach(), ckpt.ctx) and encoder.prompts[0].startswith("X X X")


def test_width_and_depth_mismatch_name_both(tmp_path, small_jsonl, capsys):
    out = tmp_path / "p.safetensors"
    assert run(capsys, cli(small_jsonl, out, "--epochs", "1", "--warmup-epochs", "0"))[0] == 0
    ckpt = load_prompts(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = load_clip("ViT-B-16", "random")
    with pytest.raises(PromptShapeError, match=r"width 64 .* width 512"):
        ckpt.build_encoder(big.model, big.tokenizer, ["banded"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = load_clip("tiny-clip", "random")
    shallow = PromptedTextEncoder(tiny.model, tiny.tokenizer, ["banded"], n_ctx=4, depth=1)
    with pytest.raises(PromptShapeError, match=r"depth 2.*depth 1"):
        shallow.load_prompt_state(ckpt.state())


def test_export_coop_loads_with_weights_only(tmp_path, small_jsonl, capsys):
    out = tmp_path / "p.safetensors"
    assert run(capsys, cli(small_jsonl, out, "--epochs", "1", "--warmup-epochs", "0"))[0] == 0
    pth = tmp_path / "coop" / "ctx.pth"
    assert export_main(["--format", "coop", str(out), str(pth)]) == 0
    assert "deep prompts" in capsys.readouterr().err
    payload = torch.load(pth, weights_only=True)
    assert list(payload) == ["state_dict"] and list(payload["state_dict"]) == ["ctx"]
    assert payload["state_dict"]["ctx"].shape == (4, 64)
    assert torch.equal(payload["state_dict"]["ctx"], load_prompts(out).ctx)
    assert export_main(["--format", "coop", str(tmp_path / "missing.safetensors"), str(pth)]) == 2
    assert "no such prompt checkpoint" in capsys.readouterr().err
    before = out.read_bytes()
    assert export_main(["--format", "coop", str(out), str(out)]) == 2  # never over its own input
    assert "is the run's own input (checkpoint" in capsys.readouterr().err and out.read_bytes() == before
    assert export_main(["--format", "coop", str(out), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- bad input


def test_empty_description_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "ck" / "x.safetensors"
    code, err = run(capsys, cli(empty, out))
    assert code == 2 and "holds no descriptions" in err and str(empty) in err
    assert not (tmp_path / "ck").exists()


def test_missing_and_malformed_description_files(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, err = run(capsys, cli(tmp_path / "nope.jsonl", out))
    assert code == 2 and "nope.jsonl: no such file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"classname": "a", "description": "b"}\n{not json\n{"classname": "a", "description": "c"}\n')
    code, err = run(capsys, cli(bad, out))
    assert code == 2 and f"{bad}:2" in err
    assert not out.exists()


def test_classes_subset_drops_and_warns(tmp_path, small_jsonl, capsys):
    names = [json.loads(line)["classname"] for line in small_jsonl.read_text().splitlines()[::10]]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join([names[2].upper(), names[0], "velvety", "# a comment", ""]) + "\n")
    out = tmp_path / "sub.safetensors"
    code, err = run(capsys, cli(small_jsonl, out, "--classes", str(classes), "--epochs", "1", "--warmup-epochs", "0"))
    assert code == 0, err
    dropped = [n for n in names if n not in (names[0], names[2])]
    assert f"4 classes of {small_jsonl} are not among the selected classes" in err
    assert "their 40 descriptions are dropped" in err and all(f"'{n}'" in err for n in dropped)
    assert "warning: 1 selected classes have no descriptions" in err and "'velvety'" in err
    meta = load_prompts(out).meta
    assert meta["classes"] == [names[2].upper(), names[0]]  # the --classes spelling, in its order
    assert meta["classes_without_descriptions"] == ["velvety"] and meta["samples"] == 20


def test_no_selected_class_has_descriptions(tmp_path, small_jsonl, capsys):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["velvety", "woven"]))
    code, err = run(capsys, cli(small_jsonl, tmp_path / "x.safetensors", "--classes", str(classes)))
    assert code == 2 and "none of the selected classes has descriptions" in err


def test_coop_split_file_and_base_novel(tmp_path, small_jsonl, capsys):
    names = [json.loads(line)["classname"] for line in small_jsonl.read_text().splitlines()[::10]]
    ordered = sorted(names)  # label order differs from the description file's order
    split = {"train": [[f"{n}/img{i}.jpg", i, n] for i, n in enumerate(ordered)], "val": [], "test": [[f"{ordered[0]}/x.jpg", 0, ordered[0]]]}
    split_file = tmp_path / "split_zhou_DescribableTextures.json"
    split_file.write_text(json.dumps(split))
    for which, expected in (("base", ordered[:3]), ("novel", ordered[3:])):
        out = tmp_path / f"{which}.safetensors"
        code, err = run(capsys, cli(small_jsonl, out, "--classes", str(split_file), "--split", which, "--epochs", "1", "--warmup-epochs", "0"))
        assert code == 0, err
        assert load_prompts(out).meta["classes"] == expected and load_prompts(out).meta["split"] == which


def test_overlong_descriptions_one_summary_warning(tmp_path, dtd_data, capsys):
    rows = [(c, d) for c in list(dtd_data)[:3] for d in dtd_data[c][:5]] + [("banded", LONG), ("banded", LONG + " More."), ("bumpy", LONG + " Again.")]
    desc = write_jsonl(tmp_path / "long.jsonl", rows)
    for naive in ([], ["--naive"]):
        out = tmp_path / f"long{len(naive)}.safetensors"
        code, err = run(capsys, cli(desc, out, "--epochs", "1", "--warmup-epochs", "0", *naive))
        assert code == 0, err
        lines = [line for line in err.splitlines() if "longer than the 77-token" in line]
        assert len(lines) == 1 and lines[0].startswith("warning: 3 of 18 descriptions"), err


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, small_jsonl, capsys):
    out = tmp_path / "nan.safetensors"
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "5", "--warmup-epochs", "2", "--lr", "1e30", "--batch-size", "16"))
    assert code == 3
    assert "the loss became nan at epoch 3" in err and "training stopped" in err
    assert "last good checkpoint (after epoch 2" in err and str(out) in err
    meta = load_prompts(out).meta
    assert meta["epochs_done"] == 2 and meta["complete"] is False
    assert torch.isfinite(load_prompts(out).ctx).all()
    assert json.loads((tmp_path / "nan.loss.json").read_text())["status"].startswith("stopped: loss nan at epoch 3")

    fresh = tmp_path / "nan0.safetensors"
    code, err = run(capsys, cli(small_jsonl, fresh, "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e30", "--batch-size", "16"))
    assert code == 3 and "no checkpoint was written" in err and not fresh.exists()


def test_existing_output_is_never_replaced_silently(tmp_path, small_jsonl, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "1"))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "1", "--resume"))
    assert code == 2 and "no resume state" in err
    assert out.read_bytes() == b"precious"
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "1", "--warmup-epochs", "0", "--overwrite"))
    assert code == 0 and load_prompts(out).meta["epochs_done"] == 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--depth", "9"], "--depth 9: tiny-clip's text tower has only 2 blocks; pass --depth 2"),
        (["--split", "base"], "--split base needs --classes"),
        (["--classes", "missing.txt"], "--classes missing.txt: no such file"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs CUDA"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--n-ctx", "0"], "--n-ctx must be at least 1"),
    ],
)
def test_bad_flags_give_clear_errors(tmp_path, small_jsonl, capsys, extra, message):
    out = tmp_path / "x.safetensors"
    argv = cli(small_jsonl, out)
    if "--depth" in extra:
        i = argv.index("--depth")
        del argv[i : i + 2]
    code, err = run(capsys, argv + extra)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_resume_refuses_changed_hyperparameters(tmp_path, small_jsonl, capsys):
    out = tmp_path / "r.safetensors"
    assert run(capsys, cli(small_jsonl, out, "--epochs", "2", "--warmup-epochs", "0"))[0] == 0
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.5", "--resume"))
    assert code == 2 and "config.lr (saved 0.03, now 0.5)" in err
    code, err = run(capsys, cli(small_jsonl, out, "--epochs", "2", "--warmup-epochs", "0", "--resume"))
    assert code == 0 and "done: 2 epochs (resumed after 2)" in err  # already finished: nothing to redo


# -------------------------------------------------------------------------------------------------- kill and resume

KILLER = """
import os, signal, sys
import protext.training as training
real = training.save_resume_state
def save_then_die(path, epochs_done, *args, **kwargs):
    real(path, epochs_done, *args, **kwargs)
    if epochs_done == int(os.environ["PROTEXT_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
training.save_resume_state = save_then_die
from protext.train import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _prompts(path: Path) -> dict[str, torch.Tensor]:
    return load_prompts(path).state()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dtd_jsonl):
    """An uninterrupted run (its own process, like the killed ones), through FAULTS' event counter
    (which then never fires): returns its argv, its checkpoint and how many events it passed."""
    folder = tmp_path_factory.mktemp("ref")
    out, count = folder / "ref.safetensors", folder / "events"
    argv = cli(dtd_jsonl, out, "--epochs", "12", "--warmup-epochs", "2", "--lr", "0.01")
    done = subprocess.run([sys.executable, "-c", FAULTS, *argv], env={**_env(), "PROTEXT_FAULT_AT": "0", "PROTEXT_FAULT_COUNT": str(count)},
                          capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return argv, out, int(count.read_text())


def _same_run_elsewhere(argv: list[str], out: Path) -> list[str]:
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(out)
    return argv


def test_killed_after_an_epoch_and_resumed_equals_uninterrupted(tmp_path, reference_run, capsys):
    ref_argv, ref_out, _ = reference_run
    out = tmp_path / "run.safetensors"
    argv = _same_run_elsewhere(ref_argv, out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *argv], env={**_env(), "PROTEXT_TEST_KILL_AFTER": "3"}, capture_output=True, text=True,
        timeout=TEST_TIMEOUT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_resume_state(tmp_path / "run.resume.pt")["epoch"] == 3
    # the state is written before the checkpoint: killed between the two, the checkpoint is one epoch behind
    assert load_prompts(out).meta["epochs_done"] == 2

    code, err = run(capsys, argv + ["--resume"])
    assert code == 0 and "resumed after 3" in err, err
    ref, got = _prompts(ref_out), _prompts(out)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)
    ref_hist = json.loads(ref_out.with_suffix("").with_suffix(".loss.json").read_text())
    got_hist = json.loads(out.with_suffix("").with_suffix(".loss.json").read_text())
    assert [e["loss"] for e in got_hist["epochs"]] == pytest.approx([e["loss"] for e in ref_hist["epochs"]], abs=1e-6)


def test_killed_at_a_random_moment_and_resumed_equals_uninterrupted(tmp_path, reference_run, capsys):
    """SIGKILL from outside at a seeded random event of the middle half of the run (a training step,
    or just before or after an atomic rename inside a save): the run stops there by itself and says
    so on stdout, so where the kill lands depends on the seed, never on how fast the machine is."""
    import random

    ref_argv, ref_out, total = reference_run
    out = tmp_path / "run.safetensors"
    argv = _same_run_elsewhere(ref_argv, out)
    pause_at = random.Random(20240612).randint(total // 4, 3 * total // 4)
    env = {**_env(), "PROTEXT_FAULT_AT": str(pause_at), "PROTEXT_FAULT_PAUSE": "1", "PROTEXT_FAULT_COUNT": str(tmp_path / "events")}
    proc = subprocess.Popen([sys.executable, "-c", FAULTS, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        said = []
        line = proc.stdout.readline()
        while line and line.rstrip("\n") != PAUSED:  # "" is the end of its stdout: the run ended
            said.append(line)
            line = proc.stdout.readline()
        assert line, f"the run ended before event {pause_at} of {total}: {said}"
        sigkill(proc)
    finally:
        reap(proc)
        proc.stdout.close()
    done = load_resume_state(tmp_path / "run.resume.pt")["epoch"]
    assert 1 <= done < 12

    code, err = run(capsys, argv + ["--resume"])
    assert code == 0, err
    ref, got = _prompts(ref_out), _prompts(out)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------------- every flag, its effect


def test_every_flag_has_help_text():
    import argparse

    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 15, action.option_strings


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom protext.train import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "--descriptions" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def _first_step_reference(desc: Path, seed: int, n_ctx: int = 4, depth: int = 2, ctx_init: str = "a photo of a"):
    """The loss of the first step, written out: one batch holding every sample (batch > samples).

    Prompts initialised as training does (seeded, init phrase), targets by ``encode_text`` at full
    length, per-sample 77-token prompts; returns (mse, l1) before any factor.
    """
    rows = [json.loads(line) for line in desc.read_text().splitlines()]
    classes = list(dict.fromkeys(r["classname"] for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("tiny-clip", "random")
    torch.manual_seed(seed)
    encoder = PromptedTextEncoder(clip.model, clip.tokenizer, classes, n_ctx=n_ctx, depth=depth, ctx_init=ctx_init)
    index = torch.tensor([classes.index(r["classname"]) for r in rows])
    with torch.no_grad():
        pred = torch.nn.functional.normalize(encoder(index, truncate=False), dim=-1)
        target = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer([r["description"] for r in rows])), dim=-1)
    return float(((pred - target) ** 2).mean()), float((pred - target).abs().mean())


def _first_step(out: Path) -> float:
    return json.loads(out.with_suffix("").with_suffix(".loss.json").read_text())["step_losses"][0][0]


@pytest.mark.parametrize(
    "extra,expected",
    [
        ([], lambda mse, l1: 1000 * mse),
        (["--loss", "l1"], lambda mse, l1: l1),
        (["--loss-weight", "7"], lambda mse, l1: 7 * mse),
        (["--loss", "l1", "--loss-weight", "3"], lambda mse, l1: 3 * l1),
    ],
)
def test_loss_flags_set_the_trained_loss(tmp_path, small_jsonl, capsys, extra, expected):
    out = tmp_path / "loss.safetensors"
    code, err = run(capsys, cli(small_jsonl, out, "--n-ctx", "4", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "256", *extra))
    assert code == 0, err
    mse, l1 = _first_step_reference(small_jsonl, seed=1)
    assert _first_step(out) == pytest.approx(expected(mse, l1), rel=1e-4)
    hyper = load_prompts(out).meta["hyperparameters"]
    assert hyper["loss"] == ("l1" if "l1" in extra else "mse")


def test_seed_flag_seeds_the_prompts(tmp_path, small_jsonl, capsys):
    outs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        outs[name] = tmp_path / f"{name}.safetensors"
        argv = cli(small_jsonl, outs[name], "--n-ctx", "4", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "256", "--seed", seed)
        assert run(capsys, argv)[0] == 0
    a, b, c = (load_prompts(outs[k]) for k in "abc")
    assert torch.equal(a.deep_prompts, b.deep_prompts) and not torch.equal(a.deep_prompts, c.deep_prompts)
    assert a.meta["hyperparameters"]["seed"] == 5 and c.meta["hyperparameters"]["seed"] == 6
    assert _first_step(outs["c"]) == pytest.approx(1000 * _first_step_reference(small_jsonl, seed=6)[0], rel=1e-4)


def test_ctx_init_flag_sets_the_starting_context(tmp_path, small_jsonl, capsys):
    out = tmp_path / "init.safetensors"
    argv = cli(small_jsonl, out, "--n-ctx", "2", "--ctx-init", "itap of", "--epochs", "1", "--warmup-epochs", "1", "--batch-size", "256")
    code, err = run(capsys, argv)
    assert code == 0, err
    ckpt = load_prompts(out)
    assert ckpt.meta["ctx_init"] == "itap of" and ckpt.meta["context_replaces"] == "itap of"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("tiny-clip", "random")
    ids = clip.tokenizer(["itap of"])[0, 1:3]
    # one warm-up step at 1e-5 moves each value by about 1e-5
    torch.testing.assert_close(ckpt.ctx, clip.model.token_embedding.weight[ids].detach(), atol=1e-4, rtol=0)
    code, err = run(capsys, cli(small_jsonl, tmp_path / "none.safetensors", "--n-ctx", "2", "--ctx-init", "none", "--epochs", "1"))
    assert code == 0, err
    assert load_prompts(tmp_path / "none.safetensors").meta["ctx_init"] is None


def test_no_cache_flag_writes_no_cache_and_trains_the_same(tmp_path, small_jsonl, capsys):
    cached, uncached = tmp_path / "c" / "x.safetensors", tmp_path / "u" / "x.safetensors"
    assert run(capsys, cli(small_jsonl, cached, "--epochs", "1", "--warmup-epochs", "0"))[0] == 0
    code, err = run(capsys, cli(small_jsonl, uncached, "--epochs", "1", "--warmup-epochs", "0", "--no-cache"))
    assert code == 0 and "0 cached, 60 encoded" in err and "(cache" not in err
    assert (cached.parent / "cache").is_dir() and not (uncached.parent / "cache").exists()
    assert torch.equal(load_prompts(cached).ctx, load_prompts(uncached).ctx)


def test_short_run_warns_that_it_never_leaves_the_warm_up(tmp_path, small_jsonl, capsys):
    code, err = run(capsys, cli(small_jsonl, tmp_path / "w.safetensors", "--epochs", "2", "--warmup-epochs", "5"))
    assert code == 0
    assert "warning: --epochs 2 is not more than the 5 warm-up epochs" in err and "--epochs 6 or more" in err


# -------------------------------------------------------------------------------------------------- pre-flight


@pytest.fixture
def no_model(monkeypatch):
    """Pre-flight errors must come before the model loads."""
    import protext.training as training

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad output was refused")

    monkeypatch.setattr(training, "_load_model", refuse)


def test_out_is_an_existing_directory(tmp_path, small_jsonl, capsys, no_model):
    code, err = run(capsys, cli(small_jsonl, tmp_path))
    assert code == 2 and f"--out {tmp_path} is a directory" in err and "--resume" not in err


def test_out_is_the_description_file(tmp_path, small_jsonl, capsys, no_model):
    same = tmp_path / "d.safetensors"
    same.write_bytes(small_jsonl.read_bytes())
    before = same.read_bytes()
    code, err = run(capsys, cli(same, same, "--overwrite"))
    assert code == 2 and "is the run's own input (--descriptions" in err
    assert same.read_bytes() == before


def test_out_and_cache_dir_under_a_file(tmp_path, small_jsonl, capsys, no_model):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = run(capsys, cli(small_jsonl, blocker / "x.safetensors"))
    assert code == 2 and f"{blocker} is a file, not a directory" in err
    argv = cli(small_jsonl, tmp_path / "ok.safetensors")
    argv[argv.index("--cache-dir") + 1] = str(blocker)
    code, err = run(capsys, argv)
    assert code == 2 and f"--cache-dir {blocker} is a file" in err
    assert not (tmp_path / "ok.safetensors").exists()


def test_state_without_checkpoint_asks_for_resume(tmp_path, small_jsonl, capsys, no_model):
    (tmp_path / "x.resume.pt").write_bytes(b"state")
    code, err = run(capsys, cli(small_jsonl, tmp_path / "x.safetensors"))
    assert code == 2 and "holds an interrupted run; pass --resume" in err


def test_ctrl_c_while_encoding_targets_says_how_to_resume(tmp_path, small_jsonl, capsys, monkeypatch):
    import protext.targets as targets

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(targets, "encode_descriptions", interrupted)
    code, err = run(capsys, cli(small_jsonl, tmp_path / "x.safetensors"))
    assert code == 130 and "rerun the same command with --resume" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------------- fault injection

PAUSED = "protext-test: paused at the chosen event"
FAULTS = """
import atexit, os, signal, sys, threading
import protext.training as training

kill_at = int(os.environ["PROTEXT_FAULT_AT"])
pause = os.environ.get("PROTEXT_FAULT_PAUSE") == "1"
events = [0]

def tick():
    events[0] += 1
    if events[0] == kill_at:
        if pause:  # stop here, say so, and wait for the test's SIGKILL from outside
            print(PAUSED, flush=True)
            threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)

# kill points: every training step, and just before and just after every atomic rename
# (before: the temporary file is complete but not in place; after: e.g. state saved, checkpoint not yet)
real_replace, real_loss = os.replace, training.fast_batch_loss
def replace(src, dst, *args, **kwargs):
    tick()
    real_replace(src, dst, *args, **kwargs)
    tick()
def loss(*args, **kwargs):
    tick()
    return real_loss(*args, **kwargs)
os.replace, training.fast_batch_loss = replace, loss
atexit.register(lambda: open(os.environ["PROTEXT_FAULT_COUNT"], "w").write(str(events[0])))
from protext.train import main
sys.exit(main(sys.argv[1:]))
""".replace("PAUSED", repr(PAUSED))


def _living_with(token: str) -> list[int]:
    """Processes whose environment carries ``token`` (children of this test that outlived it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, small_jsonl):
    import random
    import uuid

    token = f"PROTEXT_FAULT_TOKEN={uuid.uuid4().hex}"
    env = {**_env(), token.split("=")[0]: token.split("=")[1]}

    def launch(out: Path, cache: Path, kill_at: int, *extra: str) -> tuple[int, int]:
        argv = cli(small_jsonl, out, "--epochs", "4", "--warmup-epochs", "1", "--batch-size", "16", *extra)
        argv[argv.index("--cache-dir") + 1] = str(cache)
        count = tmp_path / "events"
        done = subprocess.run(
            [sys.executable, "-c", FAULTS, *argv], env={**env, "PROTEXT_FAULT_AT": str(kill_at), "PROTEXT_FAULT_COUNT": str(count)},
            capture_output=True, text=True, timeout=TEST_TIMEOUT,
        )
        events = int(count.read_text()) if done.returncode == 0 else -1
        count.unlink(missing_ok=True)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        return done.returncode, events

    ref = tmp_path / "ref" / "p.safetensors"
    code, total = launch(ref, tmp_path / "ref-cache", 0)
    assert code == 0 and total > 20  # 4 epochs x 3 steps, two events per rename

    out, cache = tmp_path / "run" / "p.safetensors", tmp_path / "run-cache"
    rng = random.Random(20240611)
    points = [rng.randint(1, total // 4) for _ in range(4)]  # a quarter of a run each: every run dies
    for attempt, kill_at in enumerate(points):
        code, _ = launch(out, cache, kill_at, *(["--resume"] if attempt else []))
        assert code == -signal.SIGKILL, (attempt, kill_at)
    code, _ = launch(out, cache, 0, "--resume")
    assert code == 0
    assert out.read_bytes() == ref.read_bytes()  # prompts and metadata, bit for bit
    ref_hist = json.loads((ref.parent / "p.loss.json").read_text())
    got_hist = json.loads((out.parent / "p.loss.json").read_text())
    assert got_hist["step_losses"] == ref_hist["step_losses"] and got_hist["status"] == "complete"
    leftovers = [p for d in (out.parent, cache) for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert _living_with(token) == []


def test_unwritable_out_and_cache_dir_are_refused_before_the_model_loads(tmp_path, small_jsonl, capsys, no_model, read_only_dir):
    """Root ignores permission bits, so a read-only place is simulated where the probe file is made."""
    readonly = read_only_dir
    code, err = run(capsys, cli(small_jsonl, readonly / "new" / "x.safetensors"))
    assert code == 2 and f"cannot write in {readonly} (Permission denied)" in err and "--out" in err
    argv = cli(small_jsonl, tmp_path / "x.safetensors")
    argv[argv.index("--cache-dir") + 1] = str(readonly / "cache")
    code, err = run(capsys, argv)
    assert code == 2 and f"--cache-dir {readonly / 'cache'}: cannot write in {readonly}" in err
    assert list(readonly.iterdir()) == []


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, dtd_data):
    """One default run (6 classes x 10 descriptions, batch 16, 2 epochs) to compare flags against."""
    folder = tmp_path_factory.mktemp("default")
    desc = write_jsonl(folder / "small.jsonl", [(c, d) for c in list(dtd_data)[:6] for d in dtd_data[c][:10]])
    out = folder / "d.safetensors"
    assert main(cli(desc, out, "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16")) == 0
    return desc, out


@pytest.mark.parametrize("flag", ["--keep-last-batch", "--precision bf16", "--precision auto", "--no-shared-prefix", "--device cpu"])
def test_run_flags_in_successful_runs(tmp_path, default_run, capsys, flag):
    desc, ref = default_run
    out = tmp_path / "f.safetensors"
    code, err = run(capsys, cli(desc, out, "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", *flag.split()))
    assert code == 0, err
    hyper, steps = load_prompts(out).meta["hyperparameters"], json.loads((tmp_path / "f.loss.json").read_text())["step_losses"]
    ref_steps = json.loads(ref.with_suffix("").with_suffix(".loss.json").read_text())["step_losses"]
    got, want = load_prompts(out).ctx, load_prompts(ref).ctx
    if flag == "--keep-last-batch":  # 60 samples: 3 full batches of 16 and the last 12, kept
        assert [len(s) for s in steps] == [4, 4] and hyper["drop_last"] is False
    elif flag == "--precision bf16":
        assert hyper["precision"] == "bf16" and steps != ref_steps
        assert steps[0][0] == pytest.approx(ref_steps[0][0], rel=0.05)  # the same loss, at bf16's precision
    elif flag == "--precision auto":  # fp32 on a CPU
        assert hyper["precision"] == "fp32" and torch.equal(got, want)
    elif flag == "--no-shared-prefix":  # another path, the same numbers
        assert hyper["shared_prefix"] is False and sum(steps, []) == pytest.approx(sum(ref_steps, []), rel=1e-5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        assert hyper["device"] == "cpu" and torch.equal(got, want)


# -------------------------------------------------------------------------------------------------- a run that stops


def _poison_call(monkeypatch, n: int) -> None:
    """Make the n-th batch loss of the run NaN (60 samples, batch 16: 3 steps per epoch)."""
    import protext.training as training

    real, calls = training.fast_batch_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == n else loss

    monkeypatch.setattr(training, "fast_batch_loss", poisoned)


def _job(small_jsonl: Path, out: Path, **kwargs):
    from protext.training import TrainJob

    return TrainJob(small_jsonl, model="tiny-clip", pretrained="random", out=out, cache_dir=out.parent / "cache",
                    epochs=3, warmup_epochs=0, batch_size=16, depth=2, **kwargs)


def test_a_stopped_run_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, small_jsonl, monkeypatch, tiny_clip):
    from protext.training import run_training

    _poison_call(monkeypatch, 5)  # epoch 2, step 2
    out = tmp_path / "s.safetensors"
    outcome = run_training(_job(small_jsonl, out, precision="bf16"), clip=tiny_clip, progress=False, report=lambda line: None)
    assert outcome.status == "stopped: loss nan at epoch 2, step 2" and not outcome.complete
    assert outcome.checkpoint == out and [r.epoch for r in outcome.history] == [0]
    assert outcome.files == {"checkpoint": out, "history": tmp_path / "s.loss.json", "plot": tmp_path / "s.loss.png",
                             "state": tmp_path / "s.resume.pt"}
    history = json.loads((tmp_path / "s.loss.json").read_text())
    assert history["status"] == outcome.status and [e["epoch"] for e in history["epochs"]] == [1]
    assert history["checkpoint"] == str(out) and (tmp_path / "s.loss.png").read_bytes()[:4] == b"\x89PNG"
    loss = history["epochs"][0]["loss"]
    assert load_prompts(out).meta["epochs_done"] == 1
    assert outcome.message == (
        f"the loss became nan at epoch 2, step 2; training stopped. The last good checkpoint (after epoch 1, loss {loss:.6g}) "
        f"is kept at {out}. Try a lower --lr or --precision fp32."
    )


def test_a_run_stopped_in_its_first_epoch_writes_nothing_and_says_so(tmp_path, small_jsonl, monkeypatch, tiny_clip):
    from protext.training import run_training

    _poison_call(monkeypatch, 2)  # epoch 1, step 2
    out = tmp_path / "f.safetensors"
    outcome = run_training(_job(small_jsonl, out), clip=tiny_clip, progress=False, report=lambda line: None)
    assert outcome.status == "stopped: loss nan at epoch 1, step 2" and outcome.history == []
    assert outcome.message == ("the loss became nan at epoch 1, step 2; training stopped. No epoch finished, so no checkpoint "
                               "was written. Try a lower --lr.")
    assert not out.exists() and not (tmp_path / "f.loss.json").exists() and not (tmp_path / "f.loss.png").exists()

    out.write_bytes(b"an older checkpoint")
    _poison_call(monkeypatch, 1)
    outcome = run_training(_job(small_jsonl, out, overwrite=True), clip=tiny_clip, progress=False, report=lambda line: None)
    assert outcome.message == (f"the loss became nan at epoch 1, step 1; training stopped. No epoch finished, so nothing was "
                               f"saved; {out} is left as it was. Try a lower --lr.")
    assert out.read_bytes() == b"an older checkpoint"


def test_base2novel_preset_without_classes_takes_the_shipped_list(tmp_path, dtd_jsonl, capsys):
    from protext.classlists import read_classes
    from protext.training import TrainJob

    dtd = read_classes("dtd")
    job = TrainJob(str(dtd_jsonl), preset="base2novel/dtd")
    assert job.class_list() == "dtd" and TrainJob(str(dtd_jsonl), preset="text_only/dtd").class_list() is None
    out = tmp_path / "b2n.safetensors"
    code, err = run(capsys, cli(dtd_jsonl, out, "--preset", "base2novel/dtd", "--epochs", "1", "--warmup-epochs", "0"))
    assert code == 0, err
    meta = load_prompts(out).meta
    assert meta["classes"] == dtd[:24] and meta["split"] == "base" and meta["classes_file"] == "dtd"
    novel = tmp_path / "novel.safetensors"
    code, err = run(capsys, cli(dtd_jsonl, novel, "--preset", "base2novel/dtd", "--split", "novel", "--epochs", "1",
                                "--warmup-epochs", "0"))
    assert code == 0, err
    assert load_prompts(novel).meta["classes"] == dtd[24:]


def test_classes_by_dataset_name_and_split_without_any_list(tmp_path, small_jsonl, capsys):
    code, err = run(capsys, cli(small_jsonl, tmp_path / "s.safetensors", "--split", "base"))
    assert code == 2 and "--split base needs --classes" in err and "../shared" not in err
    code, err = run(capsys, cli(small_jsonl, tmp_path / "n.safetensors", "--classes", "no_such_list"))
    assert code == 2 and "not a built-in class list" in err and "dtd" in err
    out = tmp_path / "named.safetensors"
    code, err = run(capsys, cli(small_jsonl, out, "--classes", "DTD", "--epochs", "1", "--warmup-epochs", "0"))
    assert code == 0, err
    present = {json.loads(line)["classname"] for line in small_jsonl.read_text().splitlines()}
    assert load_prompts(out).meta["classes"] == [c for c in protext.read_classes("dtd") if c in present]
