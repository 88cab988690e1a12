"""Mutation-testing survivors of :mod:`protext.protocols` (issue 16), each killed by a test written here.

The published numbers are behaviour: a number typed under the wrong column is a wrong table. The
numbers of the TTA2.md tables are checked here cell by cell, each one read from its method's section
of TTA2.md at the dataset the section prints it under (the older test only finds each number
somewhere in the section, so two numbers swapped between columns passed it). The types and helpers
of :mod:`protext.protocols.base` are checked against values written out by hand.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

import protext.protocols as protocols
from protext.errors import UserError
from protext.protocols import PROTOCOLS, Average, Protocol, Row, RunSpec, TTASpec, get_protocol, table_names
from protext.protocols import base

# --------------------------------------------------------------------------------------------------
# TTA2.md §6-§10: every published cell at the dataset its section prints it under

#: the names TTA2.md prints for the datasets and averages, written out by hand
_DOC_NAMES = {
    "IN": "imagenet", "ImageNet-A": "imagenet_a", "A": "imagenet_a", "V2": "imagenet_v2", "R": "imagenet_r",
    "K": "imagenet_sketch", "Flower": "oxford_flowers", "Flowers": "oxford_flowers", "DTD": "dtd", "Pets": "oxford_pets",
    "Cars": "stanford_cars", "UCF": "ucf101", "Caltech": "caltech101", "Cal": "caltech101", "Food": "food101",
    "SUN": "sun397", "Aircraft": "fgvc_aircraft", "Air": "fgvc_aircraft", "EuroSAT": "eurosat", "ESAT": "eurosat",
}
_PAIR = re.compile(r"(?<![\w-])(ImageNet-A|Office-Home|mean\(11\)|OOD avg\(4\)|OOD avg|cross-domain avg|avg|IN|A|V2|R|K|"
                   r"Flowers|Flower|DTD|Pets|Cars|UCF|Caltech|Food|SUN|Aircraft|EuroSAT)\s+(\d+\.\d+)")


def _pairs(text: str) -> dict[str, float]:
    """``{doc name: number}`` of every "Name 12.34" in ``text`` (bold marks dropped)."""
    return {name: float(value) for name, value in _PAIR.findall(text.replace("*", ""))}


def _between(text: str, start: str, stop: str) -> str:
    return text.split(start, 1)[1].split(stop, 1)[0]


@pytest.fixture(scope="module")
def tta2_sections(shared_dir) -> dict[str, str]:
    text = (shared_dir / "design" / "TTA2.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"\n## (\d+)\. (.*?)(?=\n## \d+\. |\Z)", text, re.S)}


def _md_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def _otpt_tables(section: str) -> list[dict[str, tuple[float, float]]]:
    """O-TPT's two "acc / ECE" tables of §9: ``{doc name: (acc, ece)}`` each, the average as ``avg``."""
    rows, out, head = _md_rows(section), [], None
    for cells in rows:
        if cells[0] == "" and len(cells) > 2:
            head = cells
        elif cells[0].replace("*", "") == "O-TPT":
            values = [tuple(float(x) for x in c.replace("*", "").split("/")) for c in cells[1:]]
            out.append(dict(zip(head[1:], values)))
    return out


def _cells(pairs: dict[str, float], row: str, columns, averages: dict[str, str], measure: str = "top1"):
    """The published cells and averages of ``row`` from the doc's pairs, in the protocol's keys."""
    cells, avgs = {}, {}
    for name, value in pairs.items():
        if name in averages:
            avgs[(row, averages[name], measure)] = value
        elif _DOC_NAMES.get(name) in columns:
            cells[(row, _DOC_NAMES[name], measure)] = value
    return cells, avgs


