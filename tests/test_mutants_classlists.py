"""Mutation-testing follow-up for :mod:`protext.classlists` (issue 16): the behaviour the mutants of
the first run changed without a test noticing. Expected values are written out by hand here from the
module's documented rules (one class key, CoOp split files, the errors a user reads)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from protext.classlists import (
    BUILTIN_FILES,
    IMAGENET_COINCIDENCES,
    ClassListError,
    builtin_classes,
    check_distinct_classes,
    class_key,
    duplicate_classes,
    read_classes,
    read_split_file,
    split_range,
)

ENTRY = "[relative image path, label, classname]"
BUILTIN_LISTED = (
    "imagenet, caltech101, dtd, eurosat, fgvc_aircraft, food101, oxford_flowers, oxford_pets, "
    "stanford_cars, sun397, ucf101"
)


# -- one class, however it is spelled ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("Golden_Retriever", "golden retriever"),
        ("  GREAT   dane ", "great dane"),
        ("a__b c", "a b c"),
        ("ox", "ox"),
    ],
)
def test_class_key(name, key):
    assert class_key(name) == key


def test_duplicate_classes_lists_every_repeated_key_with_its_labels():
    names = ["Cat", "dog", "cat", "Dog ", "CAT", "ox", "sea_lion", "sea lion"]
    assert duplicate_classes(names) == {"cat": [0, 2, 4], "dog": [1, 3], "sea lion": [6, 7]}
    assert duplicate_classes(["a", "b", "c"]) == {}


def test_check_distinct_classes_names_the_source_and_the_first_repeated_class():
    check_distinct_classes(["a", "b", "c"], "ok.txt")  # distinct: nothing to say
    with pytest.raises(ClassListError) as info:
        check_distinct_classes(["a", "b", "B", "c", "C"], "x.txt")
    message = str(info.value)
    assert message.startswith("x.txt: classes 1 'b' and 2 'B' are one class name (")
    assert "names that differ only in case, '_' or spacing are one class), so their results would merge" in message
    assert message.endswith("rename or remove the duplicate.")
    assert "more" not in message and "'c'" not in message


def test_check_distinct_classes_shows_three_labels_and_counts_the_rest():
    with pytest.raises(ClassListError) as info:
        check_distinct_classes(["x", "X", "x_", "x ", "X_", "y"], "five.json")
    message = str(info.value)
    assert "five.json: classes 0 'x' and 1 'X' and 2 'x_' (and 2 more) are one class name" in message
    assert "'x '" not in message
    with pytest.raises(ClassListError) as info:
        check_distinct_classes(["x", "X", "x_", "x "], "four.json")
    assert "four.json: classes 0 'x' and 1 'X' and 2 'x_' (and 1 more) are one class name" in str(info.value)
    with pytest.raises(ClassListError) as info:
        check_distinct_classes(["x", "X", "x_"], "three.json")
    assert "three.json: classes 0 'x' and 1 'X' and 2 'x_' are one class name" in str(info.value)


def test_allowed_coincidences_are_skipped_but_later_duplicates_are_not():
    assert IMAGENET_COINCIDENCES == {"missile", "sunglasses"}
    check_distinct_classes(["missile", "a", "missile"], "imagenet", allowed=IMAGENET_COINCIDENCES)
    with pytest.raises(ClassListError) as info:
        check_distinct_classes(["missile", "missile", "a", "A"], "imagenet", allowed=IMAGENET_COINCIDENCES)
    assert "classes 2 'a' and 3 'A'" in str(info.value)
    with pytest.raises(ClassListError, match="classes 0 'missile' and 1 'missile'"):
        check_distinct_classes(["missile", "missile"], "mine.txt")  # not allowed unless asked


# -- halves and their errors ------------------------------------------------------------------------------


def test_split_range_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"number of classes must be >= 0, got -1"):
        split_range(-1, "all")
    with pytest.raises(ClassListError, match=r"--split must be one of all, base, novel, got 'new'"):
        split_range(4, "new")


# -- CoOp split files ---------------------------------------------------------------------------------------


def _write(tmp_path: Path, data, name: str = "split.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_json_object_without_partitions_is_not_a_split_file(tmp_path):
    path = _write(tmp_path, {"other": [["a.jpg", 0, "x"]]})
    with pytest.raises(ClassListError) as info:
        read_split_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a CoOp split file; expected ")
    assert '{"train"|"val"|"test": [' + ENTRY + ", ...]}" in message
    with pytest.raises(ClassListError, match="not a CoOp split file"):
        read_split_file(_write(tmp_path, [["a.jpg", 0, "x"]], "list.json"))


def test_a_split_file_may_hold_only_some_partitions(tmp_path):
    path = _write(tmp_path, {"test": [["b.jpg", 1, "dog"], ["a.jpg", 0, "cat"]]})
    assert read_split_file(path) == {"test": [("b.jpg", 1, "dog"), ("a.jpg", 0, "cat")]}
    assert read_classes(path) == ["cat", "dog"]
    path = _write(tmp_path, {"val": [["a.jpg", 0, "cat"]], "test": [["b.jpg", 1, "dog"]]}, "two.json")
    assert read_split_file(path) == {"val": [("a.jpg", 0, "cat")], "test": [("b.jpg", 1, "dog")]}


def test_a_partition_that_is_not_a_list_is_named(tmp_path):
    path = _write(tmp_path, {"train": {"a.jpg": 0}})
    with pytest.raises(ClassListError) as info:
        read_split_file(path)
    assert str(info.value) == f"{path}: 'train' is not a list of {ENTRY}"


def test_a_split_file_without_images_names_no_classes(tmp_path):
    path = _write(tmp_path, {"train": [], "test": []})
    with pytest.raises(ClassListError) as info:
        read_classes(path)
    assert str(info.value) == f"{path}: the split file lists no images, so it names no classes"


def test_missing_labels_are_shown_ten_at_most(tmp_path):
    path = _write(tmp_path, {"train": [["a.jpg", 12, "last"]]})
    with pytest.raises(ClassListError) as info:
        read_classes(path)
    assert str(info.value) == (
        f"{path}: labels [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] have no entries, so their class names are unknown"
    )


def test_a_missing_split_file_is_named(tmp_path):
    path = tmp_path / "split_zhou_Nothing.json"
    with pytest.raises(ClassListError) as info:
        read_split_file(path)
    assert str(info.value) == f"{path}: no such file"


# -- the errors of read_classes and builtin_classes -------------------------------------------------------


def test_an_unknown_spec_lists_the_builtin_names_and_the_file_kinds(tmp_path):
    spec = tmp_path / "nope.txt"
    with pytest.raises(ClassListError) as info:
        read_classes(spec)
    assert str(info.value) == (
        f"{spec}: no such file, and not a built-in class list ({BUILTIN_LISTED}); "
        "expected a .txt (one name per line), a .json list or a CoOp split_zhou_*.json"
    )


def test_builtin_classes_refuses_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ClassListError) as info:
        builtin_classes("dtd2")
    assert str(info.value) == f"dtd2: not a built-in class list; built-in: {BUILTIN_LISTED}"
    assert builtin_classes("DTD")[:3] == ["banded", "blotchy", "braided"]


@pytest.mark.parametrize("name, content", [("bad.json", b'["caf\xe9"]'), ("bad.txt", b"caf\xe9\n")])
def test_undecodable_files_are_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)  # latin-1 bytes, not UTF-8
    with pytest.raises(ClassListError) as info:
        read_classes(path)
    assert str(info.value).startswith(f"{path}: cannot be read (")
    assert "codec can't decode" in str(info.value)


@pytest.fixture
def latin1_locale(monkeypatch):
    """A machine whose default text encoding is not UTF-8 (Windows' cp1252, a latin-1 locale):
    a read that names no encoding gets latin-1."""
    real = Path.read_text

    def read_text(self, encoding=None, errors=None):
        return real(self, encoding=encoding or "latin-1", errors=errors)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_class_files_are_utf8_whatever_the_locale(tmp_path, latin1_locale):
    (tmp_path / "c.txt").write_bytes("café\nnaïve_thing\n".encode("utf-8"))
    (tmp_path / "c.json").write_bytes(json.dumps(["café", "Señor"], ensure_ascii=False).encode("utf-8"))
    assert read_classes(tmp_path / "c.txt") == ["café", "naïve_thing"]
    assert read_classes(tmp_path / "c.json") == ["café", "Señor"]


def test_shipped_lists_are_ascii():
    """So reading them is the same under any locale encoding (the encoding argument cannot matter)."""
    for file_name in BUILTIN_FILES.values():
        data = resources.files("protext").joinpath("data", "classnames", file_name).read_bytes()
        assert data.isascii(), file_name
