"""``python -m protext.eval`` end to end on generated images: values, sharding, and clean errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TEST_TIMEOUT, assert_same_results
from protext.checkpoint import save_prompts
from protext.eval import main
from protext.models import load_clip
from protext.prompts import PromptedTextEncoder
from protext.tta.tpt import PromptTuner, TPTConfig, image_generator

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-clip", "--pretrained", "random", "--workers", "0", "--no-progress"]
DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly"]
DTD_SPLIT = "split_zhou_DescribableTextures.json"


def _image(rng: np.random.Generator, path: Path, size: tuple[int, int]) -> None:
    """A noisy image with a coloured block, so views differ and crops see different content."""
    h, w = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A plain image folder: 3 classes x 3 images of varied shapes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "golden_retriever", "ox"]):
        for i in range(3):
            _image(rng, root / name / f"{i}.png", (48 + 11 * i, 64 - 5 * c))
    return root


@pytest.fixture(scope="module")
def dtd(tmp_path_factory) -> Path:
    """A CoOp-layout DTD: <root>/dtd/images/<class>/*.jpg and split_zhou_DescribableTextures.json."""
    root = tmp_path_factory.mktemp("coop")
    rng = np.random.default_rng(1)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(DTD_CLASSES):
        for i in range(4):
            rel = f"{name}/{name}_{i:04d}.jpg"
            _image(rng, root / "dtd" / "images" / rel, (56, 72))
            split["train" if i == 0 else "test"].append([rel, label, name])
    split["val"] = split["train"][:1]
    (root / "dtd" / DTD_SPLIT).write_text(json.dumps(split))
    return root


def run_cli(args: list[str], out: Path) -> dict:
    code = main([*args, *TINY, "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, killing the whole group on timeout or interrupt, so a
    failing multi-process test never leaves ranks behind."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def fail_cli(args: list[str], capsys) -> str:
    code = main([*args, *TINY, "--out", "/nonexistent/never.json"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------------
# values


def test_clip_on_folder_equals_direct_computation(tiny_clip, folder, tmp_path):
    result = run_cli(["--dataset", "folder", "--root", str(folder), "--batch-size", "4", "--save-logits"], tmp_path / "r.json")
    assert result["method"] == "clip" and result["dataset"]["n_classes"] == 3
    assert result["metrics"]["n_images"] == 9 and result["predictions"]["index"] == list(range(9))
    assert result["template"] == {"template": "a photo of a {}.", "source": "--templates protext", "rule": "protext"}
    assert result["model"]["identity"] == "tiny-clip/random" and result["settings"]["batch_size"] == 4
    assert result["timing"]["images_per_second"] > 0

    # the same numbers computed by hand
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    paths = sorted(folder.glob("*/*.png"))
    with torch.no_grad():
        images = torch.stack([tiny_clip.preprocess(Image.open(p).convert("RGB")) for p in paths])
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tok([f"a photo of a {n}." for n in ["cat", "golden retriever", "ox"]])), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
    torch.testing.assert_close(torch.tensor(result["predictions"]["logits"]), logits, atol=1e-5, rtol=0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    top1 = 100.0 * (logits.argmax(-1) == labels).float().mean().item()
    assert result["metrics"]["top1"] == pytest.approx(top1)
    assert result["metrics"]["top5"] == 100.0  # 3 classes
    per_class = result["metrics"]["per_class"]
    for c, name in enumerate(["cat", "golden_retriever", "ox"]):
        want = 100.0 * (logits[labels == c].argmax(-1) == c).float().mean().item()
        assert per_class[name]["accuracy"] == pytest.approx(want) and per_class[name]["n"] == 3


def test_untrained_prompts_checkpoint_equals_clip(tiny_clip, dtd, tmp_path):
    """A depth-1 checkpoint initialised from 'a photo of a' and never trained is CLIP, logit for logit."""
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=1, ctx_init="a photo of a")
    ckpt = tmp_path / "untrained.safetensors"
    save_prompts(ckpt, encoder, {"dataset": "imagenet"})
    base = ["--dataset", "dtd", "--root", str(dtd), "--split", "novel", "--save-logits"]
    clip = run_cli([*base, "--method", "clip"], tmp_path / "clip.json")
    prompts = run_cli([*base, "--method", "prompts", "--prompts", str(ckpt)], tmp_path / "prompts.json")
    assert clip["dataset"]["n_classes"] == 2 and clip["metrics"]["n_images"] == 6
    assert clip["template"]["template"] == "a photo of a {}, a type of a texture."
    assert prompts["template"] == clip["template"]  # cross-dataset: the dataset's template
    assert prompts["checkpoint"]["n_ctx"] == 4 and len(prompts["checkpoint"]["sha256"]) == 64
    torch.testing.assert_close(torch.tensor(prompts["predictions"]["logits"]), torch.tensor(clip["predictions"]["logits"]), atol=1e-5, rtol=0)
    assert prompts["predictions"]["topk"] == clip["predictions"]["topk"]