def test_tta2_numbers_sit_at_the_dataset_their_section_prints_them_under(tta2_sections):
    xd, ood = get_protocol("tta2-xd"), get_protocol("tta2-ood")
    dmn, dpe, boost, otpt, tps = (tta2_sections[s] for s in ("6", "7", "8", "9", "10"))
    dmn_row, otpt_row = "DMN-ZS (beta2 on test labels, as published)", "O-TPT (acc / ECE)"
    want_xd, want_xd_avg, want_ood, want_ood_avg = {}, {}, {}, {}

    def add(target, target_avg, found):
        target.update(found[0])
        target_avg.update(found[1])

    # DMN-ZS: paper Table 3 (11 sets, mean over the 11) and the natural-shift numbers (OOD avg over 4)
    dmn_xd = _pairs(_between(dmn, '("DMN-ZS (Ours)", 11 sets):', "The same table"))
    assert len(dmn_xd) == 12
    add(want_xd, want_xd_avg, _cells(dmn_xd, dmn_row, xd.datasets, {"mean(11)": "avg (11)"}))
    dmn_ood = _pairs(_between(dmn, "Natural shift, ViT-B/16", "The log above"))
    assert len(dmn_ood) == 6
    add(want_ood, want_ood_avg, _cells(dmn_ood, dmn_row, ood.datasets, {"OOD avg": "avg (OOD 4)"}))
    # DPE: the OOD image (ImageNet too, in both tables) and the cross-domain image (avg over the 10)
    dpe_ood = _pairs(_between(dpe, "- OOD:", "\n- Cross-domain"))
    dpe_xd = _pairs(_between(dpe, "- Cross-domain:", "\n- ECE"))
    assert len(dpe_ood) == 6 and len(dpe_xd) == 11
    add(want_ood, want_ood_avg, _cells(dpe_ood, "DPE", ood.datasets, {"OOD avg(4)": "avg (OOD 4)"}))
    add(want_xd, want_xd_avg, _cells({**dpe_xd, "IN": dpe_ood["IN"]}, "DPE", xd.datasets, {"avg": "avg (10 XD)"}))
    # BoostAdapter: the third-party ImageNet-A and Aircraft cells, the survey's cross-domain average
    found = _pairs(_between(boost, "[3rd, wizwand listing of the paper]:", "The other per-set values"))
    assert found == {"ImageNet-A": 64.53, "Aircraft": 27.45, "Office-Home": 80.25, "cross-domain avg": 68.68}
    add(want_xd, want_xd_avg, _cells(found, "BoostAdapter", xd.datasets, {"cross-domain avg": "avg (10 XD)"}))
    add(want_ood, want_ood_avg, _cells({"A": found["ImageNet-A"]}, "BoostAdapter", ood.datasets, {}))
    # O-TPT: its README's two acc / ECE tables; the fine-grained one's average includes ImageNet
    fine, shifts = _otpt_tables(otpt)
    assert len(fine) == 12 and len(shifts) == 5
    for i, measure in enumerate(("top1", "ece")):
        add(want_xd, want_xd_avg, _cells({k: v[i] for k, v in fine.items()}, otpt_row, xd.datasets, {"avg": "avg (11)"}, measure))
        add(want_ood, want_ood_avg, _cells({k: v[i] for k, v in shifts.items()}, otpt_row, ood.datasets,
                                           {"avg": "avg (OOD 4)"}, measure))
    # TPS: the natural-shift numbers only (its cross-dataset cells are not found)
    tps_ood = _pairs(_between(tps, "**Published numbers, ViT-B/16**", "Cross-dataset per-set"))
    assert len(tps_ood) == 6
    add(want_ood, want_ood_avg, _cells(tps_ood, "TPS", ood.datasets, {"OOD avg": "avg (OOD 4)"}))

    assert dict(xd.published) == want_xd
    assert dict(xd.published_averages) == want_xd_avg
    assert dict(ood.published) == want_ood
    assert dict(ood.published_averages) == want_ood_avg


# --------------------------------------------------------------------------------------------------
# base: the number helpers run at import (their mutants are only reached by calling them) and the types


def test_row_numbers_key_each_number_by_row_dataset_and_measure():
    assert base.row_numbers("R", ("a", "b"), (1.5, 2.5)) == {("R", "a", "top1"): 1.5, ("R", "b", "top1"): 2.5}
    assert base.row_numbers("R", ("a",), (3.0,), "ece") == {("R", "a", "ece"): 3.0}
    for values in ((1.0,), (1.0, 2.0, 3.0)):
        with pytest.raises(ValueError) as err:
            base.row_numbers("R", ("a", "b"), values)
        assert str(err.value) == f"R: {len(values)} numbers for 2 datasets"


def test_b2n_sparse_and_by_row_numbers():
    assert base.b2n_numbers("R", {"a": (1.0, 2.0, 3.0), "b": (4.0, 5.0, 6.0)}) == {
        ("R", "a", "base"): 1.0, ("R", "a", "novel"): 2.0, ("R", "a", "hm"): 3.0,
        ("R", "b", "base"): 4.0, ("R", "b", "novel"): 5.0, ("R", "b", "hm"): 6.0}
    order = ("a", "b", "c", "d")
    assert base.sparse_numbers({"R": (None, 2.0, None, 4.0), "S": (1.0, None, None, None)}, order) == {
        ("R", "b", "top1"): 2.0, ("R", "d", "top1"): 4.0, ("S", "a", "top1"): 1.0}
    assert base.sparse_numbers({"R": (None, 0.5, None, None)}, order, "ece") == {("R", "b", "ece"): 0.5}
    assert base.numbers_by_row({"R": (1.0, 2.0), "S": (3.0, 4.0)}, ("a", "b")) == {
        ("R", "a", "top1"): 1.0, ("R", "b", "top1"): 2.0, ("S", "a", "top1"): 3.0, ("S", "b", "top1"): 4.0}
    with pytest.raises(ValueError):
        base.numbers_by_row({"R": (1.0,)}, ("a", "b"))


