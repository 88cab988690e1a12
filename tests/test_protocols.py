"""The published tables as data, checked against PUBLISHED.md and PRESETS.md parsed at test time.

Every number typed into :mod:`protext.protocols` must equal the design doc's; every cell's settings
(template, class split and count, n_ctx, TTA) must equal what the protocol text says. The expected
values come from parsing the docs and ``../shared/classnames`` here, not from protext's own tables.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from protext.protocols import PROTOCOLS, get_protocol, table_names
from protext.reproduction import ReproduceConfig, describe_plan, plan_cells

# the doc's short column names for the ImageNet variants
_COLUMN = {"A": "imagenet_a", "V2": "imagenet_v2", "R": "imagenet_r", "K": "imagenet_sketch"}
_NAMES_FILE = {
    "imagenet": "imagenet.json", "caltech101": "caltech101.json", "dtd": "dtd.json", "eurosat": "eurosat.json",
    "fgvc_aircraft": "aircraft.json", "food101": "food101.json", "oxford_flowers": "flower102.json",
    "oxford_pets": "pets.json", "stanford_cars": "cars.json", "sun397": "sun397.json", "ucf101": "ucf101.json",
}


@pytest.fixture(scope="module")
def published_md(shared_dir) -> str:
    return (shared_dir / "design" / "PUBLISHED.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def presets_md(shared_dir) -> str:
    return (shared_dir / "design" / "PRESETS.md").read_text(encoding="utf-8")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a markdown text, header row included, separator rows dropped."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _number(text: str) -> float:
    return float(text.rstrip("*"))


def _by_method(table: list[list[str]]) -> dict[tuple[str, str], str]:
    """Tables with methods as rows and datasets as columns -> {(method, column): text}."""
    head = [_COLUMN.get(h, h) for h in table[0]]
    return {(row[0], head[i]): row[i] for row in table[1:] for i in range(1, len(row))}


def _by_dataset(table: list[list[str]]) -> dict[tuple[str, str], str]:
    """Tables with datasets as rows and methods as columns -> {(method, dataset): text}."""
    head = table[0]
    return {(head[i], row[0]): row[i] for row in table[1:] for i in range(1, len(row))}


def _expected(published_md: str) -> dict[str, dict[tuple[str, str], str]]:
    t = markdown_tables(published_md)
    # order in PUBLISHED.md: text-only, base2novel, cross-dataset, DG, TPT OOD, TPT XD, ZERO..., ZERO...
    return {
        "protext-text-only": _by_dataset(t[0]),
        "protext-base2novel": _by_dataset(t[1]),
        "protext-cross-dataset": _by_method(t[2]),
        "protext-dg": _by_method(t[3]),
        "tpt-ood": _by_method(t[4]),
        "tpt-xd": _by_method(t[5]),
        "protext-tpt": {k: v for k, v in _by_method(t[2]).items() if k[0] == "ProText"},
        "tta-ood": _by_method(t[6]),
        "tta-xd": _by_method(t[7]),
    }


def _split_cell(text: str, measures: tuple[str, ...]) -> dict[str, float]:
    parts = [p.strip() for p in text.split("/")]
    if measures == ("top1", "ece") and len(parts) == 1:
        measures = ("top1",)  # only C-TPT's cells print "acc / ECE"
    assert len(parts) == len(measures), text
    return {m: _number(p) for m, p in zip(measures, parts)}


#: tables whose numbers come from TTA2.md §6-§10 (checked below against that text), not PUBLISHED.md
TTA2_TABLES = {"tta2-xd", "tta2-ood"}
#: the evaluation-protocol tables of TTA2.md §11 (OGA, StatA), checked below against that text
PROTOCOL_TABLES = {"oga-runs", "stata"}


def test_every_typed_number_equals_published_md(published_md):
    expected = _expected(published_md)
    assert set(expected) == set(PROTOCOLS) - TTA2_TABLES - PROTOCOL_TABLES
    for name, cells in expected.items():
        p = get_protocol(name)
        averages = {a.name for a in p.averages}
        seen_cells, seen_averages = {}, {}
        for (method, column), text in cells.items():
            numbers = _split_cell(text, p.measures())
            for measure, value in numbers.items():
                if column in averages or method.startswith("average"):
                    # text-only and base-to-novel put averages in a row, the others in a column
                    key = (column, method, measure) if method.startswith("average") else (method, column, measure)
                    seen_averages[key] = value
                else:
                    seen_cells[(method, column, measure)] = value
        assert dict(p.published) == seen_cells, name
        assert dict(p.published_averages) == seen_averages, name


def test_every_tta2_number_is_printed_in_its_methods_section(shared_dir):
    """Each published cell of the tta2 tables appears, as printed, in its method's section of TTA2.md
    (a mistyped number is found nowhere there)."""
    text = (shared_dir / "design" / "TTA2.md").read_text(encoding="utf-8")
    sections = {m.group(1): m.group(2) for m in re.finditer(r"\n## (\d+)\. (.*?)(?=\n## \d+\. |\Z)", text, re.S)}
    where = {"DMN-ZS": "6", "DPE": "7", "BoostAdapter": "8", "O-TPT": "9", "TPS": "10"}
    seen = 0
    for name in TTA2_TABLES:
        p = get_protocol(name)
        for (row, _, _), value in {**p.published, **p.published_averages}.items():
            section = sections[next(v for k, v in where.items() if row.startswith(k))]
            printed = f"{value:.2f}" if value != int(value) else f"{value:.1f}"
            assert printed in section or f"{value:.2f}" in section, (name, row, value)
            seen += 1
    assert seen > 60


def test_paper_text_only_clip_average_is_not_the_mean_of_its_row():
    p = get_protocol("protext-text-only")
    row = [p.published[("CLIP", d, "top1")] for d in p.datasets]
    # hand-computed: the 11 CLIP cells sum to 718.25 (mean 65.295); without ImageNet 651.53 (mean 65.153)
    assert sum(row) == pytest.approx(718.25)
    assert p.published_averages[("CLIP", "average (11)", "top1")] == 65.15
    assert sum(row[1:]) / 10 == pytest.approx(65.153)


def test_unknown_table_lists_the_names():
    from protext.errors import UserError

    with pytest.raises(UserError) as err:
        get_protocol("protext-texts-only")
    for name in table_names():
        assert name in str(err.value)


# --------------------------------------------------------------------------------------------------
# cell settings against the protocol text


def _clip_templates(published_md: str) -> tuple[dict[str, str], str]:
    """CoOp's templates from the ProText "CLIP" protocol bullet: ({dataset: template}, default)."""
    bullet = published_md.split("- **CLIP**:", 1)[1].split("\n- **", 1)[0]
    pairs = dict(re.findall(r"(\w+) `([^`]+)`", bullet))
    default = re.search(r"all others.*?`([^`]+)`", bullet, re.S).group(1)
    return {k: v for k, v in pairs.items() if "{}" in v}, default


