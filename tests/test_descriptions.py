"""The JSONL description cache: reading (repeats are samples), crash-safe appending, torn-tail repair,
CuPL import, name matching."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from protext.descriptions import cache as dmod
from protext.descriptions import (
    ClassMatch,
    Description,
    DescriptionFileError,
    append_descriptions,
    import_cupl,
    match_classnames,
    normalize_classname,
    read_descriptions,
    repair_torn_tail,
)



def unit(name: str, *texts: str, prompt: str = "q", model: str = "m") -> list[Description]:
    return [Description(name, t, prompt, model) for t in texts]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- reading and appending --------------------------------------------------------------------------


def test_append_then_read_keeps_order_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    append_descriptions(path, unit("dog", "A dog has fur.", "A dog barks.", "A dog has fur."))
    append_descriptions(path, unit("cat", "A cat purrs."))
    append_descriptions(path, unit("dog", "A dog wags its tail.", "A dog barks.", prompt="q2"))
    # Repeats are samples (ALGORITHMS.md section 3): within a unit and across units of a class.
    assert read_descriptions(path) == {
        "dog": ["A dog has fur.", "A dog barks.", "A dog has fur.", "A dog wags its tail.", "A dog barks."],
        "cat": ["A cat purrs."],
    }
    rows = lines_of(path)
    assert [(r["part"], r["parts"]) for r in rows] == [(1, 3), (2, 3), (3, 3), (1, 1), (1, 2), (2, 2)]
    assert rows[0] == {"classname": "dog", "description": "A dog has fur.", "prompt": "q", "model": "m", "part": 1, "parts": 3}


def test_extra_fields_and_unstamped_lines_are_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"classname": "dog", "description": "A dog.", "score": 0.5}\n'
        "\n"
        '{"classname": "dog", "description": "A puppy.", "prompt": "p", "model": "x", "extra": [1]}\n',
        encoding="utf-8",
    )
    assert read_descriptions(path) == {"dog": ["A dog.", "A puppy."]}


def test_each_unit_is_one_write_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.jsonl"
    calls: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(dmod.os, "write", counting_write)
    append_descriptions(path, unit("dog", *(f"A dog with trait {i}." for i in range(50))))
    assert len(calls) == 1 and calls[0] == path.stat().st_size
    append_descriptions(path, [])  # nothing to write: no call, no change
    assert len(calls) == 1


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_descriptions(empty) == {}
    assert repair_torn_tail(empty) is False
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_descriptions(missing)
    assert repair_torn_tail(missing) is False and not missing.exists()


def test_append_rejects_empty_text(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with pytest.raises(ValueError, match="empty classname or description"):
        append_descriptions(path, unit("dog", "A dog.", "   "))
    assert not path.exists() or path.read_bytes() == b""


# -- crash damage at the tail ------------------------------------------------------------------------


def test_every_cut_of_an_interrupted_append_reads_and_repairs_to_the_intact_prefix(tmp_path: Path) -> None:
    """Whatever byte a kill stops the last write at, readers see only whole units and repair restores them."""
    good = tmp_path / "good.jsonl"
    append_descriptions(good, unit("dog", "A dog has fur.", "Ein Hund \u00e4hnelt einem Wolf."))
    append_descriptions(good, unit("cat", "A cat purrs."))
    prefix = good.read_bytes()
    last_unit = dmod.encode_unit(unit("owl", "An owl has big eyes.", "An owl hoots \u2014 at night.", prompt="p"))
    expected = {"dog": ["A dog has fur.", "Ein Hund \u00e4hnelt einem Wolf."], "cat": ["A cat purrs."]}
    path = tmp_path / "cut.jsonl"
    # Every cut short of the final newline loses at least one byte of the unit's text.
    for cut in range(1, len(last_unit) - 1):
        damaged = prefix + last_unit[:cut]
        path.write_bytes(damaged)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert read_descriptions(path) == expected, f"cut at byte {cut}"
        assert path.read_bytes() == damaged, "reading must never modify the file"
        assert len(caught) == 1 and str(path) in str(caught[0].message)
        with pytest.warns(UserWarning, match="cutting off"):
            assert repair_torn_tail(path) is True
        assert path.read_bytes() == prefix, f"cut at byte {cut}"
        assert repair_torn_tail(path) is False
    # Only the newline missing: the unit is whole, so it is kept and the newline restored.
    path.write_bytes(prefix + last_unit[:-1])
    assert read_descriptions(path)["owl"] == ["An owl has big eyes.", "An owl hoots \u2014 at night."]
    assert repair_torn_tail(path) is True and path.read_bytes() == prefix + last_unit


def test_torn_last_line_is_reported_with_file_name(tmp_path: Path) -> None:
    path = tmp_path / "torn.jsonl"
    append_descriptions(path, unit("dog", "A dog has fur."))
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"classname": "cat", "descr')
    with pytest.warns(UserWarning, match=r"torn\.jsonl: ignoring torn last line 2"):
        assert read_descriptions(path) == {"dog": ["A dog has fur."]}
    with pytest.warns(UserWarning, match=r"torn\.jsonl: cutting off torn last line 2"):
        assert repair_torn_tail(path)
    assert path.read_bytes() == intact


def test_complete_last_line_without_newline_is_kept_and_terminated(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"classname": "dog", "description": "A dog."}')
    assert read_descriptions(path) == {"dog": ["A dog."]}
    append_descriptions(path, unit("cat", "A cat."))  # must not glue onto the unterminated line
    assert read_descriptions(path) == {"dog": ["A dog."], "cat": ["A cat."]}
    path.write_bytes(b'{"classname": "dog", "description": "A dog."}')
    assert repair_torn_tail(path) is True
    assert path.read_bytes().endswith(b'"A dog."}\n')


# -- damage anywhere else is an error, and the file stays as it is -------------------------------------


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (b'{"classname": "cat", "description": "A cat.", }', "malformed JSON"),
        (b'{"classname": "cat"}', "missing key 'description'"),
        (b'{"description": "A cat."}', "missing key 'classname'"),
        (b'["cat", "A cat."]', "expected a JSON object"),
        (b'{"classname": "cat", "description": ""}', "'description' must be a non-empty string"),
        (b'{"classname": "cat", "description": "x", "part": 3, "parts": 2}', "bad unit stamp"),
        (b'\xff\xfe{"classname": "cat"}', "not UTF-8"),
    ],
)
def test_bad_line_is_an_error_naming_file_and_line(tmp_path: Path, bad_line: bytes, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    append_descriptions(path, unit("dog", "A dog."))
    data = path.read_bytes() + bad_line + b"\n" + b'{"classname": "owl", "description": "An owl."}\n'
    path.write_bytes(data)
    for call in (read_descriptions, repair_torn_tail, dmod.read_records):
        with pytest.raises(DescriptionFileError) as info:
            call(path)
        assert info.value.line == 2 and info.value.path == path
        assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value)
        assert path.read_bytes() == data  # untouched, byte for byte


def test_malformed_last_line_with_newline_is_not_a_torn_line(tmp_path: Path) -> None:
    # A crash cannot leave a newline after a partial line, so this is damage, not a torn write.
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"classname": "dog", "description": "A dog."}\n{"classname": "cat", "desc\n')
    with pytest.raises(DescriptionFileError, match=r"bad\.jsonl:2: malformed JSON"):
        read_descriptions(path)


def test_incomplete_unit_before_the_end_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    first = dmod.encode_unit(unit("dog", "A dog.", "A puppy.", "A hound."))
    lines = first.splitlines(keepends=True)
    data = lines[0] + lines[1] + dmod.encode_unit(unit("cat", "A cat."))
    path.write_bytes(data)
    with pytest.raises(DescriptionFileError, match=r"d\.jsonl:3: the unit ending on line 2 has only part 2 of 3"):
        read_descriptions(path)
    assert path.read_bytes() == data


# -- class names -------------------------------------------------------------------------------------


def test_normalize_classname() -> None:
    assert normalize_classname("  Car_Side ") == "car side"
    assert normalize_classname("outdoor   apartment_building") == "outdoor apartment building"
    assert normalize_classname("Hand\tStand__Pushups") == "hand stand pushups"
    assert normalize_classname("pink-yellow dahlia") == "pink-yellow dahlia"


def test_match_classnames_basic_rules() -> None:
    match = match_classnames(["Car_Side", "face", "Face", "leopard"], ["car side", "Face", "dog", "car side"])
    assert match == ClassMatch(mapping={"car side": "Car_Side", "Face": "Face"}, missing=["dog"], unused=["face", "leopard"])


def test_match_classnames_reports_real_cars_mismatch(shared_dir: Path) -> None:
    cupl = json.loads((shared_dir / "cupl/original-keys/cars_prompts_full.json").read_text())
    cars = json.loads((shared_dir / "classnames/cars.json").read_text())
    match = match_classnames(cupl, cars)
    assert match.mapping == {}
    assert len(match.missing) == 196 and match.missing == cars
    assert len(match.unused) == 196 and "Dodge Dakota Crew Cab 2010" in match.unused
    assert "2010 Dodge Dakota Crew Cab" in match.missing
    # The re-keyed release matches completely.
    rekeyed = json.loads((shared_dir / "cupl/cars_prompts_full.json").read_text())
    full = match_classnames(rekeyed, cars)
    assert full.missing == [] and full.unused == [] and len(full.mapping) == 196


def test_match_classnames_reports_real_flowers_mismatch(shared_dir: Path) -> None:
    cupl = json.loads((shared_dir / "cupl/original-keys/flower_prompts_full.json").read_text())
    flowers = json.loads((shared_dir / "classnames/flower102.json").read_text())
    match = match_classnames(cupl, flowers)
    assert len(match.mapping) == 99
    assert sorted(match.missing) == ["ball moss", "globe-flower", "pink-yellow dahlia"]
    assert sorted(match.unused) == ["air plant", "globe flower", "pink and yellow dahlia"]


# -- CuPL import -------------------------------------------------------------------------------------


def test_import_texture_file(tmp_path: Path, shared_dir: Path) -> None:
    src = shared_dir / "cupl/texture_prompts_full.json"
    raw = json.loads(src.read_text())
    every = {k: [d.strip() for d in v] for k, v in raw.items()}  # the file has no blank descriptions
    out = tmp_path / "llm_data" / "dtd_cupl.jsonl"
    count = import_cupl(src, out)
    assert count == sum(len(v) for v in raw.values()) == 2820  # as the published loader: 11 steps of 256
    got = read_descriptions(out)
    assert len(got) == 47 and got == every
    rows = lines_of(out)
    assert len(rows) == count
    assert {r["model"] for r in rows} == {"cupl"} and {r["prompt"] for r in rows} == {""}
    assert len({(r["classname"], r["description"]) for r in rows}) == 2745 == count - 75  # 75 repeats kept
    assert dmod.read_cache(out).repeats == 75
    assert [p.name for p in out.parent.iterdir()] == ["dtd_cupl.jsonl"]  # no temporary left behind


def test_import_refuses_to_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "small.json"
    src.write_text(json.dumps({"dog": ["A dog.", " A dog. ", ""], "cat": ["A cat."]}))
    out = tmp_path / "d.jsonl"
    assert import_cupl(src, out, model="gpt-3") == 3  # "A dog." twice (a repeat once stripped); the blank one skipped
    assert read_descriptions(out) == {"dog": ["A dog.", "A dog."], "cat": ["A cat."]}
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="d.jsonl"):
        import_cupl(src, out)
    assert out.read_bytes() == before
    src.write_text(json.dumps({"owl": ["An owl."]}))
    assert import_cupl(src, out, overwrite=True) == 1
    assert read_descriptions(out) == {"owl": ["An owl."]}


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"dog": ["A dog."],\n "cat": ["A cat."', r"bad\.json:2: malformed JSON"),
        ('["A dog."]', r"bad\.json: expected a CuPL file.*got a JSON list"),
        ('{"dog": "A dog."}', r"class 'dog' does not hold a list of strings"),
        ('{"dog": ["A dog.", 3]}', r"class 'dog' does not hold a list of strings"),
    ],
)
def test_import_rejects_bad_input_and_writes_nothing(tmp_path: Path, text: str, match: str) -> None:
    src = tmp_path / "bad.json"
    src.write_text(text)
    out = tmp_path / "out" / "d.jsonl"
    with pytest.raises(DescriptionFileError, match=match):
        import_cupl(src, out)
    assert not out.exists()


# -- repeats are samples; only a resumed generation's rewrite is a duplicate (issue 11, item 1) --------


def test_a_unit_written_again_by_a_resumed_generation_reads_once(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    first = unit("dog", "A dog has fur.", "A dog has fur.", "A dog barks.", prompt="What does a dog look like?")
    append_descriptions(path, first)
    append_descriptions(path, unit("cat", "A cat purrs.", prompt="What does a cat look like?"))
    # The same unit again (same class, query and model), with other samples, as a resumed run that
    # did not see it would write: recognised by its unit record, whatever its text.
    append_descriptions(path, unit("dog", "A dog is a mammal.", "A dog has fur.", prompt="What does a dog look like?"))
    # Another query of the same class repeating a text: a new unit, so every line is a sample.
    append_descriptions(path, unit("dog", "A dog barks.", prompt="Describe a dog."))
    contents = dmod.read_cache(path)
    assert contents.descriptions == {"dog": ["A dog has fur.", "A dog has fur.", "A dog barks.", "A dog barks."],
                                     "cat": ["A cat purrs."]}
    assert (contents.rewritten_units, contents.rewritten_lines, contents.repeats, contents.samples) == (1, 2, 2, 5)
    assert len(dmod.read_records(path)) == 7  # the raw view keeps every line


def test_unit_identity_ignores_spelling_of_class_and_query_but_not_model(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    append_descriptions(path, unit("Beagle", "A beagle is small.", prompt="What does a Beagle look like?"))
    append_descriptions(path, unit("beagle", "A beagle has long ears.", prompt="What does a  beagle look like?"))
    append_descriptions(path, unit("beagle", "A beagle is a hound.", prompt="What does a beagle look like?", model="other"))
    # One class (first spelling kept); the second unit is the first one rewritten, the third another model's.
    assert read_descriptions(path) == {"Beagle": ["A beagle is small.", "A beagle is a hound."]}


def test_unstamped_lines_are_each_a_sample(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    line = '{"classname": "dog", "description": "A dog."}\n'
    path.write_text(line * 3 + line.replace('"dog"', '"Dog"'), encoding="utf-8")
    assert read_descriptions(path) == {"dog": ["A dog."] * 4}
    assert dmod.read_cache(path).repeats == 3


@pytest.mark.parametrize(
    "name, samples, repeats",
    [("texture_prompts_full.json", 2820, 75), ("imagenet_prompts_base.json", 29940, 1740),
     ("cars_prompts_full.json", 17640, 894), ("eurosat_prompts_full.json", 250, 0)],
)
def test_import_keeps_every_cupl_description(tmp_path: Path, shared_dir: Path, name: str, samples: int, repeats: int) -> None:
    src = shared_dir / "cupl" / name
    out = tmp_path / "d.jsonl"
    summary = dmod_import(src, out)
    assert (summary.descriptions, summary.repeats) == (samples, repeats)
    contents = dmod.read_cache(out)
    assert (contents.samples, contents.repeats, contents.rewritten_units) == (samples, repeats, 0)
    raw = json.loads(src.read_text())
    assert contents.descriptions == {k: [d.strip() for d in v] for k, v in raw.items()}


def dmod_import(src: Path, out: Path):
    from protext.descriptions import import_descriptions, load_cupl_json

    return import_descriptions(load_cupl_json(src), out)


# -- one lock discipline for every writer (issue 9, item 6) ----------------------------------------------


def test_import_overwrite_respects_a_running_generation_lock(tmp_path: Path) -> None:
    from protext.descriptions import DescriptionLockError, writer_lock

    src = tmp_path / "small.json"
    src.write_text(json.dumps({"owl": ["An owl."]}))
    out = tmp_path / "d.jsonl"
    append_descriptions(out, unit("dog", "A dog."))
    before = out.read_bytes()
    with writer_lock(out):  # what a running generation holds
        with pytest.raises(DescriptionLockError, match=rf"{out}.* is being written by another gen_descriptions run"):
            import_cupl(src, out, overwrite=True)
        assert out.read_bytes() == before
        with pytest.raises(DescriptionLockError, match="d.jsonl"):
            import_cupl(src, out)  # without --overwrite too: the lock is checked first
    assert import_cupl(src, out, overwrite=True) == 1  # once the generation is gone


def test_writer_lock_follows_a_replaced_file_and_leaves_no_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from protext.descriptions import DescriptionLockError, writer_lock

    out = tmp_path / "new.jsonl"
    with writer_lock(out):
        assert out.exists() and out.read_bytes() == b""
    assert not out.exists()  # created by the lock, still empty: removed
    out.write_bytes(b"")
    with writer_lock(out):
        pass
    assert out.exists()  # not ours to remove

    # An import renames its file over the path between our open and our lock: the lock must end
    # up on the file now at the path, not on the replaced one.
    real_open = dmod._open_for_lock
    calls = []

    def open_then_replace(path: Path):
        opened = real_open(path)
        if not calls:
            replacement = tmp_path / "replacement"
            replacement.write_bytes(b'{"classname": "owl", "description": "An owl."}\n')
            os.replace(replacement, path)
        calls.append(path)
        return opened

    monkeypatch.setattr(dmod, "_open_for_lock", open_then_replace)
    with writer_lock(out):
        assert len(calls) == 2
        monkeypatch.setattr(dmod, "_open_for_lock", real_open)
        with pytest.raises(DescriptionLockError):
            with writer_lock(out):
                pass
    assert read_descriptions(out) == {"owl": ["An owl."]}
