"""``protext.datasets.check`` / ``dataset_status`` and ``python -m protext.datasets check`` on generated trees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from synthetic_datasets import (  # noqa: F401  (make_dataset_tree is a fixture)
    ALL_DATASETS,
    CIFAR_FOLDERS,
    IMAGENET_FOLDERS,
    LAYOUTS,
    SPLIT_DATASETS,
    make_dataset_tree,
)

from protext.datasets import DatasetError, check, dataset_status
from protext.datasets.__main__ import main

# Test-set sizes as published (CoOp's DATASETS.md; the ImageNet variants' and CIFAR's papers).
PUBLISHED = {
    "imagenet": 50000, "imagenet_a": 7500, "imagenet_r": 30000, "imagenet_v2": 10000, "imagenet_sketch": 50889,
    "caltech101": 2465, "dtd": 1692, "eurosat": 8100, "fgvc_aircraft": 3333, "food101": 30300,
    "oxford_flowers": 2463, "oxford_pets": 3669, "stanford_cars": 8041, "sun397": 19850, "ucf101": 3783,
    "cifar10": 10000, "cifar100": 10000,
}


def _expected_layout(name: str, layout: str) -> str:
    if name in CIFAR_FOLDERS:
        return "torchvision"
    if name == "fgvc_aircraft":
        return "coop/tpt"
    return layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_dataset_found_with_counts(make_dataset_tree, layout):
    tree = make_dataset_tree(layout=layout, per_class=2, classes_per_dataset=3)
    root = next(iter(tree.values())).root
    statuses = check(root)
    assert sorted(s.name for s in statuses) == sorted(ALL_DATASETS)
    for s in statuses:
        want = tree[s.name]
        assert (s.state, s.problem, s.fix) == ("found", "", ""), s
        assert s.layout == _expected_layout(s.name, layout), s.name
        assert s.images == len(want.images["test"]) == 6
        listed = s.name in SPLIT_DATASETS or s.name == "fgvc_aircraft"
        assert s.listed == (6 if listed else None)
        assert s.classes == len(want.classnames)
        assert s.published == PUBLISHED[s.name]
        assert s.note() == f"6 test images{' listed' if listed else ''}; the published test set has {PUBLISHED[s.name]}"


def test_empty_root_everything_missing_with_where_to_place_it(tmp_path):
    statuses = {s.name: s for s in check(tmp_path)}
    assert set(statuses) == set(ALL_DATASETS)
    root = str(tmp_path)
    for name, s in statuses.items():
        assert s.state == "missing" and s.images == 0 and s.layout == "" and "\n" not in s.fix
        if name in SPLIT_DATASETS:
            spec = SPLIT_DATASETS[name]
            coop_images = "/".join(p for p in (root, spec.coop_folder, spec.coop_images) if p)
            tpt_images = "/".join(p for p in (root, spec.tpt_folder, spec.tpt_images) if p)
            assert f"{root}/{spec.coop_folder}/{spec.split_file}" in s.fix
            assert f"images under {coop_images}/" in s.fix and f"images under {tpt_images}/" in s.fix
            assert f"{spec.split_file} in {root}/data_splits/" in s.fix
        elif name in IMAGENET_FOLDERS:
            coop, tpt = IMAGENET_FOLDERS[name]
            assert f"{root}/{coop}/" in s.fix and f"{root}/{tpt}/" in s.fix
        elif name in CIFAR_FOLDERS:
            assert f"{root}/{CIFAR_FOLDERS[name]}/" in s.fix
        else:
            assert f"{root}/fgvc_aircraft/" in s.fix and "variants.txt" in s.fix


def test_incomplete_datasets_say_what_is_wrong(make_dataset_tree):
    names = ["dtd", "sun397", "eurosat", "imagenet_r", "cifar10", "oxford_pets"]
    coop = make_dataset_tree(names, layout="coop", classes_per_dataset=3)
    tpt = make_dataset_tree(names, layout="tpt", classes_per_dataset=3)
    # one listed image gone
    gone = coop["dtd"].images["test"][1].path
    gone.unlink()
    s = dataset_status("dtd", coop["dtd"].root)
    assert (s.state, s.images, s.listed, s.layout) == ("incomplete", 2, 3, "coop")
    assert f"first: {gone}" in s.problem
    assert s.fix == (
        f"place the images listed in {coop['dtd'].split_file} under {coop['dtd'].folder / 'images'}/ "
        "(its paths are relative to that folder)"
    )
    # split file missing: CoOp's goes beside the images, TPT's into data_splits/
    coop["sun397"].split_file.unlink()
    s = dataset_status("sun397", coop["sun397"].root)
    assert s.state == "incomplete" and f"in {coop['sun397'].folder}/ (CoOp layout)" in s.fix
    tpt["sun397"].split_file.unlink()
    s = dataset_status("sun397", tpt["sun397"].root)
    assert s.state == "incomplete" and f"in {tpt['sun397'].root / 'data_splits'}/ (TPT's layout)" in s.fix
    tpt["eurosat"].split_file.unlink()  # eurosat/ is the folder of both layouts: both places offered
    s = dataset_status("eurosat", tpt["eurosat"].root)
    assert "(CoOp layout) or in" in s.fix and "data_splits/ (TPT's layout)" in s.fix
    # the TPT pets folder keeps images flat: a missing one is named under OxfordPets/
    pets = tpt["oxford_pets"]
    pets.images["test"][0].path.unlink()
    s = dataset_status("pets", pets.root)
    assert s.state == "incomplete" and f"under {pets.root / 'OxfordPets'}/" in s.fix
    # an ImageNet-R folder with no class folders in it; a CIFAR folder without its meta file
    shutil.rmtree(coop["imagenet_r"].folder)
    coop["imagenet_r"].folder.mkdir()
    assert dataset_status("imagenet_r", coop["imagenet_r"].root).state == "incomplete"
    (coop["cifar10"].folder / "batches.meta").unlink()
    s = dataset_status("cifar10", coop["cifar10"].root)
    assert s.state == "incomplete" and "batches.meta not found" in s.problem


def test_check_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"--root .*nowhere does not exist"):
        check(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        check(tmp_path, datasets=["mnist"])
    with pytest.raises(DatasetError, match="'folder' has no fixed layout"):
        dataset_status("folder", tmp_path)


def test_cli_table_json_and_exit_codes(make_dataset_tree, capsys, tmp_path):
    tree = make_dataset_tree(["dtd", "imagenet_a", "cifar100"], layout="tpt", classes_per_dataset=2)
    root = str(tree["dtd"].root)
    assert main(["check", "--root", root]) == 0  # missing datasets are reported, not errors
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line and not line.startswith(("note", "missing"))]
    lines = {row[0]: row for row in rows}
    assert lines["dtd"][:4] == ["dtd", "found", "tpt", "2/2"]
    assert lines["imagenet_a"][:4] == ["imagenet_a", "found", "tpt", "2"]
    assert lines["cifar100"][:5] == ["cifar100", "found", "torchvision", "2", "10000"]
    assert lines["caltech101"][:2] == ["caltech101", "missing"]
    assert any(line.startswith("missing caltech101: CoOp layout:") for line in out.splitlines())

    assert main(["check", "--root", root, "--dataset", "DTD", "--dataset", "cars"]) == 1  # a named one is missing
    capsys.readouterr()
    assert main(["check", "--root", root, "--dataset", "dtd", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["name"] == "dtd" and entry["state"] == "found" and entry["listed"] == 2
    assert entry["folder"] == str(tree["dtd"].folder)

    tree["dtd"].images["test"][0].path.unlink()
    assert main(["check", "--root", root]) == 1  # incomplete
    assert "incomplete dtd: 1 of 2 test images" in capsys.readouterr().out

    moved = tmp_path / "splits"
    (tree["dtd"].root / "data_splits").rename(moved)
    assert main(["check", "--root", root, "--dataset", "imagenet_a", "--splits", str(moved)]) == 0
    capsys.readouterr()
    assert main(["check", "--root", str(tmp_path / "nowhere")]) == 2
    assert "error: --root" in capsys.readouterr().err
    assert main(["check", "--root", root, "--dataset", "mnist"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'mnist'; expected 'folder' or one of")


def test_cli_help_is_fast_and_complete():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "protext.datasets", "check", "--help"],
        capture_output=True, text=True, check=True,
    )
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "PIL", "numpy")]
    for flag in ("--root", "--dataset", "--splits", "--json"):
        assert flag in proc.stdout
    help_lines = proc.stdout.split("options:")[1]
    # every flag is followed by its help text
    assert "the data root" in help_lines and "check only this dataset" in help_lines
    assert "split_zhou_*.json" in help_lines and "as JSON" in help_lines