def _presets_table(presets_md: str) -> dict[str, int]:
    """n_ctx per preset name, from PRESETS.md's hyper-parameter table."""
    table = markdown_tables(presets_md)[0]
    out, setting = {}, None
    for row in table[1:]:
        if row[0]:
            setting = "cross_dataset" if row[0].startswith("cross") else ("text_only" if row[0].startswith("text") else "base2novel")
        name = "cross_dataset" if setting == "cross_dataset" else f"{setting}/{row[1]}"
        out[name] = int(row[2])
    return out


def _cross_templates(presets_md: str) -> dict[str, str]:
    table = markdown_tables(presets_md)[1]
    return {row[0]: row[1].strip("`") for row in table[1:] if not row[0].startswith("all others")}


def _n_classes(shared_dir, dataset: str) -> int:
    if dataset in ("imagenet_a", "imagenet_r"):
        return 200
    if dataset.startswith("imagenet"):
        return 1000
    return len(json.loads((shared_dir / "classnames" / _NAMES_FILE[dataset]).read_text()))


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_cell_settings_follow_the_protocol_text(name, published_md, presets_md, shared_dir):
    coop, default = _clip_templates(published_md)
    n_ctx = _presets_table(presets_md)
    cross = _cross_templates(presets_md)
    p = get_protocol(name)
    cells = plan_cells(p, ReproduceConfig(name, "unused"))
    assert len(cells) == len(p.rows) * len(p.datasets) * len(p.splits)
    assert {(c.row, c.dataset, c.split) for c in cells} == {
        (r.name, d, s) for r in p.rows for d in p.datasets for s in p.splits
    }
    for c in cells:
        total = _n_classes(shared_dir, c.dataset)
        assert c.n_classes == {"all": total, "base": math.ceil(total / 2), "novel": total // 2}[c.split]
        if c.features == "ensemble":  # ZERO+Ensemble (and TDA's features on its datasets): the seven templates
            assert c.row in ("ZERO + Ensemble", "TDA", "BoostAdapter") and c.template == "ensemble of 7 templates"
        elif c.features == "ensemble80":  # TDA's features on R and Sketch, TPS's prototypes: CLIP's 80 templates
            assert c.row in ("TDA", "BoostAdapter", "TPS") and c.template == "ensemble of CLIP's 80 templates"
        elif c.features in ("ensemble+cupl", "ensemble80+cupl"):  # DMN-ZS's and DPE's tip_cupl
            assert c.row.startswith(("DMN-ZS", "DPE")) and c.template.endswith(" + CuPL descriptions")
        elif c.features == "template+cupl":  # one dataset template (CoOp's) and the descriptions
            assert c.template == coop.get(c.dataset, default) and c.template_rule == "coop"
        elif c.row.startswith(("CLIP (", "TPT", "CoOp", "ZERO", "C-TPT", "O-TPT")):
            assert c.template == "a photo of a {}." and c.template_rule == "tpt"  # TPT: one template everywhere
        elif c.features == "clip" or c.row == "CuPL":
            assert c.template == coop.get(c.dataset, default) and c.template_rule == "coop"
        if c.features == "prompts" and c.preset:
            assert c.n_ctx == n_ctx[c.preset]
            trained_on = "imagenet" if c.preset == "cross_dataset" else c.preset.split("/")[1]
            in_domain = trained_on == c.dataset
            want = "a photo of a {}." if in_domain else cross.get(c.dataset, "a photo of a {}.")
            assert c.template == want, c
        if c.tta and c.tta["method"] in ("tpt", "ctpt"):  # TPT's published defaults (PUBLISHED.md)
            assert (c.tta["views"], int(c.tta["views"] * c.tta["selection"]), c.tta["steps"], c.tta["lr"]) == (64, 6, 1, 5e-3)
        if c.tta and c.tta["method"] == "zero":  # TTA.md §1: 64 views, floor(64 * 0.3) = 19 kept
            assert (c.tta["views"], int(c.tta["views"] * c.tta["selection"])) == (64, 19)
        if c.row == "TDA" and name not in PROTOCOL_TABLES:  # TTA.md §3: per-dataset views and features
            assert c.tta["views"] is None
            seven = ("imagenet", "imagenet_a", "imagenet_v2", "caltech101", "stanford_cars", "sun397")
            eighty = ("imagenet_r", "imagenet_sketch")
            assert c.features == ("ensemble" if c.dataset in seven else "ensemble80" if c.dataset in eighty else "clip")
            # the other fine-grained sets: one dataset template, in TDA's code exactly CoOp's
            assert c.features != "clip" or c.template == coop.get(c.dataset, default)


def test_rows_use_the_presets_the_paper_names():
    presets = {(c.row, c.dataset, c.split): c.preset for p in PROTOCOLS.values() for c in plan_cells(p, ReproduceConfig(p.name, "x"))}
    assert presets[("ProText", "dtd", "all")] in ("text_only/dtd", "cross_dataset")
    text_only = plan_cells(get_protocol("protext-text-only"), ReproduceConfig("protext-text-only", "x"))
    assert {c.preset for c in text_only if c.row == "ProText"} == {f"text_only/{d}" for d in get_protocol("protext-text-only").datasets}
    b2n = plan_cells(get_protocol("protext-base2novel"), ReproduceConfig("protext-base2novel", "x"))
    assert all(c.preset == f"base2novel/{c.dataset}" for c in b2n if c.row == "ProText")
    # CuPL has no descriptions of novel classes: its novel cells are CLIP's
    assert all(c.features == "clip" for c in b2n if c.row == "CuPL" and c.split == "novel")
    assert all(c.features == "cupl" for c in b2n if c.row == "CuPL" and c.split == "base")
    dg = plan_cells(get_protocol("protext-dg"), ReproduceConfig("protext-dg", "x"))
    assert {c.preset for c in dg if c.row == "ProText"} == {"text_only/imagenet"}
    assert {c.n_ctx for c in dg if c.row == "ProText"} == {16}
    xd = plan_cells(get_protocol("protext-cross-dataset"), ReproduceConfig("protext-cross-dataset", "x"))
    assert {c.preset for c in xd if c.row == "ProText"} == {"cross_dataset"}
    tpt = plan_cells(get_protocol("protext-tpt"), ReproduceConfig("protext-tpt", "x"))
    tuned = [c for c in tpt if c.tta and c.tta["method"] in ("tpt", "otpt")]  # the prompt tuners start from ProText's
    assert {c.tta["init"] for c in tuned} == {"prompts"} and {c.preset for c in tpt} == {"cross_dataset"}
    assert {c.tta["init"] for c in tpt if c.tta and c not in tuned} == {None}  # the others read its class features
    ood = plan_cells(get_protocol("tpt-ood"), ReproduceConfig("tpt-ood", "x"))
    assert {c.tta["init"] for c in ood if c.tta} == {"handcrafted", "coop"}
    assert {c.n_ctx for c in ood if c.tta and c.tta["init"] == "handcrafted"} == {4}


# --------------------------------------------------------------------------------------------------
# AugMix, seeds and class features per cell, against the published codes' rules written out here

_SHIFTS = ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")


def _published_augmix(table: str, method: str, dataset: str) -> bool:
    """AugMix on the random views in the published runs. TPT's code: only the fine-grained sets (its
    set ids longer than one letter; ImageNet 'I' and A/V/R/K have none). C-TPT's natural-shift runs
    add it on A/V2/R/Sketch, not on ImageNet. ZERO never; TDA on A/V2/R/Sketch only."""
    fine_grained = not dataset.startswith("imagenet")
    if method == "tpt":
        return fine_grained
    if method == "ctpt":
        return fine_grained or (table == "tta-ood" and dataset in _SHIFTS)
    if method in ("zero", "boost"):  # BoostAdapter's views: crops and flips only (TTA2.md §8)
        return False
    if method == "otpt":  # fine-grained script: TPT's rule; natural-shift script: --I_augmix on A/V2/R/K (§9)
        return fine_grained or dataset in _SHIFTS
    if method in ("dmn", "dmn-oracle", "tps"):  # `len(set_id) > 1` (§6, §10)
        return fine_grained
    if method == "dpe":  # 64 AugMix views on I/A/V/R/K, one plain view elsewhere (§7)
        return not fine_grained
    assert method == "tda", method
    return dataset in _SHIFTS


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_tta_cell_uses_the_published_augmix(name):
    from protext.tta.config import TTAConfig

    p = get_protocol(name)
    cells = [c for c in plan_cells(p, ReproduceConfig(name, "unused")) if c.tta]
    for c in cells:
        # what the evaluation runs: the cell's own value, or the method's default for the dataset
        resolved = TTAConfig(c.tta["method"], augmix=c.tta["augmix"]).resolved(c.dataset).augmix
        # OGA and StatA replay one pre-computed view without augmentation (TTA2.md §11); MTA's views: no AugMix
        want = False if name in PROTOCOL_TABLES else _published_augmix(name, c.tta["method"], c.dataset)
        assert resolved == want, (c.key, c.tta)


def test_ctpt_imagenet_has_no_augmix_and_its_shifts_do():
    cells = {c.dataset: c for c in plan_cells(get_protocol("tta-ood"), ReproduceConfig("tta-ood", "x")) if c.row.startswith("C-TPT")}
    assert cells["imagenet"].tta["augmix"] is False
    assert all(cells[d].tta["augmix"] is True for d in _SHIFTS)
    plan = describe_plan(ReproduceConfig("tta-ood", "x")).splitlines()
    line = next(ln for ln in plan if ln.strip().startswith("c-tpt-acc-ece__imagenet__all"))
    assert "augmix:False" in line


def test_zero_cells_run_the_published_seed(shared_dir):
    from protext.protocols import ZERO_SEED
    from protext.tta.zero import PUBLISHED_SEED

    tta_md = (shared_dir / "design" / "TTA.md").read_text(encoding="utf-8")
    zero_section = tta_md.split("## 1. ZERO", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"Published default seed (\d+)", zero_section).group(1) == "1"
    assert ZERO_SEED == PUBLISHED_SEED == 1
    for name in ("tta-ood", "tta-xd"):
        config = ReproduceConfig(name, "x", seed=7)  # --seed does not move ZERO off its published seed
        cells = plan_cells(get_protocol(name), config)
        zero = [c for c in cells if c.tta and c.tta["method"] == "zero"]
        assert len(zero) == 2 * len(get_protocol(name).datasets)
        assert all(c.tta["seed"] == 1 for c in zero)
        assert all("seed" not in c.tta for c in cells if c.tta and c.tta["method"] != "zero")
        plan = describe_plan(config).splitlines()
        assert all(" seed:1" in ln for ln in plan if ln.strip().startswith(("zero__", "zero-ensemble__")))


def test_library_runner_passes_the_cell_seed_augmix_and_ensemble(monkeypatch, tmp_path):
    import protext.evaluation as evaluation
    from protext.reproduction import EvalRequest, LibraryRunner

    seen = []

    def fake_evaluate(config, clip=None, progress=True):
        seen.append(config)
        template = {"templates": ["t {}."], "source": "x", "rule": "x"} if config.template is None else {"template": config.template}
        return {"metrics": {"top1": 50.0, "n_images": 1}, "dataset": {"n_classes": 200}, "template": template,
                "timing": {"eval_seconds": 0.0, "seconds_per_image": 0.0, "peak_memory": None}, "method": config.method,
                "runtime": {}}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    runner = LibraryRunner(ReproduceConfig("tta-ood", str(tmp_path), seed=5))
    runner._clip = object()  # never loaded: the fake evaluation ignores it
    cells = {c.key: c for c in plan_cells(get_protocol("tta-ood"), runner.config)}
    results = {}
    for key in ("zero__imagenet_r__all", "tda__imagenet_r__all", "tda__imagenet_a__all", "c-tpt-acc-ece__imagenet__all"):
        results[key] = runner.evaluate(EvalRequest(cells[key], str(tmp_path), tmp_path / key))
    zero, tda_r, tda_a, ctpt = seen
    assert zero.seed == 1 and zero.tta == "zero"
    assert tda_r.seed == 5 and tda_r.method == "ensemble80" and tda_r.template is None
    assert tda_a.method == "ensemble" and tda_a.template is None
    assert ctpt.seed == 5 and ctpt.augmix is False and ctpt.tta == "ctpt"
    assert results["tda__imagenet_r__all"]["template"] == "ensemble of CLIP's 80 templates"
    assert results["tda__imagenet_a__all"]["template"] == "ensemble of 7 templates"


def test_no_departure_for_what_the_published_code_does():
    """CLIP's 80 templates ship with open_clip, and TDA's one dataset template is CoOp's: neither is a
    departure any more, in any table's list or in the README's."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    texts = [d for p in PROTOCOLS.values() for d in p.all_departures()]
    texts.append(readme.read_text(encoding="utf-8").split("## Semantics and deliberate departures", 1)[1].split("\n## ", 1)[0])
    for text in texts:
        assert "no copy" not in text and "read as CoOp" not in text, text


# --------------------------------------------------------------------------------------------------
# the OGA and StatA protocol tables (TTA2.md §11), against the text of that section


@pytest.fixture(scope="module")
def section_11(shared_dir) -> dict[str, str]:
    """TTA2.md §11.1 and §11.2, each as one string."""
    text = (shared_dir / "design" / "TTA2.md").read_text(encoding="utf-8")
    section = text.split("## 11. Evaluation protocols", 1)[1].split("\n## 12.", 1)[0]
    oga, stata = section.split("### 11.2", 1)
    return {"oga": " ".join(oga.split()), "stata": " ".join(stata.split())}


def _numbers_after(text: str, label: str, stop: str = ";") -> list[float]:
    """The numbers printed after ``label`` up to the next ``stop`` (bracketed remarks skipped)."""
    part = text.split(label, 1)[1].split(stop, 1)[0]
    part = re.sub(r"\([^)]*\)", "", part)
    return [float(x) for x in re.findall(r"\d+\.\d+", part)]


def test_oga_published_averages_are_those_of_tta2_11_1(section_11):
    published = section_11["oga"].split("Published (README tables", 1)[1]
    standard = _numbers_after(published, "standard prompts:")
    custom = _numbers_after(published, "custom prompts:", ". ")
    assert len(standard) == 4 and len(custom) == 4  # zero-shot, TDA, DMN, OGA
    p = get_protocol("oga-runs")
    assert dict(p.published_averages) == {
        ("Zero-shot CLIP", "avg (11)", "top1"): standard[0], ("TDA", "avg (11)", "top1"): standard[1],
        ("DMN-ZS", "avg (11)", "top1"): standard[2],
    }
    assert not p.published  # the README prints 11-set averages only
    only = {(m, s): v for m, s, v in p.published_only}
    assert only[("OGA", "standard prompts, avg (11)")] == standard[3]
    for method, value in zip(("Zero-shot CLIP", "TDA", "DMN-ZS", "OGA"), custom):
        assert only[(method, "custom prompts (7 templates), avg (11)")] == value
    assert len(only) == 5 and "OGA" not in {r.name for r in p.rows}  # OGA is not implemented: no row


def test_stata_published_averages_are_those_of_tta2_11_2(section_11):
    published = section_11["stata"].split("Published (stata README", 1)[1]
    batch = published.split("batch:", 1)[1].split("Online", 1)[0]
    online = published.split("Online (low / medium / high correlation / separate):", 1)[1]
    clip = _numbers_after(batch, "CLIP")
    assert clip == _numbers_after(online, "CLIP") == [65.2]
    stata_batch, transclip = _numbers_after(batch, "StatA"), _numbers_after(batch, "TransCLIP", ". ")
    assert len(stata_batch) == len(transclip) == 7
    tda, dmn, stata_online = (_numbers_after(online, f"{m} ") for m in ("TDA", "DMN", "StatA"))
    mta = _numbers_after(online, "MTA", ". ")
    assert len(tda) == len(dmn) == len(stata_online) == 4 and len(mta) == 1
    p = get_protocol("stata")
    online_names = ("online-low", "online-medium", "online-high", "online-separate")
    batch_names = ("very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all")
    want = {("CLIP zero-shot", "avg (11)", "top1"): clip[0], ("MTA", "avg (11)", "top1"): mta[0]}
    for method, values in (("TDA", tda), ("DMN-ZS", dmn)):
        want.update({(f"{method} ({s})", "avg (11)", "top1"): v for s, v in zip(online_names, values)})
    assert dict(p.published_averages) == want and not p.published
    only = {(m, s): v for m, s, v in p.published_only}
    assert only == {**{("StatA", s): v for s, v in zip(batch_names, stata_batch)},
                    **{("TransCLIP", s): v for s, v in zip(batch_names, transclip)},
                    **{("StatA", s): v for s, v in zip(online_names, stata_online)}}
    assert not {"StatA", "TransCLIP"} & {r.name for r in p.rows}  # not implemented: no rows
    # the pivot's published number of each (method, setting) is the same one
    for row, method, setting, number in p.pivot:
        if method in ("TDA", "DMN-ZS"):
            assert number == want.get((row, "avg (11)", "top1")), (row, setting)
        elif method == "MTA":
            assert number == (mta[0] if setting in online_names else None)
        else:
            assert number == clip[0]


#: the settings of TTA2.md §11, written out by hand
_OGA_TDA = {"views": 1, "augmix": False, "options": {"tda_alpha": 2.0, "tda_beta": 5.0, "tda_positive_shots": 5,
                                                     "tda_negative_shots": 3, "stream_update": "batch"}}
_OGA_DMN = {"views": 1, "augmix": False, "options": {"dmn_memory": 8, "dmn_beta2": 1.0, "stream_update": "batch"}}
#: StatA's cells: OGA's hyper-parameters, TDA's own cache sizes, image by image (the batch rule is --stream-runs's)
_STATA_TDA = {"views": 1, "augmix": False, "options": {"tda_alpha": 2.0, "tda_beta": 5.0}}
_STATA_DMN = {"views": 1, "augmix": False, "options": {"dmn_memory": 8, "dmn_beta2": 1.0}}
_STATA_BATCH = {"very_low": (64, 1, 4), "low": (64, 2, 10), "medium_64": (64, 5, 25), "medium_1000": (1000, 5, 25),
                "high": (1000, 25, 50), "very_high": (1000, 50, 100), "all": (-1, None, None)}
_STATA_ONLINE = {"online-low": 0.1, "online-medium": 0.01, "online-high": 0.001, "online-separate": -1}


def _sub(d: dict, keys) -> dict:
    return {k: d.get(k) for k in keys}


def test_oga_cells_run_ogas_settings():
    p = get_protocol("oga-runs")
    cells = plan_cells(p, ReproduceConfig("oga-runs", "x"))
    assert p.datasets == ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
    assert p.measures() == ("top1", "eta", "spread")
    assert {c.row for c in cells} == {"Zero-shot CLIP", "TDA", "DMN-ZS", "DPE"}
    for c in cells:
        assert c.features == "clip" and c.template_rule == "coop"  # OGA's "standard": one template per set
        if c.row == "Zero-shot CLIP":
            assert c.tta is None and c.runs == {"kind": "order-free", "runs": 1}
            continue
        assert c.runs == {"kind": "orders", "stream_runs": 100, "stream_seed": 42, "batch_size": 32,
                          "last_batch": "kept, shorter"}
        want = {"TDA": _OGA_TDA, "DMN-ZS": _OGA_DMN, "DPE": {"views": 1, "augmix": False, "options": None}}[c.row]
        assert _sub(c.tta, want) == want, c.key
    # the evaluation resolves them (published defaults filled in) as the plan prints them
    plan = describe_plan(ReproduceConfig("oga-runs", "x")).splitlines()
    tda = next(ln for ln in plan if ln.strip().startswith("tda__dtd__all"))
    assert "tda views:1 " in tda and "tda_alpha:2.0 tda_beta:5.0" in tda and "runs=[orders runs:100 seed:42 batch:32]" in tda
    assert "tda_positive_shots:5 tda_negative_shots:3" in tda and "stream_update:batch" in tda  # OGA's 5/3, its batch rule
    dmn = next(ln for ln in plan if ln.strip().startswith("dmn-zs__eurosat__all"))
    assert "dmn_memory:8" in dmn and "dmn_beta2:1.0" in dmn and "views:1 " in dmn and "stream_update:batch" in dmn
    dpe = next(ln for ln in plan if ln.strip().startswith("dpe__eurosat__all"))
    assert "stream_update" not in dpe  # DPE has no write/read split: image by image, a departure
    departures = [ln for ln in plan if ln.strip().startswith("known departure:")]
    assert not any("No option sets them" in ln or "3 positive, 2 negative" in ln for ln in departures)
    assert [ln for ln in departures if "whole batch of 32" in ln] == [
        ln for ln in departures if ln.strip().startswith("known departure: DPE") and "one at a time" in ln]
    # --stream-runs shrinks every replayed cell, and only those
    small = plan_cells(p, ReproduceConfig("oga-runs", "x", stream_runs=3))
    assert {c.runs.get("stream_runs") for c in small if c.row != "Zero-shot CLIP"} == {3}
    # --tta-views does not multiply the single view
    assert {c.tta["views"] for c in plan_cells(p, ReproduceConfig("oga-runs", "x", tta_views=2)) if c.tta} == {1}


def test_stata_cells_run_statas_scenarios():
    p = get_protocol("stata")
    cells = plan_cells(p, ReproduceConfig("stata", "x"))
    rows = {c.row for c in cells}
    assert rows == {"CLIP zero-shot", "MTA"} | {f"{m} ({s})" for m in ("TDA", "DMN-ZS")
                                                for s in list(_STATA_BATCH) + list(_STATA_ONLINE)}
    for c in cells:
        if c.row in ("CLIP zero-shot", "MTA"):  # order-free: one run each
            assert c.runs == {"kind": "order-free", "runs": 1}
            assert (c.tta is None) == (c.row == "CLIP zero-shot")
            continue
        method, scenario = c.row[:-1].split(" (")
        assert _sub(c.tta, _STATA_TDA if method == "TDA" else _STATA_DMN) == (_STATA_TDA if method == "TDA" else _STATA_DMN)
        if scenario in _STATA_BATCH:  # 1000 tasks, StatA's seed 1
            b, k_min, k_max = _STATA_BATCH[scenario]
            assert c.runs == {"kind": "tasks", "scenario": scenario, "tasks": 1000, "stream_seed": 1, "batch_size": b,
                              "k_min": k_min, "k_max": k_max}, c.key
        else:  # 100 streams of batches of 128
            assert c.runs == {"kind": "streams", "scenario": scenario, "tasks": 100, "stream_seed": 1, "batch_size": 128,
                              "gamma": _STATA_ONLINE[scenario], "last_batch": "dropped when incomplete"}, c.key
    small = plan_cells(p, ReproduceConfig("stata", "x", tasks=2))
    assert {c.runs.get("tasks") for c in small if c.runs["kind"] != "order-free"} == {2}


def test_library_runner_gives_the_protocol_cells_their_runs(monkeypatch, tmp_path):
    """The evaluation each protocol cell runs: orders or scenario, seed and method options, and a valid EvalConfig."""
    import protext.evaluation as evaluation
    from protext.reproduction import EvalRequest, LibraryRunner

    seen = []

    def fake_evaluate(config, clip=None, progress=True):
        config.validate()  # every flag combination the table asks for is one the evaluation accepts
        seen.append(config)
        payload = {"metrics": {"top1": 40.0, "n_images": 3}, "dataset": {"n_classes": 10},
                   "template": {"template": "t {}."}, "method": config.method, "runtime": {},
                   "timing": {"eval_seconds": 1.0, "seconds_per_image": 0.1, "peak_memory": None, "gflops_per_image": 2.5}}
        if config.stream_runs or config.scenario:
            per_run = [{"top1": t, "ece": 1.0} for t in (10.0, 20.0, 30.0, 40.0)]
            payload["runs"] = {"kind": "orders", "per_run": per_run, "summary": {
                "top1": {"n_runs": 4, "mean": 25.0, "std": 11.18, "min": 10.0, "max": 40.0, "eta": 10.0, "tail_runs": 1},
                "ece": {"mean": 1.0}}}
        return payload

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    for table, keys in (("oga-runs", ("zero-shot-clip__dtd__all", "tda__dtd__all", "dmn-zs__dtd__all")),
                        ("stata", ("tda-online-high__eurosat__all", "dmn-zs-very-low__eurosat__all", "mta__eurosat__all"))):
        runner = LibraryRunner(ReproduceConfig(table, str(tmp_path), seed=5))
        runner._clip = object()
        cells = {c.key: c for c in plan_cells(get_protocol(table), runner.config)}
        results = {key: runner.evaluate(EvalRequest(cells[key], str(tmp_path), tmp_path / table / key)) for key in keys}
        first, second, third = seen[-3:]
        if table == "oga-runs":
            assert first.tta is None and first.stream_runs is None and first.method == "clip" and first.templates == "coop"
            assert results[keys[0]]["metrics"] == {"top1": 40.0, "eta": 40.0, "spread": 0.0, "runs": 1, "n_images": 3,
                                                   "n_classes": 10}
            assert (second.tta, second.stream_runs, second.stream_seed, second.tta_views) == ("tda", 100, 42, 1)
            assert second.tta_options == _OGA_TDA["options"] and second.augmix is False
            assert third.tta_options == _OGA_DMN["options"] and third.scenario is None
            tda = results[keys[1]]
            assert _sub(tda["metrics"], ("top1", "eta", "spread", "runs")) == {"top1": 25.0, "eta": 10.0, "spread": 11.18, "runs": 4}
            assert tda["details"]["runs"]["per_run_top1"] == [10.0, 20.0, 30.0, 40.0]
            assert tda["cost"]["gflops_per_image"] == 2.5
        else:
            assert (first.scenario, first.tasks, first.stream_seed, first.stream_runs) == ("online-high", 100, 1, None)
            assert (second.scenario, second.tasks, second.tta) == ("very_low", 1000, "dmn")
            assert third.tta == "mta" and third.scenario is None and third.stream_runs is None
