"""The one class-list reader: every file kind gives the names a user expects, bad files one clear error."""

from __future__ import annotations

import json
import math

import pytest

from protext.classlists import (
    ClassListError,
    clean_classname,
    read_classes,
    read_split_file,
    split_classes,
    split_range,
)
from protext.errors import UserError
from protext.templates import template_for


def test_txt_with_coop_ids_loses_them_line_by_line(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("n01440764 tench\nn01443537 goldfish\n\n# a comment\ngreat white shark\n")
    # a line without an id keeps its name; ids go wherever they appear
    assert read_classes(path) == ["tench", "goldfish", "great white shark"]


def test_name_that_merely_starts_with_n_and_digits_is_kept(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("n123 thing\nn0144076 short id\n")
    assert read_classes(path) == ["n123 thing", "n0144076 short id"]


def test_json_list_and_classnames_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["Abyssinian", " beagle "]))
    (tmp_path / "b.json").write_text(json.dumps({"classnames": ["x", "y_z"]}))
    assert read_classes(tmp_path / "a.json") == ["Abyssinian", "beagle"]
    assert read_classes(tmp_path / "b.json") == ["x", "y_z"]


def test_coop_split_file_gives_label_order(tmp_path):
    split = {
        "train": [["b/1.jpg", 1, "beagle"], ["a/1.jpg", 0, "Abyssinian"]],
        "val": [],
        "test": [["c/1.jpg", 2, "yorkshire_terrier"], ["a/2.jpg", 0, "Abyssinian"]],
    }
    path = tmp_path / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps(split))
    assert read_classes(path) == ["Abyssinian", "beagle", "yorkshire_terrier"]
    parts = read_split_file(path)
    assert parts["test"] == [("c/1.jpg", 2, "yorkshire_terrier"), ("a/2.jpg", 0, "Abyssinian")]
    assert parts["val"] == []


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"train": [["a.jpg", "0", "x"]]}', "entry 0 of 'train'"),
        ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}', "named both"),
        ('{"train": [["a.jpg", 1, "x"]]}', "labels [0]"),
        ('{"train": [}', ":1: malformed JSON"),
        ('{"other": 1}', "expected a JSON list"),
        ("[1, 2]", "only strings"),
    ],
)
def test_bad_json_files_name_the_file(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ClassListError) as info:
        read_classes(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_missing_empty_and_blank_files(tmp_path):
    with pytest.raises(ClassListError, match="no such file"):
        read_classes(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(ClassListError, match="no class names"):
        read_classes(tmp_path / "empty.txt")
    (tmp_path / "blank.json").write_text('["a", " "]')
    with pytest.raises(ClassListError, match="class 1 has an empty name"):
        read_classes(tmp_path / "blank.json")


def test_builtin_imagenet():
    names = read_classes("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"


def test_real_class_lists(shared_dir):
    dtd = read_classes(shared_dir / "classnames" / "dtd.json")
    assert len(dtd) == 47


@pytest.mark.parametrize("n", [0, 1, 2, 5, 47, 100, 397])
def test_base_novel_halves(n):
    names = [f"c{i}" for i in range(n)]
    half = (n + 1) // 2  # ceil, written without the implementation's math.ceil
    assert split_classes(names, "base") == names[:half]
    assert split_classes(names, "novel") == names[half:]
    assert split_classes(names, "all") == names
    assert len(split_range(n, "base")) == math.ceil(n / 2)


def test_bad_split_name():
    with pytest.raises(ClassListError, match="--split"):
        split_range(4, "new")


def test_clean_classname():
    assert clean_classname("yorkshire_terrier") == "yorkshire terrier"
    assert clean_classname("  a__b  c ") == "a b c"


@pytest.mark.parametrize(
    "dataset, protext, coop",
    [
        ("dtd", "a photo of a {}, a type of a texture.", "{} texture."),
        ("eurosat", "a photo of a centered satellite photo of {}.", "a centered satellite photo of {}."),
        ("food101", "a photo of a {}, a type of food.", "a photo of {}, a type of food."),
        ("ucf101", "a photo of a {}.", "a photo of a person doing {}."),
        ("oxford_pets", "a photo of a {}, a type of pet.", "a photo of a {}, a type of pet."),
        ("imagenet_a", "a photo of a {}.", "a photo of a {}."),
    ],
)
def test_template_rules(dataset, protext, coop):
    assert template_for(dataset, "protext") == protext
    assert template_for(dataset, "coop") == coop
    assert template_for(dataset, "tpt") == "a photo of a {}."
    with pytest.raises(UserError, match="--templates"):
        template_for(dataset, "clip")


# -- the eleven datasets' class lists, shipped with the package ----------------------------------------


def test_shipped_class_lists_equal_the_published_lists(shared_dir):
    from importlib import resources

    from protext.classlists import BUILTIN, BUILTIN_FILES

    assert len(BUILTIN) == 11
    for name, file_name in BUILTIN_FILES.items():
        shipped = resources.files("protext").joinpath("data", "classnames", file_name).read_bytes()
        published = (shared_dir / "classnames" / file_name).read_bytes()
        assert shipped == published, file_name
        assert read_classes(name) == json.loads(published), name
        assert read_classes(name.upper()) == read_classes(name)  # names are case-insensitive, like 'imagenet'


def test_builtin_lists_need_neither_torch_nor_open_clip():
    import subprocess
    import sys

    code = (
        "import sys; from protext.classlists import read_classes; "
        "assert len(read_classes('dtd')) == 47 and len(read_classes('imagenet')) == 1000; "
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_file_named_like_a_builtin_list_is_read_as_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dtd").write_text("only\nthese\n")
    assert read_classes("dtd") == ["only", "these"]


def test_unknown_name_lists_the_builtin_names():
    with pytest.raises(ClassListError, match="not a built-in class list .*dtd.*oxford_pets"):
        read_classes("no_such_dataset")


def test_presets_take_their_class_list_from_the_package():
    from protext.classlists import BUILTIN_FILES
    from protext.presets import PRESETS

    for preset in PRESETS.values():
        assert preset.dataset in BUILTIN_FILES and preset.classnames_file == BUILTIN_FILES[preset.dataset]
    base = split_classes(read_classes("dtd"), "base")
    assert len(base) == 24 and base == read_classes("dtd")[:24]  # ceil(47/2)


def test_help_texts_and_errors_do_not_send_users_to_shared():
    from protext.eval import build_parser as eval_parser
    from protext.gen_descriptions import build_import_parser
    from protext.gen_descriptions import build_parser as gen_parser
    from protext.reproduce import build_parser as reproduce_parser
    from protext.train import build_parser as train_parser

    for parser in (eval_parser(), gen_parser(), build_import_parser(), reproduce_parser(), train_parser()):
        text = parser.format_help()
        assert "../shared" not in text and "shared/" not in text