def test_in_domain_checkpoint_keeps_its_training_template(tiny_clip, dtd, tmp_path):
    """Prompts trained on DTD itself keep their training prompt ('a photo of a {}.'), as ProText
    evaluates in-domain; trained elsewhere, they take DTD's cross-dataset template."""
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=2, ctx_init="a photo of a")
    base = ["--dataset", "dtd", "--root", str(dtd), "--limit", "2", "--method", "prompts"]
    in_domain = tmp_path / "dtd.safetensors"
    save_prompts(in_domain, encoder, {"preset": "text_only/dtd", "classes": DTD_CLASSES})
    result = run_cli([*base, "--prompts", str(in_domain)], tmp_path / "a.json")
    assert result["template"] == {"template": "{}.", "source": "checkpoint (same dataset)", "rule": "protext"}
    assert result["checkpoint"]["meta"]["n_classes"] == 4 and "classes" not in result["checkpoint"]["meta"]
    cross = tmp_path / "imagenet.safetensors"
    save_prompts(cross, encoder, {"preset": "cross_dataset", "preset_values": {"dataset": "imagenet"}})
    result = run_cli([*base, "--prompts", str(cross)], tmp_path / "b.json")
    assert result["template"] == {"template": "a photo of a {}, a type of a texture.", "source": "--templates protext", "rule": "protext"}
    result = run_cli([*base, "--prompts", str(in_domain), "--template", "itap of a {}."], tmp_path / "c.json")
    assert result["template"]["source"] == "--template"


def test_cupl_method_runs_and_reports_missing_classes(dtd, tmp_path, capsys):
    lines = [{"classname": c, "description": f"a {c} texture, number {k}."} for c in DTD_CLASSES for k in range(2)]
    path = tmp_path / "desc.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli(["--dataset", "dtd", "--root", str(dtd), "--method", "cupl", "--descriptions", str(path)], tmp_path / "c.json")
    assert result["metrics"]["n_images"] == 12 and result["descriptions"]["path"] == str(path)

    path.write_text("".join(json.dumps(line) + "\n" for line in lines if line["classname"] != "bubbly"))
    err = fail_cli(["--dataset", "dtd", "--root", str(dtd), "--method", "cupl", "--descriptions", str(path)], capsys)
    assert "'bubbly'" in err and "1 of 4 classes" in err


def _library_tpt(checkpoint, names, template, index, path, *, seed=0, views=4, **tpt):
    """Reference: the TPT library on one image's own views, with the prompts it is told to start from."""
    from protext.checkpoint import class_encoder
    from protext.tta import TTAConfig, view_maker
    from protext.tta.views import model_preprocess_cfg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("tiny-clip", "random", seed=seed)  # --seed also seeds the random model
    encoder = class_encoder(clip.model, clip.tokenizer, names, template, checkpoint)
    tuner = PromptTuner(clip.model, encoder, TPTConfig(n_views=views, **tpt))
    make = view_maker(TTAConfig(method="tpt", views=views), "folder", model_preprocess_cfg(clip.model))
    return tuner.adapt(make(Image.open(path).convert("RGB"), generator=image_generator(seed, index))).logits


