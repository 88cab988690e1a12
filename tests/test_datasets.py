"""protext.datasets on generated layouts: folders, CoOp splits (both conventions), ImageNet family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protext.datasets import (
    DATASET_NAMES,
    DatasetError,
    ImageDataset,
    build_dataset,
    dataset_template,
    is_imagenet_family,
    split_classes,
)

SHARED_VARIANTS = Path(__file__).resolve().parents[2] / "shared" / "classnames" / "imagenet_variants.json"
PACKAGED = Path(__file__).resolve().parents[1] / "protext" / "data" / "imagenet_variants.json"


def _image(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def _wnids() -> list[str]:
    return json.loads(PACKAGED.read_text())["imagenet_wnids"]


# --------------------------------------------------------------------------------------------
# names, templates, subsets
# --------------------------------------------------------------------------------------------


def test_names_templates_family():
    assert len(DATASET_NAMES) == 15 and len(set(DATASET_NAMES)) == 15
    assert dataset_template("oxford_pets") == "a photo of a {}, a type of pet."
    assert dataset_template("oxford_flowers") == "a photo of a {}, a type of flower."
    assert dataset_template("fgvc_aircraft") == "a photo of a {}, a type of aircraft."
    assert dataset_template("dtd") == "a photo of a {}, a type of a texture."
    assert dataset_template("eurosat") == "a photo of a centered satellite photo of {}."
    assert dataset_template("food101") == "a photo of a {}, a type of food."
    for name in ("imagenet", "imagenet_a", "sun397", "caltech101", "ucf101", "stanford_cars", "folder"):
        assert dataset_template(name) == "a photo of a {}."
    assert [n for n in DATASET_NAMES if is_imagenet_family(n)] == [
        "imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"
    ]
    assert is_imagenet_family("imagenet-a") and is_imagenet_family("ImageNetV2")
    assert not is_imagenet_family("folder") and not is_imagenet_family("DTD")


def test_split_classes():
    assert split_classes(47, "base") == range(0, 24)
    assert split_classes(47, "novel") == range(24, 47)
    assert split_classes(100, "base") == range(50) and split_classes(100, "novel") == range(50, 100)
    assert split_classes(5, "all") == range(5)
    assert split_classes(1, "novel") == range(1, 1)
    with pytest.raises(ValueError, match="subset"):
        split_classes(4, "half")


def test_packaged_imagenet_facts_match_shared():
    if not SHARED_VARIANTS.is_file():
        pytest.skip("../shared not present")
    shared = json.loads(SHARED_VARIANTS.read_text())
    packaged = json.loads(PACKAGED.read_text())
    for key in ("imagenet_wnids", "imagenet_a_indices", "imagenet_r_indices"):
        assert packaged[key] == shared[key]
    # The V2 table is int(folder name) in string order, which is why the package needs no copy.
    assert shared["imagenet_v2_indices"] == [int(s) for s in sorted(str(i) for i in range(1000))]


# --------------------------------------------------------------------------------------------
# plain image folder
# --------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    root = tmp_path / "pics"
    _image(root / "golden_retriever" / "a.png", 0)
    _image(root / "golden_retriever" / "sub" / "b.jpg", 1)
    _image(root / "tabby_cat" / "c.png", 2, mode="L")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = build_dataset("folder", root)
    assert isinstance(ds, ImageDataset) and isinstance(ds, torch.utils.data.Dataset)
    assert ds.name == "folder"
    assert ds.classnames == ["golden_retriever", "tabby_cat"]
    assert [(p.name, y) for p, y in ds.samples] == [("a.png", 0), ("b.jpg", 0), ("c.png", 1)]
    img, label = ds[2]
    assert label == 1 and img.mode == "RGB" and img.size == (12, 10)
    ds_t = build_dataset("folder", root, transform=lambda im: np.asarray(im).shape)
    assert ds_t[0] == ((10, 12, 3), 0)


def test_image_folder_classnames_file(tmp_path):
    root = tmp_path / "pics"
    for k, cls in enumerate(["a", "b", "c"]):
        _image(root / cls / "x.png", k)
    names = tmp_path / "names.txt"
    names.write_text("apple\nbanana\n\ncherry\n")
    assert build_dataset("folder", root, classnames_file=names).classnames == ["apple", "banana", "cherry"]
    as_json = tmp_path / "names.json"
    as_json.write_text(json.dumps(["A", "B", "C"]))
    assert build_dataset("folder", root, classnames_file=as_json).classnames == ["A", "B", "C"]
    # base of 3 classes is 2 labels; a file with just those is accepted for that subset
    base = tmp_path / "base.txt"
    base.write_text("apple\nbanana\n")
    assert build_dataset("folder", root, subset="base", classnames_file=base).classnames == ["apple", "banana"]
    bad = tmp_path / "bad.txt"
    bad.write_text("one\ntwo\nthree\nfour\n")
    with pytest.raises(DatasetError, match=r"bad\.txt.*4 names.*3 classes"):
        build_dataset("folder", root, classnames_file=bad)
    with pytest.raises(DatasetError, match="missing.txt"):
        build_dataset("folder", root, classnames_file=tmp_path / "missing.txt")


def test_base_novel_relabelling(tmp_path):
    root = tmp_path / "pics"
    for k in range(5):
        _image(root / f"class{k}" / "x.png", k)
        _image(root / f"class{k}" / "y.png", 10 + k)
    full = build_dataset("folder", root)
    base = build_dataset("folder", root, subset="base")
    novel = build_dataset("folder", root, subset="novel")
    assert base.classnames == ["class0", "class1", "class2"]
    assert novel.classnames == ["class3", "class4"]
    assert sorted({y for _, y in base.samples}) == [0, 1, 2]
    assert sorted({y for _, y in novel.samples}) == [0, 1]
    # every kept image keeps its class: the name under the new label is its folder
    for ds in (base, novel):
        for path, y in ds.samples:
            assert path.parent.name == ds.classnames[y]
    assert len(base) + len(novel) == len(full) == 10


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*does not exist"):
        build_dataset("folder", tmp_path / "nowhere")
    root = tmp_path / "pics"
    _image(root / "full" / "x.png", 0)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder .*empty holds no images"):
        build_dataset("folder", root)
    flat = tmp_path / "flat"
    _image(flat / "x.png", 0)
    with pytest.raises(DatasetError, match=r"flat has no class sub-folders"):
        build_dataset("folder", flat)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", root)
    with pytest.raises(ValueError, match="split"):
        build_dataset("folder", root, split="holdout")


def test_unreadable_image_names_file(tmp_path):
    root = tmp_path / "pics"
    bad = root / "cls" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    ds = build_dataset("folder", root)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]


# --------------------------------------------------------------------------------------------
# CoOp split files
# --------------------------------------------------------------------------------------------

DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly"]


def _dtd_split(image_dir: Path, split_path: Path) -> dict:
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    k = 0
    for label, cls in enumerate(DTD_CLASSES):
        for part, count in (("train", 2), ("val", 1), ("test", 2)):
            for j in range(count):
                rel = f"{cls}/{cls}_{part}_{j}.jpg"
                _image(image_dir / rel, k)
                k += 1
                split[part].append([rel, label, cls])
    split_path.parent.mkdir(parents=True, exist_ok=True)
    split_path.write_text(json.dumps(split))
    return split


@pytest.mark.parametrize("convention", ["coop", "tpt"])
@pytest.mark.parametrize("point_at", ["parent", "dataset"])
def test_coop_split_both_conventions(tmp_path, convention, point_at):
    if convention == "coop":
        dataset_dir = tmp_path / "dtd"
        image_dir = dataset_dir / "images"
    else:
        dataset_dir = tmp_path / "DTD"
        image_dir = dataset_dir / "images"
    split = _dtd_split(image_dir, dataset_dir / "split_zhou_DescribableTextures.json")
    root = tmp_path if point_at == "parent" else dataset_dir
    test = build_dataset("dtd", root, split="test")
    assert test.name == "dtd" and test.root == dataset_dir
    assert test.classnames == DTD_CLASSES
    assert [(p, y) for p, y in test.samples] == [(image_dir / rel, y) for rel, y, _ in split["test"]]
    train = build_dataset("DTD", root, split="train")
    assert len(train) == 8 and len(build_dataset("dtd", root, split="val")) == 4
    assert train.classnames == test.classnames
    base = build_dataset("dtd", root, split="test", subset="novel")
    assert base.classnames == ["braided", "bubbly"]
    assert [(p.parent.name, y) for p, y in base.samples] == [("braided", 0)] * 2 + [("bubbly", 1)] * 2
    img, y = test[0]
    assert img.mode == "RGB" and y == 0


def test_coop_split_flat_image_folder(tmp_path):
    # TPT's pets/caltech/... keep the images directly in the dataset folder next to the split file.
    dataset_dir = tmp_path / "OxfordPets"
    split = {"test": [["abyssinian_1.jpg", 0, "abyssinian"], ["beagle_3.jpg", 1, "beagle"]], "train": []}
    _image(dataset_dir / "abyssinian_1.jpg", 0)
    _image(dataset_dir / "beagle_3.jpg", 1)
    (dataset_dir / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    ds = build_dataset("oxford_pets", tmp_path)
    assert ds.classnames == ["abyssinian", "beagle"]
    assert [(p.name, y) for p, y in ds.samples] == [("abyssinian_1.jpg", 0), ("beagle_3.jpg", 1)]
    assert dataset_template(ds.name) == "a photo of a {}, a type of pet."


def test_coop_split_errors(tmp_path):
    root = tmp_path / "data"
    (root / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json not found.*CoOp layout"):
        build_dataset("dtd", root)

    split_path = root / "dtd" / "split_zhou_DescribableTextures.json"
    split_path.write_text('{"train": [["a.jpg", 0, "banded"],')  # truncated
    with pytest.raises(DatasetError, match=r"malformed split file .*split_zhou_DescribableTextures\.json"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"test": [["a.jpg", "zero", "banded"]]}))
    with pytest.raises(DatasetError, match=r"malformed split file .*entry 0 of 'test'"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"train": [["a.jpg", 0, "banded"]]}))
    with pytest.raises(DatasetError, match=r"has no 'test' list"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"train": [["a.jpg", 0, "banded"]], "test": []}))
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json lists no images under 'test'"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"test": [["a.jpg", 1, "blotchy"]]}))
    with pytest.raises(DatasetError, match=r"labels \[0\] have no entries"):
        build_dataset("dtd", root)
    with pytest.raises(DatasetError, match=r"dataset root .*elsewhere does not exist.*split_zhou"):
        build_dataset("dtd", tmp_path / "elsewhere")

    split = _dtd_split(root / "dtd" / "images", split_path)
    gone = split["test"][3][0]
    (root / "dtd" / "images" / gone).unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("dtd", root, split="test")
    assert gone in str(err.value) and "split_zhou_DescribableTextures.json" in str(err.value)
    assert len(build_dataset("dtd", root, split="train")) == 8  # other splits are still fine

    # the first listed image missing: no candidate image folder fits
    (root / "dtd" / "images" / split["val"][0][0]).unlink()
    expected = r"banded_val_0\.jpg listed in .*split_zhou_DescribableTextures\.json does not exist"
    with pytest.raises(DatasetError, match=expected):
        build_dataset("dtd", root, split="val")


def test_fgvc_aircraft(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    d.mkdir()
    (d / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    (d / "images_variant_test.txt").write_text("0000001 Cessna 172\n0000002 707-320\n0000003 A300B4\n")
    for k in (1, 2, 3):
        _image(d / "images" / f"{k:07d}.jpg", k)
    ds = build_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert [(p.name, y) for p, y in ds.samples] == [("0000001.jpg", 2), ("0000002.jpg", 0), ("0000003.jpg", 1)]
    assert dataset_template("aircraft") == "a photo of a {}, a type of aircraft."
    (d / "images_variant_val.txt").write_text("0000001 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt line 1: variant 'Boeing 999'"):
        build_dataset("fgvc_aircraft", d, split="val")
    with pytest.raises(DatasetError, match=r"images_variant_train\.txt not found"):
        build_dataset("fgvc_aircraft", d, split="train")
    (d / "images" / "0000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"0000003\.jpg listed in .*images_variant_test\.txt"):
        build_dataset("fgvc_aircraft", d)


# --------------------------------------------------------------------------------------------
# ImageNet and its variants
# --------------------------------------------------------------------------------------------


def test_imagenet_val_both_conventions(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = _wnids()
    picks = [0, 1, 417, 999]
    for sub in ("imagenet/images/val", "ImageNet/val"):
        root = tmp_path / sub.split("/")[0]
        for label in picks:
            _image(tmp_path / sub / wnids[label] / f"ILSVRC2012_val_{label:08d}.JPEG", label)
        ds = build_dataset("imagenet", tmp_path)
        assert ds.root == tmp_path / sub and len(ds.classnames) == 1000
        assert ds.classnames == list(IMAGENET_CLASSNAMES)
        assert [y for _, y in ds.samples] == picks
        assert all(p.parent.name == wnids[y] for p, y in ds.samples)
        # root pointing at the dataset folder or at the val folder itself
        assert build_dataset("imagenet", tmp_path / sub).samples == ds.samples
        assert build_dataset("imagenet", root).samples == ds.samples
        shutil.rmtree(root)
    _image(tmp_path / "ImageNet/val" / wnids[999] / "x.JPEG", 0)
    novel = build_dataset("imagenet", tmp_path, subset="novel")
    assert novel.classnames[-1] == IMAGENET_CLASSNAMES[999] and len(novel.classnames) == 500
    assert [y for _, y in novel.samples] == [499]


def test_imagenet_v2_string_sort_trap(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    folder = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    labels = [0, 1, 2, 10, 100, 101, 999]
    for label in labels:
        _image(folder / str(label) / f"{label}_a.jpeg", label)
    ds = build_dataset("imagenet_v2", tmp_path)
    # a plain ImageFolder would give folder "10" label 3 and "2" label 2... here folder k is label k
    assert sorted(str(x) for x in labels) != [str(x) for x in labels]
    assert {p.parent.name: y for p, y in ds.samples} == {str(x): x for x in labels}
    assert ds.classnames == list(IMAGENET_CLASSNAMES)
    if SHARED_VARIANTS.is_file():
        # the released mapping: position in string-sorted folder order -> label
        v2 = json.loads(SHARED_VARIANTS.read_text())["imagenet_v2_indices"]
        order = sorted(str(x) for x in range(1000))
        for p, y in ds.samples:
            assert v2[order.index(p.parent.name)] == y
    # TPT convention
    tpt = tmp_path / "tpt"
    for label in (5, 50):
        _image(tpt / "imagenetv2-matched-frequency-format-val" / str(label) / "x.jpeg", label)
    assert [y for _, y in build_dataset("imagenet-v2", tpt).samples] == [5, 50]
    _image(tpt / "imagenetv2-matched-frequency-format-val" / "1000" / "x.jpeg", 0)
    with pytest.raises(DatasetError, match=r"unexpected folder .*1000.*0\.\.999"):
        build_dataset("imagenet_v2", tpt)


@pytest.mark.parametrize("variant", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_labels(tmp_path, variant):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = _wnids()
    indices = json.loads(PACKAGED.read_text())[f"{variant}_indices"]
    picks = [0, 7, 199]  # positions in the 200-class list
    sub = "imagenet-a" if variant == "imagenet_a" else "imagenet-r"
    coop_parent = "imagenet-adversarial" if variant == "imagenet_a" else "imagenet-rendition"
    for pos in picks:
        _image(tmp_path / coop_parent / sub / wnids[indices[pos]] / "x.jpg", pos)
    (tmp_path / coop_parent / sub / "README.txt").write_text("ignored")
    ds = build_dataset(variant, tmp_path)
    assert len(ds.classnames) == 200
    assert ds.classnames == [IMAGENET_CLASSNAMES[i] for i in indices]
    assert [y for _, y in ds.samples] == picks
    for p, y in ds.samples:
        assert ds.classnames[y] == IMAGENET_CLASSNAMES[wnids.index(p.parent.name)]
    if variant == "imagenet_a":
        assert ds.classnames[0] == IMAGENET_CLASSNAMES[6] == "stingray"
    base = build_dataset(variant, tmp_path, subset="base")
    assert [y for _, y in base.samples] == [0, 7] and len(base.classnames) == 100
    novel = build_dataset(variant, tmp_path, subset="novel")
    assert [y for _, y in novel.samples] == [99] and novel.classnames[99] == ds.classnames[199]
    # a wnid outside the 200 classes is named
    outside = next(w for i, w in enumerate(wnids) if i not in set(indices))
    _image(tmp_path / coop_parent / sub / outside / "x.jpg", 0)
    with pytest.raises(DatasetError, match=rf"unexpected folder .*{outside}"):
        build_dataset(variant, tmp_path)


def test_imagenet_sketch_and_missing_layout(tmp_path):
    wnids = _wnids()
    _image(tmp_path / "ImageNet-Sketch" / "sketch" / wnids[3] / "sketch_1.JPEG", 0)
    ds = build_dataset("imagenet_sketch", tmp_path)
    assert [y for _, y in ds.samples] == [3] and len(ds.classnames) == 1000
    with pytest.raises(DatasetError, match=r"no imagenet_a image folders found .*imagenet-adversarial/imagenet-a"):
        build_dataset("imagenet_a", tmp_path)
    (tmp_path / "imagenet-r" / wnids[1]).mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"class folder .*{wnids[1]} holds no images"):
        build_dataset("imagenet_r", tmp_path)


def test_imagenet_classnames_file_with_wnids(tmp_path):
    # CoOp ships ImageNet names as "n01440764 tench" lines
    wnids = _wnids()
    _image(tmp_path / "val" / wnids[0] / "x.JPEG", 0)
    names = tmp_path / "classnames.txt"
    names.write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    ds = build_dataset("imagenet", tmp_path, classnames_file=names)
    assert ds.classnames[0] == "class 0" and ds.classnames[999] == "class 999"