def test_a_runspec_replays_orders_or_a_scenario_never_both_nor_neither():
    assert RunSpec(stream_runs=3).scenario is None and RunSpec(scenario="low", tasks=4).tasks == 4
    for kw in ({}, {"stream_runs": 3, "scenario": "low"}):
        with pytest.raises(ValueError) as err:
            RunSpec(**kw)
        assert str(err.value) == "a RunSpec replays either stream_runs orders or a scenario"
    with pytest.raises(ValueError) as err:
        RunSpec(stream_runs=3, tasks=2)
    assert str(err.value) == "tasks count a scenario's tasks or streams"


def test_ttaspec_as_dict_and_per_dataset_settings_by_hand():
    assert TTASpec().as_dict() == {"method": "tpt", "views": 64, "selection": 0.1, "steps": 1, "lr": 5e-3,
                                   "init": "handcrafted", "augmix": None, "augmix_by_dataset": {}, "seed": None}
    spec = TTASpec("ctpt", augmix=True, augmix_by_dataset=(("imagenet", False), ("imagenet_a", True)), seed=1,
                   options=(("tda_alpha", 2.0),))
    as_dict = spec.as_dict()
    assert as_dict["augmix_by_dataset"] == {"imagenet": False, "imagenet_a": True}
    assert as_dict["options"] == {"tda_alpha": 2.0} and as_dict["seed"] == 1 and as_dict["augmix"] is True
    assert spec.augmix_for("imagenet") is False and spec.augmix_for("dtd") is True
    assert TTASpec(augmix=None).augmix_for("dtd") is None
    assert spec.for_dataset("imagenet") == {"method": "ctpt", "views": 64, "selection": 0.1, "steps": 1, "lr": 5e-3,
                                            "init": "handcrafted", "augmix": False, "seed": 1,
                                            "options": {"tda_alpha": 2.0}}
    plain = TTASpec("tda", views=None).for_dataset("dtd")
    assert "seed" not in plain and "options" not in plain and "augmix_by_dataset" not in plain
    assert plain["views"] is None and plain["augmix"] is None


def test_row_features_and_presets_per_cell():
    row = Row("R", "cupl", "coop", preset="text_only/{dataset}", novel_features="clip",
              features_by_dataset=(("dtd", "ensemble"),))
    assert row.features_for("eurosat", "base") == "cupl" and row.features_for("eurosat", "all") == "cupl"
    assert row.features_for("eurosat", "novel") == "clip" and row.features_for("dtd", "novel") == "clip"
    assert row.features_for("dtd", "base") == "ensemble"
    assert row.preset_for("dtd") == "text_only/dtd" and Row("S", "clip", "coop").preset_for("dtd") is None
    assert Row("T", "clip", "coop", features_by_dataset=(("dtd", "ensemble"),)).features_for("dtd", "novel") == "ensemble"


def _mini(**kw) -> Protocol:
    fields = dict(name="mini", title="t", datasets=("dtd", "eurosat"), splits=("all",),
                  rows=(Row("A", "clip", "coop"), Row("B", "clip", "tpt")), averages=(Average("avg", ("dtd", "eurosat")),))
    fields.update(kw)
    return Protocol(**fields)


def test_protocol_measures_rows_and_departures():
    assert _mini().measures() == ("top1",) and not _mini().base_to_novel
    assert _mini(report_ece=True).measures() == ("top1", "ece")
    assert _mini(report_runs=True, report_ece=True).measures() == ("top1", "eta", "spread")
    b2n = _mini(splits=("base", "novel"), report_runs=True, report_ece=True)
    assert b2n.base_to_novel and b2n.measures() == ("base", "novel", "hm")
    assert not _mini(splits=("novel", "base")).base_to_novel
    assert _mini().row("B").template_rule == "tpt"
    with pytest.raises(KeyError) as err:
        _mini().row("C")
    assert err.value.args[0] == "mini has no row 'C'"
    assert _mini(departures=("d",)).all_departures() == ["d", *base.COMMON_DEPARTURES]
    assert len(base.COMMON_DEPARTURES) == 1 and "fp32" in base.COMMON_DEPARTURES[0]


# --------------------------------------------------------------------------------------------------
# the package: its table list, its error, and the import-time consistency check