def test_tpt_cli_matches_library(folder, tmp_path):
    """The CLI's TPT prediction of an image is the library's on that image's own views; --tpt is --tta tpt."""
    base = ["--dataset", "folder", "--root", str(folder), "--tta-views", "16", "--limit", "4", "--seed", "7", "--save-logits"]
    result = run_cli([*base, "--tta", "tpt"], tmp_path / "t.json")
    assert result["method"] == "clip + TPT" and result["metrics"]["n_images"] == 4
    assert result["tta"]["init"] == "handcrafted" and result["tta"]["settings"]["views"] == 16
    assert result["tta"]["settings"]["selection"] == 0.1 and result["tta"]["settings"]["naive"] is False
    old = run_cli(["--dataset", "folder", "--root", str(folder), "--tpt", "--tpt-views", "16", "--limit", "4", "--seed", "7", "--save-logits"], tmp_path / "old.json")
    assert old["predictions"] == result["predictions"]
    path = sorted(folder.glob("*/*.png"))[3]  # dataset index 3
    want = _library_tpt(None, ["cat", "golden_retriever", "ox"], "a photo of a {}.", 3, path, seed=7, views=16)
    torch.testing.assert_close(torch.tensor(result["predictions"]["logits"][3]), want, atol=1e-5, rtol=0)


@pytest.fixture
def deep_checkpoint(tiny_clip, tmp_path) -> Path:
    """Depth-2 prompts from noise (no init phrase): far from the hand-crafted 'a photo of a'."""
    torch.manual_seed(5)
    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=2, ctx_init=None)
    with torch.no_grad():
        encoder.ctx.normal_(0, 0.5)
        encoder.deep_prompts.normal_(0, 0.5)
    path = tmp_path / "deep.safetensors"
    save_prompts(path, encoder, {"preset": "cross_dataset"})
    return path


def test_tpt_uses_the_learned_prompts_and_honours_tune(folder, deep_checkpoint, tmp_path):
    """Issue 8's surviving bug: TPT from --prompts must tune the checkpoint's prompts (not the hand-crafted
    ones), and --tta-tune/--tpt-tune must change what is tuned."""
    from protext.checkpoint import load_prompts

    base = ["--dataset", "folder", "--root", str(folder), "--limit", "2", "--save-logits", "--method", "prompts",
            "--prompts", str(deep_checkpoint)]
    zeroshot = run_cli(base, tmp_path / "zs.json")
    no_step = run_cli([*base, "--tta", "tpt", "--tta-views", "4", "--tta-steps", "0"], tmp_path / "s0.json")
    # 0 steps: view 0 is the image's preprocess, so TPT's logits are the checkpoint's zero-shot logits
    torch.testing.assert_close(torch.tensor(no_step["predictions"]["logits"]), torch.tensor(zeroshot["predictions"]["logits"]), atol=1e-5, rtol=0)
    handcrafted = run_cli([*base, "--tta", "tpt", "--tta-views", "4", "--tta-steps", "0", "--tta-init", "handcrafted"], tmp_path / "hc.json")
    assert not torch.allclose(torch.tensor(handcrafted["predictions"]["logits"]), torch.tensor(zeroshot["predictions"]["logits"]), atol=1e-3)

    tuned = {tune: run_cli([*base, "--tta", "tpt", "--tta-views", "4", "--tta-tune", tune], tmp_path / f"{tune}.json") for tune in ("all", "shallow")}
    assert tuned["shallow"]["tta"]["settings"]["tune"] == "shallow"
    assert not torch.allclose(torch.tensor(tuned["all"]["predictions"]["logits"]), torch.tensor(tuned["shallow"]["predictions"]["logits"]), atol=1e-4)
    old = run_cli([*base, "--tpt", "--tpt-views", "4", "--tpt-tune", "shallow"], tmp_path / "old.json")
    assert old["predictions"] == tuned["shallow"]["predictions"]
    path = sorted(folder.glob("*/*.png"))[1]
    ckpt = load_prompts(deep_checkpoint)
    for tune in ("all", "shallow"):
        want = _library_tpt(ckpt, ["cat", "golden_retriever", "ox"], "a photo of a {}.", 1, path, tune=tune)
        torch.testing.assert_close(torch.tensor(tuned[tune]["predictions"]["logits"][1]), want, atol=1e-5, rtol=0)


