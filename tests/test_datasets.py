"""protext.datasets against generated trees: every dataset in CoOp's and TPT's layout, folders, errors.

The expectations (class names in label order, which image has which label) come from
tests/synthetic_datasets.py, which builds the trees from the published layouts and the real class
names in ../shared, and encodes each image's id in its pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_datasets import (  # noqa: F401  (make_dataset_tree is a fixture)
    ALL_DATASETS,
    LAYOUTS,
    SPLIT_DATASETS,
    image_id,
    imagenet_wnids,
    make_dataset_tree,
    write_image,
)

from protext.datasets import (
    DATASET_NAMES,
    DatasetError,
    ImageDataset,
    build_dataset,
    dataset_status,
    dataset_template,
    is_imagenet_family,
    split_classes,
)
from protext.errors import UserError

PACKAGED = Path(__file__).resolve().parents[1] / "protext" / "data" / "imagenet_variants.json"


def _ids_and_labels(ds) -> list[tuple[int, int]]:
    """(pixel-encoded image id, label) of every item, in dataset order, read through ``ds[i]``."""
    return [(image_id(ds[i][0]), ds[i][1]) for i in range(len(ds))]


def _expected(images) -> list[tuple[int, int]]:
    return sorted((im.id, im.label) for im in images)


# --------------------------------------------------------------------------------------------
# names, templates, class halves


def test_names_templates_family():
    assert set(DATASET_NAMES) == set(ALL_DATASETS) and len(DATASET_NAMES) == 17
    assert dataset_template("oxford_pets") == "a photo of a {}, a type of pet."
    assert dataset_template("dtd") == "a photo of a {}, a type of a texture."
    assert dataset_template("DTD", "coop") == "{} texture."
    assert dataset_template("eurosat") == "a photo of a centered satellite photo of {}."
    assert dataset_template("pets", "tpt") == "a photo of a {}."
    for name in ("imagenet", "imagenet_a", "sun397", "caltech101", "ucf101", "stanford_cars", "cifar10", "folder"):
        assert dataset_template(name) == "a photo of a {}."
    assert [n for n in DATASET_NAMES if is_imagenet_family(n)] == [
        "imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"
    ]
    assert is_imagenet_family("imagenet-a") and is_imagenet_family("ImageNetV2") and is_imagenet_family("K")
    assert not is_imagenet_family("folder") and not is_imagenet_family("DTD") and not is_imagenet_family("cifar10")


def test_split_classes_names_and_deprecated_range():
    names = [f"c{i}" for i in range(47)]
    assert split_classes(names, "base") == names[:24] and split_classes(names, "novel") == names[24:]
    assert split_classes(names, "all") == names
    with pytest.warns(DeprecationWarning, match="split_range"):
        assert split_classes(47, "base") == range(0, 24)
    with pytest.warns(DeprecationWarning):
        assert split_classes(100, "new") == range(50, 100)


def test_dataset_error_is_a_user_error():
    assert issubclass(DatasetError, UserError)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", ".")


def test_packaged_imagenet_facts_match_shared(shared_dir):
    shared = json.loads((shared_dir / "classnames" / "imagenet_variants.json").read_text())
    packaged = json.loads(PACKAGED.read_text())
    for key in ("imagenet_wnids", "imagenet_a_indices", "imagenet_r_indices"):
        assert packaged[key] == shared[key]
    # The V2 table is int(folder name) in string order, which is why the package needs no copy.
    assert shared["imagenet_v2_indices"] == [int(s) for s in sorted(str(i) for i in range(1000))]


def test_tool_regenerates_the_package_data_exactly(shared_dir, tmp_path):
    out = tmp_path / "imagenet_variants.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_imagenet_variants.py"
    source = shared_dir / "classnames" / "imagenet_variants.json"
    subprocess.run([sys.executable, str(tool), "--source", str(source), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == PACKAGED.read_bytes()


# --------------------------------------------------------------------------------------------
# every dataset, both layouts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ALL_DATASETS)
def test_every_dataset_in_both_layouts(make_dataset_tree, name, layout):
    tree = make_dataset_tree([name], layout=layout, per_class=2, classes_per_dataset=6)
    want = tree[name]
    ds = build_dataset(name, want.root)
    assert ds.name == name and ds.partition == "test" and ds.split == "all"
    assert ds.classnames == want.classnames
    assert sorted(_ids_and_labels(ds)) == _expected(want.images["test"])
    assert len(ds) == len(want.images["test"]) == 12
    image, _ = ds[0]
    assert image.mode == "RGB"

    n = len(want.classnames)
    half = -(-n // 2)
    for split, keep in (("base", range(half)), ("novel", range(half, n))):
        part = build_dataset(name, want.root, split=split)
        assert part.classnames == want.classnames[keep.start : keep.stop]
        expected = [(im.id, im.label - keep.start) for im in want.images["test"] if im.label in keep]
        assert sorted(_ids_and_labels(part)) == sorted(expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_and_val_partitions(make_dataset_tree, layout):
    names = [*SPLIT_DATASETS, "fgvc_aircraft"]
    tree = make_dataset_tree(names, layout=layout, classes_per_dataset=3)
    for name in names:
        for partition in ("train", "val"):
            ds = build_dataset(name, tree[name].root, partition=partition)
            assert ds.partition == partition
            assert sorted(_ids_and_labels(ds)) == _expected(tree[name].images[partition]), (name, partition)


def test_cifar_train_partition_and_pixels(make_dataset_tree):
    tree = make_dataset_tree(["cifar10", "cifar100"], classes_per_dataset=4)
    for name in ("cifar10", "cifar100"):
        train = build_dataset(name, tree[name].root, partition="train")
        assert sorted(_ids_and_labels(train)) == _expected(tree[name].images["train"])
        assert train[0][0].size == (32, 32)
        with pytest.raises(DatasetError, match=f"{name} has no 'val' partition"):
            build_dataset(name, tree[name].root, partition="val")
    assert build_dataset("cifar100", tree["cifar100"].root).classnames[1] == "aquarium_fish"


def test_root_may_be_the_dataset_folder(make_dataset_tree):
    names = ["dtd", "oxford_pets", "imagenet_a", "imagenet_v2", "fgvc_aircraft", "cifar10"]
    for layout in LAYOUTS:
        tree = make_dataset_tree(names, layout=layout, classes_per_dataset=3)
        for name in names:
            ds = build_dataset(name, tree[name].folder)
            assert sorted(_ids_and_labels(ds)) == _expected(tree[name].images["test"]), (name, layout)


def test_tpt_split_files_in_other_places(make_dataset_tree, tmp_path):
    tree = make_dataset_tree(["dtd", "ucf101"], layout="tpt", classes_per_dataset=3)
    root = tree["dtd"].root
    want = {n: _expected(tree[n].images["test"]) for n in tree}
    # data/data_splits/ (TPT's own place inside its checkout)
    (root / "data").mkdir()
    (root / "data_splits").rename(root / "data" / "data_splits")
    assert sorted(_ids_and_labels(build_dataset("dtd", root))) == want["dtd"]
    # anywhere, named explicitly
    elsewhere = tmp_path / "TPT" / "data" / "data_splits"
    elsewhere.parent.mkdir(parents=True)
    (root / "data" / "data_splits").rename(elsewhere)
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json not found.*data_splits"):
        build_dataset("dtd", root)
    ds = build_dataset("ucf101", root, splits_dir=elsewhere)
    assert ds.layout == "tpt" and sorted(_ids_and_labels(ds)) == want["ucf101"]
    # root = the dataset folder, split files in its parent's data_splits/
    elsewhere.rename(root / "data_splits")
    assert sorted(_ids_and_labels(build_dataset("dtd", root / "DTD"))) == want["dtd"]


# --------------------------------------------------------------------------------------------
# classes, legacy keywords


def test_classes_replace_names(make_dataset_tree, tmp_path):
    tree = make_dataset_tree(["dtd", "imagenet"], classes_per_dataset=4)
    dtd = tree["dtd"]
    names = tmp_path / "names.txt"
    names.write_text("".join(f"texture {i}\n" for i in range(47)))
    assert build_dataset("dtd", dtd.root, classes=names).classnames == [f"texture {i}" for i in range(47)]
    novel = tmp_path / "novel.json"
    novel.write_text(json.dumps([f"n{i}" for i in range(23)]))
    assert build_dataset("dtd", dtd.root, split="novel", classes=novel).classnames == [f"n{i}" for i in range(23)]
    with pytest.raises(DatasetError, match=r"novel\.json names 23 classes, but dtd .* has 47"):
        build_dataset("dtd", dtd.root, classes=novel)
    with pytest.raises(DatasetError, match="missing.txt"):
        build_dataset("dtd", dtd.root, classes=tmp_path / "missing.txt")
    # CoOp's ImageNet classnames.txt ("n01440764 tench" lines) drops the WordNet ids
    coop_names = tree["imagenet"].root / "imagenet" / "classnames.txt"
    with_ids = build_dataset("imagenet", tree["imagenet"].root, classes=coop_names)
    assert with_ids.classnames == tree["imagenet"].classnames


def test_legacy_keywords_warn_and_agree(make_dataset_tree, tmp_path):
    tree = make_dataset_tree(["oxford_pets"], classes_per_dataset=6)
    root = tree["oxford_pets"].root
    names = tmp_path / "names.txt"
    names.write_text("".join(f"pet {i}\n" for i in range(37)))
    new = build_dataset("pets", root, split="base", partition="val", classes=names)
    with pytest.warns(DeprecationWarning) as record:
        old = build_dataset("pets", root, split="val", subset="base", classnames_file=names)
    assert len(record) == 3
    assert (old.samples, old.classnames, old.partition, old.split) == (new.samples, new.classnames, "val", "base")
    with pytest.raises(DatasetError, match="unknown partition 'holdout'"):
        build_dataset("pets", root, partition="holdout")
    with pytest.raises(DatasetError, match="unknown split 'half'"):
        build_dataset("pets", root, split="half")


# --------------------------------------------------------------------------------------------
# plain image folder


def test_image_folder(tmp_path):
    root = tmp_path / "pics"
    write_image(root / "golden_retriever" / "a.png", 1)
    write_image(root / "golden_retriever" / "sub" / "b.jpg", 2)
    write_image(root / "tabby_cat" / "c.png", 3)
    write_image(root / "tabby_cat" / ".hidden.png", 9)
    write_image(root / "tabby_cat" / ".cache" / "d.png", 9)
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = build_dataset("folder", root)
    assert isinstance(ds, ImageDataset) and isinstance(ds, torch.utils.data.Dataset)
    assert ds.name == "folder" and ds.classnames == ["golden_retriever", "tabby_cat"]
    assert _ids_and_labels(ds) == [(1, 0), (2, 0), (3, 1)]
    ds_t = build_dataset("folder", root, transform=lambda im: np.asarray(im).shape)
    assert ds_t[0] == ((4, 4, 3), 0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist"):
        build_dataset("folder", tmp_path / "nowhere")
    root = tmp_path / "pics"
    write_image(root / "full" / "x.png", 1)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder .*empty holds no images"):
        build_dataset("folder", root)
    flat = tmp_path / "flat"
    write_image(flat / "x.png", 1)
    with pytest.raises(DatasetError, match=r"flat has no class sub-folders"):
        build_dataset("folder", flat)


# --------------------------------------------------------------------------------------------
# images that cannot be read (issue 9.9)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): a decompression bomb to PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_unreadable_and_bomb_images_name_the_file(tmp_path):
    root = tmp_path / "pics"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a_broken.jpg").write_bytes(b"not a jpeg")
    bomb = _png_header_only(root / "cls" / "b_bomb.png", 40000, 40000)
    assert 40000 * 40000 > 2 * Image.MAX_IMAGE_PIXELS
    good = write_image(root / "cls" / "c_good.png", 7)
    truncated = root / "cls" / "d_truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    ds = build_dataset("folder", root)
    with pytest.raises(DatasetError, match=r"cannot read image .*a_broken\.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match=rf"image {bomb} is too large to decode safely"):
        ds[1]
    assert image_id(ds[2][0]) == 7
    with pytest.raises(DatasetError, match=r"d_truncated\.png"):
        ds[3]


# --------------------------------------------------------------------------------------------
# split files and list files that are wrong


def test_split_file_errors(make_dataset_tree):
    tree = make_dataset_tree(["dtd"], classes_per_dataset=3)
    root, split_path = tree["dtd"].root, tree["dtd"].split_file
    good = split_path.read_text()
    split_path.write_text('{"train": [["a.jpg", 0, "banded"],')  # truncated
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json.*malformed JSON"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"test": [["a.jpg", "zero", "banded"]]}))
    with pytest.raises(DatasetError, match=r"split_zhou_DescribableTextures\.json: entry 0 of 'test'"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"train": [["a.jpg", 0, "banded"]]}))
    with pytest.raises(DatasetError, match=r"has no 'test' list"):
        build_dataset("dtd", root)
    split_path.write_text(json.dumps({"test": [["a.jpg", 1, "blotchy"]]}))
    with pytest.raises(DatasetError, match=r"labels \[0\] have no entries"):
        build_dataset("dtd", root)
    split_path.write_text(good)
    gone = tree["dtd"].images["test"][2].path
    gone.unlink()
    expected = rf"image {gone} listed in .*split_zhou_DescribableTextures\.json does not exist"
    with pytest.raises(DatasetError, match=expected):
        build_dataset("dtd", root)
    assert len(build_dataset("dtd", root, partition="val")) == 3  # other partitions are still fine


def test_aircraft_list_errors(make_dataset_tree):
    tree = make_dataset_tree(["fgvc_aircraft"], classes_per_dataset=2)
    folder = tree["fgvc_aircraft"].folder
    # names with "/" (F/A-18) are ordinary variants
    assert "F/A-18" in build_dataset("aircraft", folder).classnames
    (folder / "images_variant_val.txt").write_text("0000001 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt line 1: variant 'Boeing 999'"):
        build_dataset("fgvc_aircraft", folder, partition="val")
    (folder / "images_variant_train.txt").unlink()
    with pytest.raises(DatasetError, match=r"images_variant_train\.txt not found"):
        build_dataset("fgvc_aircraft", folder, partition="train")
    (folder / "images_variant_test.txt").write_bytes(b"\xff\xfe 0000001 bad bytes\n")
    with pytest.raises(DatasetError, match=r"cannot read fgvc_aircraft under .*codec can't decode"):
        build_dataset("fgvc_aircraft", folder)
    assert dataset_status("fgvc_aircraft", folder.parent).state == "incomplete"


def test_imagenet_family_folder_errors(make_dataset_tree):
    tree = make_dataset_tree(["imagenet_a", "imagenet_v2"], classes_per_dataset=3)
    root = tree["imagenet_a"].root
    wnids = imagenet_wnids()
    indices = json.loads(PACKAGED.read_text())["imagenet_a_indices"]
    outside = next(w for i, w in enumerate(wnids) if i not in set(indices))
    write_image(tree["imagenet_a"].folder / outside / "x.jpg", 5)
    with pytest.raises(DatasetError, match=rf"unexpected folder .*{outside}: not one of the 200 imagenet_a"):
        build_dataset("imagenet_a", root)
    write_image(tree["imagenet_v2"].folder / "1000" / "x.jpeg", 5)
    with pytest.raises(DatasetError, match=r"unexpected folder .*1000: not named 0\.\.999"):
        build_dataset("imagenet_v2", root)
    with pytest.raises(DatasetError, match=r"no imagenet_r image folders found .*imagenet-rendition/imagenet-r"):
        build_dataset("imagenet_r", root)
    with pytest.raises(DatasetError, match="imagenet_a is a test set"):
        build_dataset("imagenet_a", root, partition="train")


def test_imagenet_v2_folder_k_is_label_k(make_dataset_tree, shared_dir):
    tree = make_dataset_tree(["imagenet_v2"], classes_per_dataset=12)
    ds = build_dataset("imagenet_v2", tree["imagenet_v2"].root)
    # the released mapping: position in string-sorted folder order -> label
    v2 = json.loads((shared_dir / "classnames" / "imagenet_variants.json").read_text())["imagenet_v2_indices"]
    order = sorted(str(x) for x in range(1000))
    assert any(p.parent.name != str(order.index(p.parent.name)) for p, _ in ds.samples)  # the trap is exercised
    for p, y in ds.samples:
        assert v2[order.index(p.parent.name)] == y


def test_cifar_refuses_code_in_a_batch(make_dataset_tree):
    tree = make_dataset_tree(["cifar10"], classes_per_dataset=2)
    folder = tree["cifar10"].folder

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(__import__("pickle").dumps({"data": Evil(), "labels": []}, protocol=2))
    expected = r"cannot read CIFAR batch .*test_batch: refusing to load (__builtin__|builtins)\.print"
    with pytest.raises(DatasetError, match=expected):
        build_dataset("cifar10", folder)
    (folder / "batches.meta").unlink()
    with pytest.raises(DatasetError, match=r"batches\.meta not found.*cifar-10-python\.tar\.gz"):
        build_dataset("cifar10", folder.parent)


def test_no_warning_on_the_current_keywords(make_dataset_tree):
    tree = make_dataset_tree(["eurosat"], classes_per_dataset=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("eurosat", tree["eurosat"].root, split="novel", partition="test")