def test_table_names_in_the_order_of_published_md_then_tta2():
    assert table_names() == [
        "protext-text-only", "protext-base2novel", "protext-cross-dataset", "protext-dg", "tpt-ood", "tpt-xd",
        "protext-tpt", "tta-ood", "tta-xd", "tta2-xd", "tta2-ood", "oga-runs", "stata"]
    assert get_protocol("tpt-xd") is PROTOCOLS["tpt-xd"]


def test_an_unknown_table_is_a_user_error_naming_every_table():
    with pytest.raises(protocols.UnknownTableError) as err:
        get_protocol("nope")
    assert isinstance(err.value, UserError)
    assert str(err.value) == "unknown table 'nope'; the tables are: " + ", ".join(table_names())
    assert err.value.__cause__ is None and err.value.__suppress_context__


def _check(monkeypatch, *tables: Protocol) -> None:
    monkeypatch.setattr(protocols, "_PROTOCOLS", tables)
    monkeypatch.setattr(protocols, "PROTOCOLS", {p.name: p for p in tables})
    protocols._check_protocols()


@pytest.mark.parametrize("bad, message", [
    (dict(rows=(Row("A", "clip", "coop"), Row("A", "clip", "tpt"))), "('mini', 'two rows share a name')"),
    (dict(rows=(Row("A", "clip", "nope"),)), "('mini', 'A')"),  # not a template rule
    (dict(rows=(Row("A", "pixels", "coop"),)), "('mini', 'A')"),  # not class features
    (dict(rows=(Row("A", "clip", "coop", runs=RunSpec(stream_runs=2)),)), "('mini', 'A', 'runs outside a protocol table')"),
    (dict(published={("Z", "dtd", "top1"): 1.0}), "('mini', 'Z', 'dtd', 'top1')"),  # an unknown row
    (dict(published={("A", "imagenet", "top1"): 1.0}), "('mini', 'A', 'imagenet', 'top1')"),  # an unknown column
    (dict(published={("A", "dtd", "ece"): 1.0}), "('mini', 'A', 'dtd', 'ece')"),  # a measure not reported
    (dict(published_averages={("Z", "avg", "top1"): 1.0}), "('mini', 'Z', 'avg')"),
    (dict(published_averages={("A", "avg (9)", "top1"): 1.0}), "('mini', 'A', 'avg (9)')"),
    (dict(published_averages={("A", "avg", "hm"): 1.0}), "('mini', 'A', 'avg')"),
    (dict(pivot=(("Z", "A", "s", None),)), "('mini', 'pivot names an unknown row')"),  # the row, not the method
])
def test_the_import_time_check_refuses_an_inconsistent_table(monkeypatch, bad, message):
    _check(monkeypatch, _mini())  # the well-formed table passes
    _check(monkeypatch, _mini(report_runs=True, rows=(Row("A", "clip", "coop", runs=RunSpec(stream_runs=2)),),
                              published_averages={("A", "avg", "eta"): 1.0}, pivot=(("A", "method M", "s", 1.0),)))
    with pytest.raises(AssertionError) as err:
        _check(monkeypatch, _mini(**bad))
    assert str(err.value) == message


def test_the_import_time_check_refuses_two_tables_of_one_name(monkeypatch):
    with pytest.raises(AssertionError) as err:
        _check(monkeypatch, _mini(), replace(_mini(), title="other"))
    assert str(err.value) == "two tables share a name"


def test_a_stata_scenario_row_by_hand():
    from protext.protocols import protocol_tables

    spec = TTASpec("tda", views=1)
    batch = protocol_tables._scenario_row("TDA", spec, "medium_64")
    assert batch == Row("TDA (medium_64)", "clip", "coop", tta=spec, runs=RunSpec(scenario="medium_64", stream_seed=1),
                        note="TDA with OGA's settings in StatA's medium_64 scenario: one task at a time, a fresh adapter "
                             "per task")
    online = protocol_tables._scenario_row("DMN-ZS", spec, "online-low")
    assert online.name == "DMN-ZS (online-low)" and online.runs == RunSpec(scenario="online-low", stream_seed=1)
    assert online.note == ("DMN-ZS with OGA's settings in StatA's online-low scenario: a fresh adapter per stream, "
                           "state kept across its batches of 128")
    # the table's rows are these, for both methods and every scenario (TTA2.md §11.2)
    stata = get_protocol("stata")
    for method in ("TDA", "DMN-ZS"):
        for scenario in ("very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all"):
            assert stata.row(f"{method} ({scenario})").note.endswith("one task at a time, a fresh adapter per task")
        for scenario in ("online-low", "online-medium", "online-high", "online-separate"):
            assert stata.row(f"{method} ({scenario})").runs == RunSpec(scenario=scenario, stream_seed=1)