def test_tta_steps_lr_and_init_change_the_outcome(folder, deep_checkpoint, tmp_path):
    """--tta-steps, --tta-lr and --tta-init (and their --tpt-* spellings) each change the logits."""
    base = ["--dataset", "folder", "--root", str(folder), "--limit", "2", "--save-logits", "--tta", "tpt", "--tta-views", "4"]

    def logits(extra, name):
        return torch.tensor(run_cli([*base, *extra], tmp_path / f"{name}.json")["predictions"]["logits"])

    one = logits([], "one")
    two = logits(["--tta-steps", "2"], "two")
    assert not torch.allclose(one, two, atol=1e-5)
    torch.testing.assert_close(logits(["--tpt-steps", "2"], "two-old"), two, atol=0, rtol=0)
    fast = logits(["--tta-lr", "0.5"], "lr")
    assert not torch.allclose(one, fast, atol=1e-5)
    torch.testing.assert_close(logits(["--tpt-lr", "0.5"], "lr-old"), fast, atol=0, rtol=0)
    prompts = ["--method", "prompts", "--prompts", str(deep_checkpoint)]
    from_ckpt = logits([*prompts, "--tta-init", "prompts"], "init-p")
    from_hand = logits([*prompts, "--tpt-init", "handcrafted"], "init-h")
    assert not torch.allclose(from_ckpt, from_hand, atol=1e-3)
    torch.testing.assert_close(from_hand, one, atol=1e-6, rtol=0)  # = --method clip --tta tpt


def test_split_base_and_classes_change_the_classes(tiny_clip, dtd, tmp_path, capsys):
    base = ["--dataset", "dtd", "--root", str(dtd), "--save-logits", "--templates", "tpt"]
    result = run_cli([*base, "--split", "base"], tmp_path / "base.json")
    assert result["dataset"]["classnames"] == DTD_CLASSES[:2] and result["metrics"]["n_images"] == 6
    renamed = ["stripes", "blots", "braids", "bubbles"]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(renamed) + "\n")
    result = run_cli([*base, "--classes", str(classes)], tmp_path / "classes.json")
    assert result["dataset"]["classnames"] == renamed
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    paths = [dtd / "dtd" / "images" / f"{c}/{c}_{i:04d}.jpg" for c in DTD_CLASSES for i in range(1, 4)]
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([tiny_clip.preprocess(Image.open(p).convert("RGB")) for p in paths])), dim=-1)
        txt = F.normalize(model.encode_text(tok([f"a photo of a {n}." for n in renamed])), dim=-1)
    torch.testing.assert_close(torch.tensor(result["predictions"]["logits"]), model.logit_scale.exp() * img @ txt.t(), atol=1e-5, rtol=0)
    capsys.readouterr()
    old = run_cli([*base, "--classnames", str(classes)], tmp_path / "old.json")
    assert old["predictions"] == result["predictions"]
    assert "--classnames is deprecated; use --classes" in capsys.readouterr().err


def test_template_rules_are_recorded_and_used(tiny_clip, dtd, tmp_path):
    """--templates coop gives CoOp's '{} texture.' on DTD, tpt 'a photo of a {}.'; the result names both."""
    base = ["--dataset", "dtd", "--root", str(dtd), "--save-logits", "--limit", "3"]
    coop = run_cli([*base, "--templates", "coop"], tmp_path / "coop.json")
    tpt = run_cli([*base, "--templates", "tpt"], tmp_path / "tpt.json")
    assert coop["template"] == {"template": "{} texture.", "source": "--templates coop", "rule": "coop"}
    assert tpt["template"] == {"template": "a photo of a {}.", "source": "--templates tpt", "rule": "tpt"}
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    paths = [dtd / "dtd" / "images" / f"banded/banded_{i:04d}.jpg" for i in range(1, 4)]
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([tiny_clip.preprocess(Image.open(p).convert("RGB")) for p in paths])), dim=-1)
        txt = F.normalize(model.encode_text(tok([f"{n} texture." for n in DTD_CLASSES])), dim=-1)
    torch.testing.assert_close(torch.tensor(coop["predictions"]["logits"]), model.logit_scale.exp() * img @ txt.t(), atol=1e-5, rtol=0)
    over = run_cli([*base, "--templates", "coop", "--template", "itap of a {}."], tmp_path / "over.json")
    assert over["template"] == {"template": "itap of a {}.", "source": "--template", "rule": "coop"}


def test_prompts_on_other_weights_refused_unless_allowed(tiny_clip, folder, tmp_path, capsys):
    from protext.models import text_fingerprint

    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=1)
    ckpt = tmp_path / "other.safetensors"
    save_prompts(ckpt, encoder, {"text_tower_fingerprint": "0" * 32, "model": "tiny-clip", "pretrained": "elsewhere"})
    base = ["--dataset", "folder", "--root", str(folder), "--method", "prompts", "--prompts", str(ckpt), "--limit", "2"]
    err = fail_cli(base, capsys)
    assert str(ckpt) in err and "--allow-other-weights" in err
    result = run_cli([*base, "--allow-other-weights"], tmp_path / "r.json")
    assert "warning:" in capsys.readouterr().err
    assert result["checkpoint"]["text_tower_fingerprint"] == {"checkpoint": "0" * 32, "model": text_fingerprint(tiny_clip.model), "matches": False}


