"""``python -m protext.eval`` end to end on generated images: values, sharding, and clean errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from protext.checkpoint import save_prompts
from protext.eval import main
from protext.models import load_clip
from protext.prompts import PromptedTextEncoder
from protext.tpt import PromptTuner, TPTConfig, handcrafted_encoder, image_generator
from protext.views import view_transform_for

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


def test_tpt_cli_matches_library(folder, tmp_path):
    """The CLI's TPT prediction of an image is the library's on that image's own views."""
    result = run_cli(["--dataset", "folder", "--root", str(folder), "--tpt", "--tpt-views", "16", "--limit", "4", "--seed", "7", "--save-logits"], tmp_path / "t.json")
    assert result["method"] == "clip + TPT" and result["metrics"]["n_images"] == 4
    assert result["tpt"]["init"] == "handcrafted" and result["tpt"]["selected_views"] == 1 and result["tpt"]["path"] == "fast"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("tiny-clip", "random", seed=7)  # --seed also seeds the random model
    encoder = handcrafted_encoder(clip.model, clip.tokenizer, ["cat", "golden_retriever", "ox"], "a photo of a {}.")
    tuner = PromptTuner(clip.model, encoder, TPTConfig(n_views=16))
    views = view_transform_for("folder", n_views=16, resolution=224)
    path = sorted(folder.glob("*/*.png"))[3]  # dataset index 3
    out = tuner.adapt(views(Image.open(path).convert("RGB"), generator=image_generator(7, 3)))
    torch.testing.assert_close(torch.tensor(result["predictions"]["logits"][3]), out.logits, atol=1e-5, rtol=0)


def test_tpt_from_coop_and_protext_checkpoints(tiny_clip, dtd, tmp_path):
    coop = tmp_path / "coop.pth"
    torch.save({"state_dict": {"ctx": torch.randn(4, 64) * 0.02}}, coop)
    base = ["--dataset", "dtd", "--root", str(dtd), "--tpt", "--tpt-views", "8", "--limit", "3"]
    result = run_cli([*base, "--method", "prompts", "--prompts", str(coop)], tmp_path / "coop.json")
    assert result["tpt"]["init"] == "coop" and result["checkpoint"]["depth"] == 1 and result["metrics"]["n_images"] == 3

    encoder = PromptedTextEncoder(tiny_clip.model, tiny_clip.tokenizer, ["x"], n_ctx=4, depth=2)
    ckpt = tmp_path / "deep.safetensors"
    save_prompts(ckpt, encoder)
    result = run_cli([*base, "--method", "prompts", "--prompts", str(ckpt), "--tpt-tune", "shallow"], tmp_path / "deep.json")
    assert result["tpt"]["init"] == "prompts" and result["tpt"]["tune"] == "shallow" and result["checkpoint"]["depth"] == 2


def test_two_process_torchrun_equals_one_process(folder, tmp_path):
    """Sharded over 2 gloo ranks: the same per-image predictions and totals as one process."""
    args = ["--dataset", "folder", "--root", str(folder), "--tpt", "--tpt-views", "8", "--seed", "3", *TINY]
    single = tmp_path / "one.json"
    assert main([*args, "--out", str(single)]) == 0
    sharded = tmp_path / "two.json"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protext.eval", *args, "--out", str(sharded)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert two["runtime"]["world_size"] == 2 and one["runtime"]["world_size"] == 1
    assert two["predictions"] == one["predictions"]
    assert two["metrics"] == one["metrics"] and two["metrics"]["n_images"] == 9
    assert proc.stdout.count("| folder |") == 1  # only rank 0 prints the table


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
        cwd=REPO, capture_output=True, text=True, timeout=120,
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
    err = fail_cli(["--dataset", "dtd", "--root", str(dtd), "--method", "cupl", "--descriptions", "d.jsonl", "--tpt"], capsys)
    assert "--tpt" in err and "cupl" in err
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--method", "prompts", "--prompts", str(tmp_path / "none.safetensors")], capsys)
    assert "none.safetensors" in err
    wide = tmp_path / "vitb.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 512)}}, wide)
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--method", "prompts", "--prompts", str(wide)], capsys)
    assert "width 512" in err and "width 64" in err
    err = fail_cli(["--dataset", "folder", "--root", str(folder), "--precision", "amp", "--device", "cpu"], capsys)
    assert "CUDA" in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--dataset", "--root", "--split", "--classnames", "--method", "--template", "--descriptions", "--prompts",
                 "--tpt-views", "--tpt-selection", "--tpt-steps", "--tpt-lr", "--tpt-init", "--tpt-tune", "--batch-size",
                 "--workers", "--limit", "--seed", "--out", "--precision", "--device", "--pretrained", "--model"]:
        assert flag in text
