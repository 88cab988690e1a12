"""CuPL's own release folder: its file names, its original keys, and the documented key map."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest

from conftest import REPO, SHARED
from protext.descriptions import DescriptionFileMissing, ReleaseKeyError, read_descriptions, read_release, release_descriptions
from protext.descriptions.cupl import release_dataset
from protext.gen_descriptions import main

ORIGINAL = SHARED / "cupl" / "original-keys"
MAP = REPO / "protext" / "descriptions" / "cupl_key_map.json"
# dataset -> (release file, class list in ../shared/classnames)
RENAMED = {
    "stanford_cars": ("cars_prompts_full.json", "cars"),
    "sun397": ("sun_prompts_full.json", "sun397"),
    "caltech101": ("cal_prompts_full.json", "caltech101"),
    "oxford_flowers": ("flower_prompts_full.json", "flower102"),
    "ucf101": ("ucf_prompts_full.json", "ucf101"),
}


def norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def classes_of(listname: str) -> list[str]:
    return list(dict.fromkeys(json.loads((SHARED / "classnames" / f"{listname}.json").read_text())))


def quiet_release(folder: Path, dataset: str) -> dict[str, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return release_descriptions(folder, dataset)


def test_original_keys_do_not_match_the_class_names() -> None:
    """The premise: 196 cars keys and 126 of 397 SUN keys match no class name, even normalised."""
    for file, listname, mismatched, total in (("cars_prompts_full.json", "cars", 196, 196),
                                              ("sun_prompts_full.json", "sun397", 126, 397)):
        keys = json.loads((ORIGINAL / file).read_text())
        names = {norm(n) for n in classes_of(listname)}
        assert len(keys) == total and sum(norm(k) not in names for k in keys) == mismatched


@pytest.mark.parametrize("dataset", sorted(RENAMED))
def test_release_with_original_keys_gives_the_class_names_and_their_descriptions(dataset: str) -> None:
    file, listname = RENAMED[dataset]
    got = quiet_release(ORIGINAL, dataset)
    assert list(got) == classes_of(listname)  # every class, label order, the dataset's spelling
    # Independent reference: the ProText authors' hand re-keyed copy of the same file.
    rekeyed = {norm(k): [t.strip() for t in v] for k, v in json.loads((SHARED / "cupl" / file).read_text()).items()}
    differ = [c for c in got if got[c] != rekeyed[norm(c)]]
    if dataset == "stanford_cars":  # the re-keyed copy fixed one typo ("a2012") in one description
        assert differ == ["2012 Aston Martin Virage Convertible"]
        assert sum(a != b for a, b in zip(got[differ[0]], rekeyed[norm(differ[0])])) == 1
    else:
        assert differ == []
    # Repeats are kept: every description of the original file is there.
    original = json.loads((ORIGINAL / file).read_text())
    extras = {"caltech101": 2}.get(dataset, 0)  # 'background' and 'off-center face' are no classes
    assert sum(map(len, got.values())) == sum(map(len, original.values())) - 30 * extras


def test_all_cars_keys_and_126_sun_keys_are_renamed() -> None:
    cars = read_release(ORIGINAL, "cars")
    assert len(cars.renamed) == 196 and cars.missing == [] and cars.unmatched_keys == []
    assert cars.renamed["Dodge Dakota Crew Cab 2010"] == "2010 Dodge Dakota Crew Cab"
    sun = read_release(ORIGINAL, "sun397")
    assert len(sun.renamed) == 126 and sun.missing == [] and sun.unmatched_keys == []
    assert sun.renamed["apse (indoor)"] == "indoor apse"
    flowers = read_release(ORIGINAL, "flower102")
    assert flowers.renamed == {"globe flower": "globe-flower", "pink and yellow dahlia": "pink-yellow dahlia",
                               "air plant": "ball moss"}
    # The re-keyed copies need no renaming and give the same classes.
    assert read_release(SHARED / "cupl", "cars").renamed == {}
    assert list(quiet_release(SHARED / "cupl", "sun397")) == list(quiet_release(ORIGINAL, "sun397"))


def test_keys_that_name_no_class_are_reported_not_dropped_silently() -> None:
    with pytest.warns(UserWarning, match=r"left out 2 keys that are not classes of caltech101: \['background', 'off-center face'\]"):
        got = release_descriptions(ORIGINAL, "caltech101")
    assert len(got) == 100


def test_unknown_and_missing_keys_are_errors_naming_the_file(tmp_path: Path) -> None:
    data = json.loads((ORIGINAL / "cars_prompts_full.json").read_text())
    data["Dodge Dakota Crew Cab 2010 (typo)"] = data.pop("Dodge Dakota Crew Cab 2010")
    (tmp_path / "cars_prompts_full.json").write_text(json.dumps(data))
    with pytest.raises(ReleaseKeyError) as info:
        release_descriptions(tmp_path, "stanford_cars")
    message = str(info.value)
    assert str(tmp_path / "cars_prompts_full.json") in message and "no descriptions for 1 of 196 classes" in message
    assert "'2010 Dodge Dakota Crew Cab'" in message and "'Dodge Dakota Crew Cab 2010 (typo)'" in message

    data["Dodge Dakota Crew Cab 2010"] = data.pop("Dodge Dakota Crew Cab 2010 (typo)")
    data["A zebra"] = ["A zebra has stripes."]
    (tmp_path / "cars_prompts_full.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"left out 1 keys that match no class: \['A zebra'\]"):
        assert len(release_descriptions(tmp_path, "cars")) == 196

    with pytest.raises(DescriptionFileMissing, match=r"no sun_prompts_full.json \(CuPL's release file for sun397\)"):
        release_descriptions(tmp_path, "sun397")
    with pytest.raises(ReleaseKeyError, match="no CuPL release file is known for dataset 'mnist'; known: imagenet"):
        release_descriptions(tmp_path, "mnist")


def test_dataset_aliases() -> None:
    assert [release_dataset(n) for n in ("dtd", "texture", "cars", "Stanford_Cars", "flower102", "aircraft", "cal")] == [
        "dtd", "dtd", "stanford_cars", "stanford_cars", "oxford_flowers", "fgvc_aircraft", "caltech101"]


def test_every_release_file_in_the_shared_folder_reads_completely() -> None:
    import protext.descriptions.cupl as cupl

    for dataset in cupl.release_datasets():
        reading = read_release(SHARED / "cupl", dataset)
        assert reading.missing == [], dataset
        assert reading.unmatched_keys == [], dataset


def test_key_map_is_derived_from_the_real_files_and_holds_no_description(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("derive_cupl_key_map", REPO / "tools" / "derive_cupl_key_map.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--shared", str(SHARED), "--out", str(MAP), "--check"]) == 0
    strings: set[str] = set()

    def collect(obj: object) -> None:
        if isinstance(obj, str):
            strings.add(obj.strip())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                collect(k)
                collect(v)
        elif isinstance(obj, list):
            for v in obj:
                collect(v)

    collect(json.loads(MAP.read_text()))
    for path in list((SHARED / "cupl").glob("*.json")) + list(ORIGINAL.glob("*.json")):
        texts = {t.strip() for v in json.loads(path.read_text()).values() for t in v}
        assert not strings & texts, path.name


def test_import_reads_a_release_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    release = tmp_path / "cupl-release"
    release.mkdir()
    shutil.copy(ORIGINAL / "sun_prompts_full.json", release / "sun_prompts_full.json")
    out = tmp_path / "sun.jsonl"
    assert main(["import", str(release), "--dataset", "sun397", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imported 11910 descriptions of 397 classes" in printed and "(451 repeats, kept as samples)" in printed
    got = read_descriptions(out)
    assert list(got) == classes_of("sun397") and got == quiet_release(ORIGINAL, "sun397")
    # Without --dataset a folder is refused, naming the way out.
    assert main(["import", str(release), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "pass --dataset NAME" in capsys.readouterr().err
    # A single original-keys file with --dataset is renamed too.
    cars = tmp_path / "cars.jsonl"
    assert main(["import", str(ORIGINAL / "cars_prompts_full.json"), "--dataset", "cars", "--out", str(cars),
                 "--classes", str(SHARED / "classnames" / "cars.json")]) == 0
    assert list(read_descriptions(cars)) == classes_of("cars")