def test_random_weights_warn(folder, tmp_path, capsys):
    run_cli(["--dataset", "folder", "--root", str(folder), "--limit", "1"], tmp_path / "r.json")
    err = capsys.readouterr().err
    assert "warning:" in err and "RANDOM weights" in err


def test_device_precision_workers_progress_and_selection_flags(folder, tmp_path, capsys):
    base = ["--dataset", "folder", "--root", str(folder), "--save-logits", "--batch-size", "2"]
    fp32 = run_cli(base, tmp_path / "fp32.json")
    capsys.readouterr()
    code = main([*base, "--model", "tiny-clip", "--pretrained", "random", "--device", "cpu", "--precision", "bf16",
                 "--workers", "2", "--progress", "--out", str(tmp_path / "bf16.json")])
    assert code == 0
    assert "img" in capsys.readouterr().err  # the progress bar
    bf16 = json.loads((tmp_path / "bf16.json").read_text())
    assert bf16["runtime"]["precision"] == "bf16" and bf16["runtime"]["device"] == "cpu" and bf16["settings"]["workers"] == 2
    a, b = torch.tensor(fp32["predictions"]["logits"]), torch.tensor(bf16["predictions"]["logits"])
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)  # a bfloat16 image tower: close, not equal
    tpt = ["--dataset", "folder", "--root", str(folder), "--limit", "2", "--save-logits"]
    new = run_cli([*tpt, "--tta", "tpt", "--tta-views", "8", "--tta-selection", "0.5"], tmp_path / "s.json")
    old = run_cli([*tpt, "--tpt", "--tpt-views", "8", "--tpt-selection", "0.5"], tmp_path / "o.json")
    default = run_cli([*tpt, "--tta", "tpt", "--tta-views", "8"], tmp_path / "d.json")
    assert new["predictions"] == old["predictions"] and new["tta"]["settings"]["selection"] == 0.5
    assert new["predictions"]["logits"] != default["predictions"]["logits"]


def test_two_process_torchrun_equals_one_process(folder, tmp_path):
    """Sharded over 2 gloo ranks: the same per-image predictions and totals as one process.

    Image order, labels, predictions, top-k and counts must be equal; logits, confidences, accuracies
    and ECE within conftest's FLOAT_RTOL/FLOAT_ATOL, since one thread per rank and two threads in one
    process sum in another order (their last bits differ on AVX2 machines)."""
    args = ["--dataset", "folder", "--root", str(folder), "--tpt", "--tpt-views", "8", "--seed", "3", "--save-logits", *TINY]
    single = tmp_path / "one.json"
    assert main([*args, "--out", str(single)]) == 0
    sharded = tmp_path / "two.json"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = run_group([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protext.eval", *args, "--out", str(sharded)], env, TEST_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert two["runtime"]["world_size"] == 2 and one["runtime"]["world_size"] == 1
    assert two["predictions"]["index"] == one["predictions"]["index"] == list(range(9))
    assert len(two["predictions"]["logits"]) == 9
    assert_same_results(two["predictions"], one["predictions"], where="predictions")
    assert_same_results(two["metrics"], one["metrics"], where="metrics")
    assert two["metrics"]["n_images"] == 9
    assert proc.stdout.count("| folder |") == 1  # only rank 0 prints the table


def test_cross_layout_comparison_is_exact_but_for_floats(folder, tmp_path):
    """The comparison above lets floats differ in their last bits and nothing else: a changed label,
    prediction, image order or count fails it, and so does a float off by more than the tolerance."""
    import copy

    result = run_cli(["--dataset", "folder", "--root", str(folder), "--limit", "4", "--save-logits"], tmp_path / "r.json")
    payload = {"predictions": result["predictions"], "metrics": result["metrics"]}
    noisy = copy.deepcopy(payload)
    noisy["predictions"]["confidence"][0] *= 1 + 2e-7  # what another thread count does
    noisy["predictions"]["logits"][1][2] += 1e-7
    noisy["metrics"]["ece"] *= 1 + 1e-7
    assert_same_results(noisy, payload)

    def changed(edit) -> dict:
        other = copy.deepcopy(noisy)
        edit(other)
        return other

    wrong = {
        "label": changed(lambda p: p["predictions"]["label"].__setitem__(0, p["predictions"]["label"][0] + 1)),
        "top-k": changed(lambda p: p["predictions"]["topk"][1].reverse()),
        "order": changed(lambda p: p["predictions"]["index"].reverse()),
        "count": changed(lambda p: p["metrics"].__setitem__("n_images", 5)),
        "image dropped": changed(lambda p: p["predictions"]["confidence"].pop()),
        "confidence": changed(lambda p: p["predictions"]["confidence"].__setitem__(2, p["predictions"]["confidence"][2] * (1 + 1e-4))),
        "logit": changed(lambda p: p["predictions"]["logits"][0].__setitem__(0, p["predictions"]["logits"][0][0] + 1e-3)),
        "key": changed(lambda p: p["metrics"].pop("top5")),
    }
    for name, other in wrong.items():
        with pytest.raises(AssertionError):
            assert_same_results(other, payload)
        with pytest.raises(AssertionError):
            assert_same_results(payload, other)


# --------------------------------------------------------------------------------------------------
# errors: one line naming the culprit, exit code 2, no traceback


def test_missing_split_file(dtd, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(dtd, root)
    (root / "dtd" / DTD_SPLIT).unlink()
    err = fail_cli(["--dataset", "dtd", "--root", str(root)], capsys)
    assert DTD_SPLIT in err and "error:" in err


def test_listed_image_missing(dtd, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(dtd, root)
    (root / "dtd" / "images" / "bubbly" / "bubbly_0002.jpg").unlink()
    err = fail_cli(["--dataset", "dtd", "--root", str(root)], capsys)
    assert "bubbly_0002.jpg" in err and DTD_SPLIT in err


def test_empty_class_folder(folder, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    (root / "zebra").mkdir()
    err = fail_cli(["--dataset", "folder", "--root", str(root)], capsys)
    assert "zebra" in err and "no images" in err


def test_unreadable_image_from_a_worker_process(folder, tmp_path):
    """A corrupt image read in a DataLoader worker: one clean line from a real subprocess."""
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    (root / "ox" / "1.png").write_bytes(b"not a png")
    proc = subprocess.run(
        [sys.executable, "-m", "protext.eval", "--dataset", "folder", "--root", str(root), "--model", "tiny-clip",
         "--pretrained", "random", "--workers", "2", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "x.json")],
        cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: cannot read image" in proc.stderr and "1.png" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_flag_and_checkpoint_errors(dtd, folder, tmp_path, capsys):
    err = fail_cli(["--dataset", "dtdx", "--root", str(dtd)], capsys)
    assert "unknown dataset 'dtdx'" in err
    err = fail_cli(["--dataset", "dtd", "--root", str(dtd), "--method", "cupl"], capsys)
    assert "--descriptions" in err
    (tmp_path / "d.jsonl").write_text("")
    err = fail_cli(["--dataset", "dtd", "--root", str(dtd), "--method", "cupl", "--descriptions", str(tmp_path / "d.jsonl"), "--tpt"], capsys)
    assert "--tta tpt" in err and "cupl" in err
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--method", "prompts", "--prompts", str(tmp_path / "none.safetensors")], capsys)
    assert "none.safetensors" in err
    wide = tmp_path / "vitb.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 512)}}, wide)
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--method", "prompts", "--prompts", str(wide)], capsys)
    assert "width 512" in err and "width 64" in err
    # amp is fp16, which runs on a CPU (emulated) but not batched for TPT: the refusal names fp16
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--precision", "amp", "--device", "cpu", "--tta", "tpt", "--tta-batch", "2"], capsys)
    assert "--tta-batch with --precision fp16" in err and "--precision amp is deprecated" in err


def test_every_flag_has_help_text():
    from protext.eval import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 40
    for action in actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_help_imports_no_torch():
    """--help must stay fast: checked by what is imported, not by timing."""
    code = (
        "import sys\n"
        "from protext.eval import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('open_clip')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    for flag in ["--tta", "--templates", "--classes", "--overwrite", "--stream-seeds", "--allow-other-weights", "--tta-batch"]:
        assert flag in proc.stdout
