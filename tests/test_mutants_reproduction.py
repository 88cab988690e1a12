"""Mutation-testing survivors of :mod:`protext.reproduction` (issue 16), each killed by a test written here.

Every expected value is written out by hand from the design docs (PUBLISHED.md, PRESETS.md, TTA2.md
§11) or computed by hand in the test, never with the package's own helpers. The inputs are chosen so
the rule matters: a harmonic mean that differs from the mean, a row with a missing cell, odd class
counts, a run that departs on every flag. Nothing here reads a dataset or imports a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import pytest
from synthetic_datasets import make_tree

from protext.datasets import dataset_status
from protext.errors import UserError
from protext.protocols import Average, Protocol, Row, RunSpec, TTASpec
from protext.reproduction.availability import Availability, check_datasets, check_external
from protext.reproduction.config import MAX_RUNS, ReproduceConfig, ReproduceError, check_run_counts, slug, validate
from protext.reproduction.descriptions import cupl_source, gather_descriptions, materialise
from protext.reproduction.plan import Cell, cell_key, describe_plan, describe_runs, plan_cells, resolved_runs
from protext.reproduction.render import render_markdown
from protext.reproduction.run_folder import RunFolder, read_json
from protext.reproduction.table_math import build_table, harmonic_mean

# --------------------------------------------------------------------------------------------------
# a small protocol of our own, so every number below is chosen by hand

_DATASETS = ("dtd", "eurosat", "oxford_pets")  # 47, 10 and 37 classes: two odd counts


def _protocol(**kw) -> Protocol:
    fields: dict[str, Any] = dict(
        name="mini", title="a hand-made table", datasets=_DATASETS, splits=("all",),
        rows=(Row("CLIP", "clip", "coop", note="the coop rule"), Row("Other", "clip", "tpt")),
        averages=(Average("avg (2)", ("dtd", "eurosat")), Average("avg (3)", _DATASETS)),
        published={("CLIP", "dtd", "top1"): 44.0, ("CLIP", "eurosat", "top1"): 48.0},
        published_averages={("CLIP", "avg (2)", "top1"): 46.5},
        notes=("a note",), departures=("a departure",),
    )
    fields.update(kw)
    return Protocol(**fields)


def _line(text: str, start: str) -> str:
    """The first line of ``text`` that starts with ``start``."""
    return next(ln for ln in text.splitlines() if ln.startswith(start))


class _Folder:
    """Stands in for the run folder: the records the test wrote, by cell key."""

    def __init__(self, records: dict[str, dict]):
        self.records = records

    def read_cell(self, cell: Cell) -> Optional[dict]:
        return self.records.get(cell.key)


def _record(cell: Cell, top1: float, seconds: float = 1.0, **metrics) -> dict:
    return {"key": cell.key, "settings": cell.settings(), "metrics": {"top1": top1, **metrics},
            "cost": {"seconds": seconds}, "template_used": cell.template, "environment": {"device": "cpu"}}


def _build(protocol: Protocol, values: dict, present=_DATASETS, external_problem=None, prompts=None, **config_kw):
    config = ReproduceConfig(protocol.name, "ROOT", **config_kw)
    cells = plan_cells(protocol, config)
    by_key = {(c.row, c.dataset, c.split): c for c in cells}
    records = {by_key[k].key: _record(by_key[k], v) for k, v in values.items()}
    found = Availability(present=list(present), missing={d: "absent: place it" for d in protocol.datasets if d not in present})
    return build_table(protocol, config, cells, _Folder(records), found, external_problem, prompts or {}), cells


# --------------------------------------------------------------------------------------------------
# table_math


def test_harmonic_mean_by_hand():
    assert harmonic_mean(80.0, 20.0) == pytest.approx(32.0)  # 2·80·20/100, not the mean 50
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(64.0, 64.0) == pytest.approx(64.0)  # equal halves: their common value
    assert harmonic_mean(0.0, 50.0) == 0.0
    assert harmonic_mean(None, 50.0) is None and harmonic_mean(50.0, None) is None


def test_a_row_missing_a_cell_has_no_average_over_it_and_counts_what_it_has():
    table, _ = _build(_protocol(), {("CLIP", "dtd", "all"): 40.0, ("CLIP", "eurosat", "all"): 50.0,
                                    ("Other", "dtd", "all"): 30.0})
    clip, other = table["rows"]
    two, three = clip["averages"]["avg (2)"]["top1"], clip["averages"]["avg (3)"]["top1"]
    assert two == {"ours": 45.0, "published": 46.5, "difference": -1.5, "mean_of_published_cells": 46.0,
                   "complete": 2, "of": 2}
    # no pets cell: no average over the three, and the paper printed none (its mean of cells: pets unpublished)
    assert three == {"ours": None, "published": None, "difference": None, "mean_of_published_cells": None,
                     "complete": 2, "of": 3}
    assert other["averages"]["avg (2)"]["top1"]["ours"] is None
    assert other["averages"]["avg (2)"]["top1"]["complete"] == 1
    assert clip["cells"]["dtd"]["top1"] == {"ours": 40.0, "published": 44.0, "difference": -4.0}
    assert clip["cells"]["oxford_pets"]["top1"] == {"ours": None, "published": None, "difference": None}
    assert other["cells"]["eurosat"]["top1"] == {"ours": None, "published": None, "difference": None}
    assert table["cells_not_run"] == ["clip__oxford_pets__all", "other__eurosat__all", "other__oxford_pets__all"]
    assert [c["key"] for c in table["cells"]] == ["clip__dtd__all", "clip__eurosat__all", "other__dtd__all"]


def test_numbers_are_rounded_to_four_places_and_the_published_kept_as_printed():
    table, _ = _build(_protocol(), {("CLIP", "dtd", "all"): 40.123456, ("CLIP", "eurosat", "all"): 50.0,
                                    ("CLIP", "oxford_pets", "all"): 60.0})
    clip = table["rows"][0]
    assert clip["cells"]["dtd"]["top1"] == {"ours": 40.1235, "published": 44.0, "difference": -3.8765}
    # (40.123456 + 50 + 60) / 3 = 50.041152
    assert clip["averages"]["avg (3)"]["top1"]["ours"] == 50.0412
    assert clip["averages"]["avg (3)"]["top1"]["complete"] == 3


def test_base_to_novel_hm_per_cell_and_of_the_averages():
    p = _protocol(splits=("base", "novel"), averages=(Average("average", ("dtd", "eurosat")),),
                  published={("CLIP", "dtd", "hm"): 30.0}, published_averages={})
    values = {("CLIP", "dtd", "base"): 80.0, ("CLIP", "dtd", "novel"): 20.0,
              ("CLIP", "eurosat", "base"): 40.0, ("CLIP", "eurosat", "novel"): 60.0,
              ("CLIP", "oxford_pets", "base"): 50.0}
    table, _ = _build(p, values)
    assert table["measures"] == ["base", "novel", "hm"] and table["splits"] == ["base", "novel"]
    clip = table["rows"][0]
    assert clip["cells"]["dtd"]["hm"] == {"ours": 32.0, "published": 30.0, "difference": 2.0}  # 2·80·20/100
    assert clip["cells"]["eurosat"]["hm"]["ours"] == 48.0  # 2·40·60/100
    assert clip["cells"]["oxford_pets"]["hm"]["ours"] is None  # no novel half
    assert clip["cells"]["oxford_pets"]["base"]["ours"] == 50.0
    avg = clip["averages"]["average"]
    assert avg["base"]["ours"] == 60.0 and avg["novel"]["ours"] == 40.0
    # the HM of the two means (2·60·40/100 = 48), not the mean of the HMs ((32 + 48) / 2 = 40)
    assert avg["hm"]["ours"] == 48.0
    assert avg["hm"]["complete"] == 2 and avg["hm"]["of"] == 2


def test_the_payload_around_the_rows():
    prompts = {"text_only/dtd": {"cost": {"seconds": 2.25}}, "x": {"cost": {"seconds": None}}, "y": {}}
    p = _protocol(rows=(Row("CLIP", "clip", "coop"), Row("Ext", "clip", "tpt", external="coop", note="needs it")))
    table, _ = _build(p, {("CLIP", "dtd", "all"): 40.0, ("CLIP", "eurosat", "all"): 50.0},
                      present=("dtd",), external_problem="no --coop", prompts=prompts, limit=3, epochs=2)
    # eurosat is not present: its record is not read even though a file is there
    assert [c["key"] for c in table["cells"]] == ["clip__dtd__all"]
    assert table["rows_not_run"] == {"Ext": "no --coop"}
    assert table["missing_datasets"] == {"eurosat": "absent: place it", "oxford_pets": "absent: place it"}
    assert table["cost"] == {"evaluation_seconds": 1.0, "training_seconds": 2.25}
    assert table["format"] == "protext-reproduce-table/1" and table["table"] == "mini"
    assert table["title"] == "a hand-made table" and table["notes"] == ["a note"]
    assert table["datasets"] == list(_DATASETS) and table["measures"] == ["top1"]
    assert table["run"]["root"] == "ROOT" and table["run"]["descriptions"] is None and table["run"]["limit"] == 3
    # no row trains prompts: --epochs departs nothing, --limit does
    assert table["departures"] == ["--limit 3: only the first 3 test images of each cell"]
    assert table["protocol_departures"][0] == "a departure" and len(table["protocol_departures"]) == 2
    assert "report_runs" not in table and "pivot" not in table
    row = table["rows"][1]
    assert (row["name"], row["features"], row["template_rule"], row["preset"], row["tta"], row["note"]) == \
        ("Ext", "clip", "tpt", None, None, "needs it")
    # without an external problem no row is listed as not run
    assert _build(p, {}, present=("dtd",))[0]["rows_not_run"] == {}


def _runs_protocol() -> Protocol:
    rows = (Row("Zero", "clip", "coop"), Row("M (low)", "clip", "coop", runs=RunSpec(scenario="low")),
            Row("M (high)", "clip", "coop", runs=RunSpec(scenario="high")))
    return _protocol(
        rows=rows, report_runs=True, published={}, published_averages={("Zero", "avg (2)", "top1"): 41.0},
        published_only=(("S", "low", 70.0), ("S", "elsewhere", 60.0), ("T", "high", 50.0)),
        pivot=(("Zero", "Zero", "low", 41.0), ("Zero", "Zero", "high", 41.0), ("M (low)", "M", "low", None),
               ("M (high)", "M", "high", 45.5)),
    )


def test_the_pivot_and_what_is_published_beside_it_by_hand():
    p = _runs_protocol()
    values = {("Zero", "dtd", "all"): 40.0, ("Zero", "eurosat", "all"): 44.0,
              ("M (high)", "dtd", "all"): 50.0, ("M (high)", "eurosat", "all"): 46.0, ("M (low)", "dtd", "all"): 30.0}
    config = ReproduceConfig("mini", "ROOT")
    cells = plan_cells(p, config)
    recs = {}
    for c in cells:
        if (c.row, c.dataset, c.split) in values:
            top1 = values[(c.row, c.dataset, c.split)]
            recs[c.key] = _record(c, top1, eta=top1 - 10, spread=1.0)
    table = build_table(p, config, cells, _Folder(recs), Availability(present=list(_DATASETS)), None, {})
    assert table["measures"] == ["top1", "eta", "spread"] and table["report_runs"] is True
    pivot = table["pivot"]
    assert pivot["average"] == "avg (2)" and pivot["settings"] == ["low", "high"]
    assert pivot["methods"] == ["Zero", "M", "S", "T"]
    cells_by = {(c["method"], c["setting"]): c for c in pivot["cells"]}
    assert cells_by[("Zero", "low")] == {"method": "Zero", "setting": "low", "row": "Zero", "implemented": True,
                                         "ours": 42.0, "published": 41.0, "difference": 1.0, "eta": 32.0,
                                         "complete": 2, "of": 2}
    assert cells_by[("M", "high")]["ours"] == 48.0 and cells_by[("M", "high")]["difference"] == 2.5
    assert cells_by[("M", "high")]["eta"] == 38.0
    assert cells_by[("M", "low")] == {"method": "M", "setting": "low", "row": "M (low)", "implemented": True,
                                      "ours": None, "published": None, "difference": None, "eta": None,
                                      "complete": 1, "of": 2}
    assert cells_by[("S", "low")] == {"method": "S", "setting": "low", "row": None, "implemented": False,
                                      "ours": None, "published": 70.0, "difference": None, "eta": None,
                                      "complete": 0, "of": 0}
    assert ("S", "elsewhere") not in cells_by and cells_by[("T", "high")]["published"] == 50.0
    # only the setting the pivot does not show stays in the list beside it
    assert table["published_only"] == [{"method": "S", "setting": "elsewhere", "published": 60.0}]
    assert len(pivot["cells"]) == 6


# --------------------------------------------------------------------------------------------------
# plan


def test_cell_key_and_slug():
    assert slug("C-TPT (acc / ECE)") == "c-tpt-acc-ece"
    assert slug("  A__b  ") == "a-b"
    assert cell_key("DMN-ZS (beta2 = 1)", "dtd", "base") == "dmn-zs-beta2-1__dtd__base"


def test_class_counts_of_the_halves_for_odd_counts():
    p = _protocol(splits=("base", "novel"), averages=(), published={}, published_averages={})
    cells = {(c.dataset, c.split): c.n_classes for c in plan_cells(p, ReproduceConfig("mini", "x")) if c.row == "CLIP"}
    # CoOp: base = the first ceil(n/2) labels; DTD 47 -> 24/23, EuroSAT 10 -> 5/5, Pets 37 -> 19/18
    assert cells == {("dtd", "base"): 24, ("dtd", "novel"): 23, ("eurosat", "base"): 5, ("eurosat", "novel"): 5,
                     ("oxford_pets", "base"): 19, ("oxford_pets", "novel"): 18}


def test_cell_settings_templates_and_sources_by_hand():
    rows = (
        Row("CLIP", "clip", "coop"),
        Row("CuPL", "cupl", "coop", novel_features="clip"),
        Row("ProText", "prompts", "protext", preset="text_only/{dataset}"),
        Row("Cross", "prompts", "protext", preset="cross_dataset"),
        Row("Mix", "template+cupl", "coop", features_by_dataset=(("eurosat", "ensemble+cupl"), ("dtd", "ensemble80"))),
        Row("Ens", "ensemble", "tpt"),
    )
    p = _protocol(rows=rows, splits=("base", "novel"), averages=(), published={}, published_averages={})
    cells = {(c.row, c.dataset, c.split): c for c in plan_cells(p, ReproduceConfig("mini", "x"))}
    clip = cells[("CLIP", "dtd", "base")]
    assert (clip.template, clip.template_source, clip.n_ctx, clip.preset) == ("{} texture.", "coop rule", None, None)
    assert not clip.in_domain and "runs" not in clip.settings() and clip.settings()["n_classes"] == 24
    cupl = cells[("CuPL", "eurosat", "base")]
    assert (cupl.features, cupl.template, cupl.template_source) == \
        ("cupl", "a centered satellite photo of {}.", "not used: the class's CuPL descriptions")
    assert cells[("CuPL", "eurosat", "novel")].features == "clip"
    assert cells[("CuPL", "eurosat", "novel")].template_source == "coop rule"
    # in-domain prompts keep their training template (ProText's "a photo of a {}." with the context phrase)
    own = cells[("ProText", "dtd", "base")]
    assert (own.preset, own.n_ctx, own.template) == ("text_only/dtd", 16, "a photo of a {}.")
    assert own.in_domain and own.template_source == "training template (in-domain prompts)"
    assert cells[("ProText", "eurosat", "base")].n_ctx == 4  # PRESETS.md: eurosat text-only n_ctx 4
    cross = cells[("Cross", "oxford_pets", "base")]
    assert (cross.preset, cross.n_ctx, cross.template, cross.template_source) == \
        ("cross_dataset", 4, "a photo of a {}, a type of pet.", "protext rule")
    mix = cells[("Mix", "oxford_pets", "base")]
    assert (mix.template, mix.template_source) == \
        ("a photo of a {}, a type of pet.", "coop rule, and the class's CuPL descriptions in one mean")
    mix_ens = cells[("Mix", "eurosat", "base")]
    assert mix_ens.template == "ensemble of 7 templates + CuPL descriptions"
    assert mix_ens.template_source == "ZERO+Ensemble's seven templates (TTA.md §1.6), and the class's CuPL descriptions in one mean"
    assert cells[("Mix", "dtd", "base")].template == "ensemble of CLIP's 80 templates"
    assert cells[("Ens", "dtd", "novel")].template == "ensemble of 7 templates"
    assert cells[("Ens", "dtd", "novel")].template_source == "ZERO+Ensemble's seven templates (TTA.md §1.6)"


def test_computation_tells_apart_what_changes_a_number_only():
    rows = (Row("A", "clip", "coop"), Row("B", "clip", "coop", note="other note"), Row("C", "clip", "tpt"),
            Row("D", "clip", "coop", tta=TTASpec("tda", views=None, selection=None, steps=None, lr=None, init=None)))
    p = _protocol(rows=rows, published={}, published_averages={})
    cells = {(c.row, c.dataset): c for c in plan_cells(p, ReproduceConfig("mini", "x"))}
    assert cells[("A", "dtd")].computation() == cells[("B", "dtd")].computation()
    assert cells[("A", "dtd")].computation() != cells[("C", "dtd")].computation()  # another template
    assert cells[("A", "dtd")].computation() != cells[("A", "eurosat")].computation()
    assert cells[("A", "dtd")].computation() != cells[("D", "dtd")].computation()  # a test-time method


def test_tta_views_shrink_the_views_but_not_a_single_view_and_tpt_starts_from_a_photo_of_a():
    rows = (Row("TPT", "clip", "tpt", tta=TTASpec()), Row("One", "clip", "coop", tta=TTASpec("tda", views=1, selection=None,
                                                                                             steps=None, lr=None, init=None)),
            Row("TDA", "clip", "coop", tta=TTASpec("tda", views=None, selection=None, steps=None, lr=None, init=None)),
            Row("TPT-P", "prompts", "protext", preset="cross_dataset", tta=TTASpec(init="prompts")))
    p = _protocol(rows=rows, published={}, published_averages={})
    cells = {c.row: c for c in plan_cells(p, ReproduceConfig("mini", "x", tta_views=3)) if c.dataset == "dtd"}
    assert cells["TPT"].tta["views"] == 3 and cells["TPT"].n_ctx == 4
    assert cells["One"].tta["views"] == 1 and cells["One"].n_ctx is None
    assert cells["TDA"].tta["views"] == 3 and cells["TDA"].n_ctx is None
    assert cells["TPT-P"].n_ctx == 4 and cells["TPT-P"].tta["init"] == "prompts"  # the preset's n_ctx
    plain = {c.row: c for c in plan_cells(p, ReproduceConfig("mini", "x")) if c.dataset == "dtd"}
    assert plain["TPT"].tta["views"] == 64 and plain["TDA"].tta["views"] is None


def _runs_rows() -> Protocol:
    rows = (Row("Free", "clip", "coop"), Row("Orders", "clip", "coop", runs=RunSpec(stream_runs=5)),
            Row("Seeded", "clip", "coop", runs=RunSpec(stream_runs=5, stream_seed=9)),
            Row("Low", "clip", "coop", runs=RunSpec(scenario="low")),
            Row("All", "clip", "coop", runs=RunSpec(scenario="all", tasks=7, stream_seed=3)),
            Row("Online", "clip", "coop", runs=RunSpec(scenario="online-high")),
            Row("Sep", "clip", "coop", runs=RunSpec(scenario="online-separate", tasks=4)))
    return _protocol(rows=rows, report_runs=True, published={}, published_averages={})


def test_resolved_runs_fill_in_the_published_counts_and_seeds():
    p = _runs_rows()
    runs = {r.name: resolved_runs(p, r, ReproduceConfig("mini", "x")) for r in p.rows}
    # TTA2.md §11: OGA 32 per batch, seed 42; StatA seed 1, 1000 tasks, 100 streams of 128
    assert runs["Free"] == {"kind": "order-free", "runs": 1}
    assert runs["Orders"] == {"kind": "orders", "stream_runs": 5, "stream_seed": 42, "batch_size": 32,
                              "last_batch": "kept, shorter"}
    assert runs["Seeded"]["stream_seed"] == 9
    assert runs["Low"] == {"kind": "tasks", "scenario": "low", "tasks": 1000, "stream_seed": 1, "batch_size": 64,
                           "k_min": 2, "k_max": 10}
    assert runs["All"] == {"kind": "tasks", "scenario": "all", "tasks": 7, "stream_seed": 3, "batch_size": -1,
                           "k_min": None, "k_max": None}
    assert runs["Online"] == {"kind": "streams", "scenario": "online-high", "tasks": 100, "stream_seed": 1,
                              "batch_size": 128, "gamma": 0.001, "last_batch": "dropped when incomplete"}
    assert runs["Sep"]["tasks"] == 4 and runs["Sep"]["gamma"] == -1
    small = {r.name: resolved_runs(p, r, ReproduceConfig("mini", "x", stream_runs=2, tasks=3)) for r in p.rows}
    assert small["Orders"]["stream_runs"] == 2 and small["Low"]["tasks"] == 3 and small["All"]["tasks"] == 3
    assert small["Online"]["tasks"] == 3 and small["Free"] == {"kind": "order-free", "runs": 1}
    assert resolved_runs(_protocol(), _protocol().rows[0], ReproduceConfig("mini", "x")) is None


def test_describe_runs_in_words():
    p = _runs_rows()
    words = {r.name: describe_runs(resolved_runs(p, r, ReproduceConfig("mini", "x"))) for r in p.rows}
    assert words == {
        "Free": "order-free (1 run)",
        "Orders": "orders runs:5 seed:42 batch:32",
        "Seeded": "orders runs:5 seed:9 batch:32",
        "Low": "scenario:low tasks:1000 seed:1 batch:64 K:2-10",
        "All": "scenario:all tasks:7 seed:3 batch:whole pool all classes",
        "Online": "scenario:online-high streams:100 seed:1 batch:128 gamma:0.001",
        "Sep": "scenario:online-separate streams:4 seed:1 batch:128 gamma:-1",
    }


def test_describe_plan_of_a_table_by_hand():
    text = describe_plan(ReproduceConfig("tpt-ood", "x", limit=2))
    lines = text.splitlines()
    assert lines[0] == "tpt-ood: TPT (NeurIPS'22) Table 1: natural distribution shifts"
    clip = next(ln for ln in lines if ln.startswith("  clip-a-photo-of-a__imagenet_a__all:"))
    assert clip == ("  clip-a-photo-of-a__imagenet_a__all: clip, 200 classes, template 'a photo of a {}.' (tpt rule)")
    coop = next(ln for ln in lines if ln.startswith("  coop-16-shot__imagenet__all:"))
    assert coop.endswith(" needs --coop") and "n_ctx" not in coop
    tpt = next(ln for ln in lines if ln.startswith("  tpt__imagenet_r__all:"))
    assert " n_ctx=4 tta=tpt " in tpt and "runs=" not in tpt
    assert "  departs: --limit 2: only the first 2 test images of each cell" in lines
    assert sum(ln.startswith("  known departure: ") for ln in lines) == 2
    preset = describe_plan(ReproduceConfig("protext-dg", "x")).splitlines()
    assert next(ln for ln in preset if ln.startswith("  protext__imagenet_a__all:")) == (
        "  protext__imagenet_a__all: prompts, 200 classes, template 'a photo of a {}.' (protext rule) "
        "preset=text_only/imagenet n_ctx=16")
    runs = describe_plan(ReproduceConfig("oga-runs", "x", stream_runs=3)).splitlines()
    tda = next(ln for ln in runs if ln.startswith("  tda__dtd__all:"))
    assert tda.endswith(" runs=[orders runs:3 seed:42 batch:32]")
    assert "  departs: --stream-runs 3: 3 stream orders per cell, not OGA's 100" in runs


# --------------------------------------------------------------------------------------------------
# config


def test_identity_and_prompt_folder_by_hand():
    c = ReproduceConfig("protext-dg", "root", out="o", coop="/x/y/coop.pth", epochs=3)
    assert c.identity() == {"table": "protext-dg", "model": "ViT-B-16", "pretrained": "openai", "limit": None,
                            "epochs": 3, "tta_views": None, "depth": None, "seed": 0, "coop": "coop.pth"}
    assert ReproduceConfig("t", "r", stream_runs=4, tasks=5).identity()["stream_runs"] == 4
    assert ReproduceConfig("t", "r", stream_runs=4, tasks=5).identity()["tasks"] == 5
    assert "tasks" not in ReproduceConfig("t", "r").identity() and ReproduceConfig("t", "r").identity()["coop"] is None
    assert c.output_dir() == Path("o/protext-dg") and ReproduceConfig("t", "r").output_dir() == Path("reproduction/t")
    key = {"model": "ViT-B-16", "pretrained": "openai", "epochs": 3, "depth": None, "seed": None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    assert c.prompts_dir() == Path("o") / "prompts" / f"vit-b-16-openai-{digest}"
    # the seed is part of random weights only
    assert ReproduceConfig("t", "r", seed=1).prompts_dir() == ReproduceConfig("t", "r", seed=2).prompts_dir()
    random = [ReproduceConfig("t", "r", pretrained="random", seed=s).prompts_dir() for s in (1, 2)]
    assert random[0] != random[1] and random[0].parent == Path("reproduction/prompts")
    assert random[0].name.startswith("vit-b-16-random-")
    weights = ReproduceConfig("t", "r", pretrained="/w/My_Weights.pt").prompts_dir().name
    assert weights.startswith("vit-b-16-my-weights-")
    assert ReproduceConfig("t", "r", depth=2).prompts_dir() != ReproduceConfig("t", "r").prompts_dir()


def test_departures_of_every_flag_in_words():
    c = ReproduceConfig("t", "r", model="tiny-clip", pretrained="random", limit=5, epochs=2, tta_views=8, depth=1,
                        stream_runs=3, tasks=4)
    assert c.departures() == [
        "model tiny-clip / weights random (published: ViT-B-16 / openai)",
        "--limit 5: only the first 5 test images of each cell",
        "--epochs 2: every preset trained for 2 epochs, not its own",
        "--tta-views 8: test-time adaptation on 8 views, not 64",
        "--depth 1: prompts 1 blocks deep, not 9 (for text towers with fewer blocks)",
        "--stream-runs 3: 3 stream orders per cell, not OGA's 100",
        "--tasks 4: 4 tasks or streams per scenario cell, not StatA's 1000 / 100",
    ]
    assert [d.split(":")[0] for d in c.departures(trains=False)] == [
        "model tiny-clip / weights random (published", "--limit 5", "--tta-views 8", "--stream-runs 3", "--tasks 4"]
    assert ReproduceConfig("t", "r").departures() == []
    assert ReproduceConfig("t", "r", model="ViT-B-16", pretrained="laion").departures() == [
        "model ViT-B-16 / weights laion (published: ViT-B-16 / openai)"]
    assert ReproduceConfig("t", "r", model="ViT-L-14").departures()[0].startswith("model ViT-L-14 / weights openai")


@pytest.mark.parametrize("flag, value", [("stream_runs", 1), ("stream_runs", MAX_RUNS), ("tasks", 1), ("tasks", MAX_RUNS)])
def test_run_counts_at_their_bounds_are_taken(flag, value):
    table = "oga-runs" if flag == "stream_runs" else "stata"
    check_run_counts(ReproduceConfig(table, "x", **{flag: value}))


@pytest.mark.parametrize("flag, value, message", [
    ("stream_runs", 0, "--stream-runs must be between 1 and 10000, got 0."),
    ("stream_runs", 10_001, "--stream-runs must be between 1 and 10000, got 10001."),
    ("tasks", 0, "--tasks must be between 1 and 10000, got 0."),
    ("tasks", 10_001, "--tasks must be between 1 and 10000, got 10001."),
])
def test_run_counts_out_of_range(flag, value, message):
    table = "oga-runs" if flag == "stream_runs" else "stata"
    with pytest.raises(ReproduceError) as err:
        check_run_counts(ReproduceConfig(table, "x", **{flag: value}))
    assert str(err.value) == message


def test_run_counts_only_where_the_cells_replay_them():
    with pytest.raises(ReproduceError) as err:
        check_run_counts(ReproduceConfig("stata", "x", stream_runs=2))
    assert str(err.value) == ("--stream-runs applies to tables whose cells replay stream orders (oga-runs); stata has "
                              "none: drop it.")
    with pytest.raises(ReproduceError) as err:
        check_run_counts(ReproduceConfig("oga-runs", "x", tasks=2))
    assert str(err.value) == "--tasks applies to tables whose cells replay a StatA scenario (stata); oga-runs has none: drop it."
    with pytest.raises(ReproduceError):
        check_run_counts(ReproduceConfig("tpt-ood", "x", tasks=2))
    check_run_counts(ReproduceConfig("tpt-ood", "x"))


@pytest.mark.parametrize("kw", [dict(workers=0), dict(workers=256), dict(batch_size=1), dict(batch_size=1_000_000),
                                dict(seed=-(2**63)), dict(seed=2**64 - 1), dict(limit=1, epochs=1, tta_views=1, depth=1)])
def test_validate_takes_the_bounds(kw, tmp_path):
    validate(ReproduceConfig("tpt-ood", str(tmp_path), out=str(tmp_path / "out"), **kw))


@pytest.mark.parametrize("kw, message", [
    (dict(limit=0), "--limit must be at least 1, got 0."),
    (dict(epochs=0), "--epochs must be at least 1, got 0."),
    (dict(tta_views=0), "--tta-views must be at least 1, got 0."),
    (dict(depth=0), "--depth must be at least 1, got 0."),
    (dict(workers=-1), "--workers must be between 0 and 256 (DataLoader processes), got -1."),
    (dict(workers=257), "--workers must be between 0 and 256 (DataLoader processes), got 257."),
    (dict(batch_size=0), "--batch-size must be between 1 and 1000000, got 0."),
    (dict(batch_size=1_000_001), "--batch-size must be between 1 and 1000000, got 1000001."),
    (dict(seed=-(2**63) - 1), f"--seed must be between {-(2**63)} and {2**64 - 1}, got {-(2**63) - 1}."),
    (dict(seed=2**64), f"--seed must be between {-(2**63)} and {2**64 - 1}, got {2**64}."),
    (dict(stream_runs=2), "--stream-runs applies to tables"),
])
def test_validate_refuses_out_of_range(kw, message, tmp_path):
    with pytest.raises(ReproduceError) as err:
        validate(ReproduceConfig("tpt-ood", str(tmp_path), out=str(tmp_path / "out"), **kw))
    assert str(err.value).startswith(message)


def test_validate_refuses_a_missing_root(tmp_path):
    with pytest.raises(ReproduceError) as err:
        validate(ReproduceConfig("tpt-ood", str(tmp_path / "none"), out=str(tmp_path / "out")))
    assert str(err.value) == f"--root {tmp_path / 'none'}: no such folder (the folder holding the datasets)."


# --------------------------------------------------------------------------------------------------
# render: whole TABLE.md files written out by hand from payloads written out by hand


def _e(ours, published=None, difference=None) -> dict:
    return {"ours": ours, "published": published, "difference": difference}


def _a(ours, published=None, difference=None, complete=0, of=2) -> dict:
    return {**_e(ours, published, difference), "complete": complete, "of": of}


def _table_payload() -> dict:
    return {
        "table": "mini", "title": "A title", "measures": ["top1", "ece"], "datasets": ["dtd", "eurosat"],
        "rows": [
            {"name": "CLIP", "note": "n1",
             "cells": {"dtd": {"top1": _e(40.0, 44.0, -4.0), "ece": _e(5.0)},
                       "eurosat": {"top1": _e(None, 48.0), "ece": _e(None)}},
             "averages": {"avg (2)": {"top1": _a(None, 46.5, None, 1), "ece": _a(None)}}},
            {"name": "Other", "note": "",
             "cells": {"dtd": {"top1": _e(30.256), "ece": _e(1.0, 2.0, -1.0)},
                       "eurosat": {"top1": _e(50.0, 49.5, 0.5), "ece": _e(3.0)}},
             "averages": {"avg (2)": {"top1": _a(40.128, complete=2), "ece": _a(2.0, 2.5, -0.5, 2)}}},
        ],
        "departures": ["d1"], "protocol_departures": ["p1", "p2"],
        "datasets_found": {"dtd": {"layout": "coop", "test_images": 1880, "published_test_images": 1880},
                           "eurosat": {"layout": "folder", "test_images": 10, "published_test_images": 8100}},
        "missing_datasets": {"oxford_pets": "missing: place it"}, "rows_not_run": {"Ext": "no --coop"},
        "notes": ["note a"],
        "cells": [
            {"key": "clip__dtd__all", "template_used": "{} texture.", "cost": {"seconds": 12.345},
             "settings": {"features": "clip", "split": "all", "n_classes": 47, "template_rule": "coop", "n_ctx": None,
                          "preset": None, "tta": None},
             "metrics": {"top1": 40.0, "n_images": 1880, "n_classes": 47}, "environment": {"device": "cpu"}},
            {"key": "other__dtd__all", "template_used": "a photo of a {}.", "cost": {"seconds": 0.0},
             "same_as": "clip__dtd__all",
             "settings": {"features": "prompts", "split": "base", "n_classes": 24, "template_rule": "tpt", "n_ctx": 4,
                          "preset": "cross_dataset",
                          "tta": {"method": "tpt", "views": 64, "selection": 0.1, "steps": 1, "lr": 0.005,
                                  "init": "prompts", "augmix": None}},
             "metrics": {"top1": 30.256}, "environment": {}},
        ],
        "prompts": {"cross_dataset": {"epochs": 10, "cost": {"seconds": 61.0}, "checkpoint": "p/c.pt"}, "b": {}},
        "run": {"table": "mini", "seed": 0}, "cost": {"evaluation_seconds": 12.345, "training_seconds": 61.0},
    }


def test_table_md_of_a_table_written_out_by_hand():
    figures = {"cost": Path("/x/t.cost.png"), "other": Path("a/t.other.png")}
    want = [
        "# mini", "", "A title", "",
        "Each cell: ours (published, ours − published). Averages and harmonic means are recomputed from the",
        "rows; the number in brackets under an average is the paper's printed average.", "",
        "## top-1 accuracy (%)", "",
        "| method | dtd | eurosat | avg (2) |", "| --- | --- | --- | --- |",
        "| CLIP | 40.00 (44.00, -4.00) | — (48.00) | — (1/2 cells) (46.50) |",
        "| Other | 30.26 | 50.00 (49.50, +0.50) | 40.13 |", "",
        "## expected calibration error (%)", "",
        "| method | dtd | eurosat | avg (2) |", "| --- | --- | --- | --- |",
        "| CLIP | 5.00 | — | — |",
        "| Other | 1.00 (2.00, -1.00) | 3.00 | 2.00 (2.50, -0.50) |", "",
        "![cost](t.cost.png)", "",
        "Average top-1 (and ECE) against GFLOPs per image, one point per row; hollow: the paper's number.", "",
        "![other](t.other.png)", "", "", "",
        "## This run departs from the published protocol", "", "- d1", "",
        "## Where protext still departs from the paper's setting", "", "- p1", "- p2", "",
        "## Datasets found", "", "| dataset | layout | test images | published test set |", "| --- | --- | --- | --- |",
        "| dtd | coop | 1880 | 1880 |",
        "| eurosat | folder | 10 (not the published test set: numbers are not comparable) | 8100 |", "",
        "## Missing datasets (not run)", "", "- oxford_pets: missing: place it", "",
        "## Rows not run", "", "- Ext: no --coop", "",
        "## Protocol notes", "", "- note a", "- CLIP: n1", "",
        "## Cells", "",
        "| cell | features | split | classes | template (rule) | n_ctx | preset | TTA | images | top-1 | seconds | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| clip__dtd__all | clip | all | 47 | `{} texture.` (coop) | — | — | — | 1880 | 40.00 | 12.3 | cpu |",
        "| other__dtd__all | prompts | base | 24 | `a photo of a {}.` (tpt) | 4 | cross_dataset | "
        "method tpt views 64 init prompts | ? | 30.26 | = clip__dtd__all | ? |", "",
        "## Prompts trained", "", "| preset | epochs | seconds | checkpoint |", "| --- | --- | --- | --- |",
        "| cross_dataset | 10 | 61.0 | p/c.pt |", "| b | ? | ? | ? |", "",
        "## Run", "", "- table: mini", "- seed: 0", "- device: cpu",
        "- seconds: evaluation 12.345, training 61.0", "",
    ]
    assert render_markdown(_table_payload(), figures).split("\n") == want


def test_table_md_leaves_out_what_is_empty():
    table = _table_payload()
    table.update(measures=["top1"], departures=[], datasets_found={}, missing_datasets={}, rows_not_run={}, prompts={},
                 cells=[], notes=[])
    table["rows"][0]["note"] = ""
    text = render_markdown(table)
    assert "## top-1" not in text and "![" not in text and "## This run departs" not in text
    assert "## Datasets found" not in text and "## Missing datasets" not in text and "## Rows not run" not in text
    assert "## Prompts trained" not in text
    assert "## Protocol notes\n\n\n## Cells" in text
    assert text.endswith("## Run\n\n- table: mini\n- seed: 0\n- seconds: evaluation 12.345, training 61.0\n")
    table["rows"] = []
    assert "| method | dtd | eurosat |\n| --- | --- | --- |\n\n" in render_markdown(table)


def _runs_payload() -> dict:
    one = {"complete": 1, "of": 1}
    return {
        "table": "r", "title": "T", "measures": ["top1", "eta", "spread"], "datasets": ["dtd"], "report_runs": True,
        "rows": [{"name": "Zero", "note": "",
                  "cells": {"dtd": {"top1": _e(40.0), "eta": _e(30.0), "spread": _e(0.0)}},
                  "averages": {"avg (1)": {"top1": {**_e(40.0, 41.0, -1.0), **one}, "eta": {**_e(30.0), **one},
                                           "spread": {**_e(0.0), **one}}}}],
        "pivot": {"average": "avg (1)", "settings": ["low", "high"], "methods": ["Zero", "S"], "cells": [
            {"method": "Zero", "setting": "low", "row": "Zero", "implemented": True, **_e(40.0, 41.0, -1.0), "eta": 30.0,
             "complete": 1, "of": 1},
            {"method": "Zero", "setting": "high", "row": "Zero", "implemented": True, **_e(None), "eta": None,
             "complete": 1, "of": 2},
            {"method": "S", "setting": "high", "row": None, "implemented": False, **_e(None, 70.0), "eta": None,
             "complete": 0, "of": 0}]},
        "published_only": [{"method": "T", "setting": "elsewhere", "published": 60.0}],
        "departures": [], "protocol_departures": ["p"], "datasets_found": {}, "missing_datasets": {}, "rows_not_run": {},
        "notes": [], "prompts": {}, "run": {"table": "r"}, "cost": {"evaluation_seconds": 5.0, "training_seconds": 0.0},
        "cells": [
            {"key": "tda__dtd__all", "template_used": "{} texture.", "environment": {"device": "cuda"},
             "settings": {"template_rule": "coop",
                          "tta": {"method": "tda", "views": 1, "init": "x", "augmix": False, "selection": None,
                                  "steps": 1, "lr": 0.1, "options": {"tda_alpha": 2.0}},
                          "runs": {"kind": "orders", "stream_runs": 100, "stream_seed": 42, "batch_size": 32,
                                   "last_batch": "kept, shorter", "k_min": None}},
             "metrics": {"top1": 40.0, "eta": 30.0, "spread": 1.234, "n_images": 1880},
             "cost": {"seconds": 3.0, "gflops_per_image": 35.123}},
            {"key": "zero__dtd__all", "template_used": "t", "environment": {}, "same_as": "x",
             "settings": {"template_rule": "coop", "tta": None}, "metrics": {"top1": 40.0}, "cost": {"seconds": 2.0}},
        ],
    }


def test_table_md_of_a_protocol_table_written_out_by_hand():
    want = [
        "# r", "", "T", "",
        "Each cell: ours (published, ours − published). Averages and harmonic means are recomputed from the",
        "rows; the number in brackets under an average is the paper's printed average.", "",
        "## avg (1) by method and setting", "",
        "Each cell: our mean (published, ours − published) · our ETA. Rows marked * are not implemented in protext: "
        "their published numbers only.", "",
        "| method / setting | low | high |", "| --- | --- | --- |",
        "| Zero | 40.00 (41.00, -1.00) · 30.00 | — (1/2 cells) |",
        "| S * |  | * (70.00) |", "",
        "## Published numbers without a row here", "",
        "Methods protext does not implement, or settings this table does not run; shown for reference only.", "",
        "| published method | setting | published |", "| --- | --- | --- |", "| T | elsewhere | 60.00 |", "",
        "## mean top-1 over the runs (%)", "",
        "| method | dtd | avg (1) |", "| --- | --- | --- |", "| Zero | 40.00 | 40.00 (41.00, -1.00) |", "",
        "## ETA: mean top-1 of the worst 10 % of runs (%)", "",
        "| method | dtd | avg (1) |", "| --- | --- | --- |", "| Zero | 30.00 | 30.00 |", "",
        "## spread: standard deviation of the per-run top-1 (points)", "",
        "| method | dtd | avg (1) |", "| --- | --- | --- |", "| Zero | 0.00 | 0.00 |", "",
        "## Where protext still departs from the paper's setting", "", "- p", "",
        "## Protocol notes", "", "",
        "## Cells", "",
        "| cell | template (rule) | TTA | runs | images | mean top-1 | ETA | spread | GFLOPs/image | seconds | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| tda__dtd__all | `{} texture.` (coop) | method tda views 1 augmix False options {'tda_alpha': 2.0} | "
        "kind orders stream_runs 100 stream_seed 42 batch_size 32 | 1880 | 40.00 | 30.00 | 1.23 | 35.1 | 3.0 | cuda |",
        "| zero__dtd__all | `t` (coop) | — |  | ? | 40.00 | ? | ? | ? | = x | ? |", "",
        "## Run", "", "- table: r", "- device: cuda", "- seconds: evaluation 5.0, training 0.0", "",
    ]
    assert render_markdown(_runs_payload()).split("\n") == want


def test_a_protocol_table_without_pivot_or_published_only_has_neither_section():
    table = _runs_payload()
    table.update(pivot=None, published_only=[])
    text = render_markdown(table)
    assert "by method and setting" not in text and "## Published numbers without a row here" not in text
    assert "## mean top-1 over the runs (%)" in text


def test_resolved_tta_in_the_plan_names_the_published_settings_and_the_init_and_seed_once():
    tpt = _line(describe_plan(ReproduceConfig("tpt-ood", "x")), "  tpt__imagenet_r__all:")
    settings = tpt.split(" tta=", 1)[1].split()
    # TPT (PUBLISHED.md): 64 views, 10 % kept, one step at 5e-3, no AugMix off the fine-grained sets, "a photo of a"
    assert settings[0] == "tpt" and settings[-1] == "init:handcrafted"
    assert [s for s in settings if s.split(":")[0] in ("views", "selection", "steps", "lr", "augmix")] == [
        "views:64", "selection:0.1", "steps:1", "lr:0.005", "augmix:False"]
    assert sum(s.startswith("init:") for s in settings) == 1 and not any(s.startswith("method:") for s in settings)
    zero = _line(describe_plan(ReproduceConfig("tta-ood", "x")), "  zero__imagenet__all:")
    settings = zero.split(" tta=", 1)[1].split()
    # ZERO (TTA.md §1): 64 views, 30 % kept, seed 1; it has no prompt init
    assert settings[0] == "zero" and settings[-1] == "seed:1" and "views:64" in settings and "selection:0.3" in settings
    assert not any(s.startswith(("init:", "method:")) for s in settings)


# --------------------------------------------------------------------------------------------------
# plan: against the survivors of its full mutmut run


def test_computation_does_not_depend_on_the_order_settings_were_written_in():
    def cell(tta: dict, runs: dict) -> Cell:
        return Cell("t", "r", "dtd", "all", "clip", "coop", "{} texture.", "coop", 47, tta=tta, runs=runs)

    one = cell({"method": "tda", "views": 1, "seed": 3}, {"kind": "orders", "runs": 3, "seed": 42})
    other = cell({"seed": 3, "views": 1, "method": "tda"}, {"seed": 42, "runs": 3, "kind": "orders"})
    assert one.computation() == other.computation()


def test_the_plan_shows_a_views_departure_and_a_rows_own_options_in_the_settings():
    tpt = _line(describe_plan(ReproduceConfig("tpt-ood", "x", tta_views=8)), "  tpt__imagenet_r__all:")
    assert "views:8" in tpt.split() and "views:64" not in tpt.split()  # the run's --tta-views, not TPT's 64
    tda = _line(describe_plan(ReproduceConfig("oga-runs", "x")), "  tda__dtd__all:")
    # OGA's TDA keeps 5 positive and 3 negative shots (TTA2.md §11), not TDA's own 3 and 2
    assert {"tda_positive_shots:5", "tda_negative_shots:3", "stream_update:batch"} <= set(tda.split())


def test_an_epochs_departure_is_listed_only_for_a_table_that_trains():
    departs = "  departs: --epochs 2: every preset trained for 2 epochs, not its own"
    assert departs in describe_plan(ReproduceConfig("protext-dg", "x", epochs=2)).splitlines()
    assert departs not in describe_plan(ReproduceConfig("tpt-ood", "x", epochs=2)).splitlines()


def test_only_prompts_take_their_training_template():
    rows = (Row("Trained", "prompts", "protext", preset="text_only/imagenet"),
            Row("Plain", "clip", "protext", preset="text_only/imagenet"))
    protocol = _protocol(datasets=("imagenet",), rows=rows, published={}, published_averages={}, averages=())
    cells = {c.row: c for c in plan_cells(protocol, ReproduceConfig("mini", "x"))}
    # prompts evaluated on the dataset they were trained on keep their training template; CLIP
    # features of a row that names a preset have no training, so they take the dataset's template
    assert cells["Trained"].template_source == "training template (in-domain prompts)"
    assert cells["Plain"].template_source == "protext rule"


def test_a_prompt_tuner_starts_from_a_photo_of_a_unless_told_otherwise():
    def spec(init):
        return TTASpec("tpt", views=None, selection=None, steps=None, lr=None, init=init)

    rows = (Row("Default", "clip", "tpt", tta=spec(None)), Row("Coop", "clip", "tpt", tta=spec("coop")),
            Row("Zero", "clip", "tpt", tta=TTASpec("zero", views=None, selection=None, steps=None, lr=None, init=None)))
    cells = {c.row: c for c in plan_cells(_protocol(rows=rows, published={}, published_averages={}),
                                          ReproduceConfig("mini", "x")) if c.dataset == "dtd"}
    # "a photo of a" is 4 context tokens (TPT's handcrafted init); a CoOp init brings its own
    # context, and ZERO tunes nothing
    assert (cells["Default"].n_ctx, cells["Coop"].n_ctx, cells["Zero"].n_ctx) == (4, None, None)


def test_cells_carry_their_table_and_rule_and_tpt_augments_only_fine_grained_sets():
    cells = plan_cells(_protocol(), ReproduceConfig("mini", "x"))
    assert {(c.table, c.row, c.template_rule) for c in cells} == {("mini", "CLIP", "coop"), ("mini", "Other", "tpt")}
    # TPT's AugMix views on the fine-grained sets, plain crops on ImageNet's variants (PUBLISHED.md)
    xd = _line(describe_plan(ReproduceConfig("tpt-xd", "x")), "  tpt__dtd__all:")
    assert "augmix:True" in xd.split()


def test_a_pivot_table_without_runs_builds_and_rows_keep_their_method():
    import dataclasses

    p = dataclasses.replace(_runs_protocol(), report_runs=False)
    config = ReproduceConfig("mini", "ROOT")
    cells = plan_cells(p, config)
    recs = {c.key: _record(c, 40.0) for c in cells if c.row == "Zero"}
    table = build_table(p, config, cells, _Folder(recs), Availability(present=list(_DATASETS)), None, {})
    # no runs, no eta: the table is still built, and shows no pivot (that layout reports runs)
    assert "pivot" not in table and table["rows"][0]["averages"]["avg (2)"]["top1"]["ours"] == 40.0
    tda = _protocol(rows=(Row("T", "clip", "coop", tta=TTASpec("tda", views=1, selection=None, steps=None, lr=None,
                                                                 init=None)),), published={}, published_averages={})
    row = _build(tda, {})[0]["rows"][0]
    assert row["tta"]["method"] == "tda" and row["tta"]["views"] == 1


def test_the_table_names_its_version_its_departures_and_rounds_its_cost():
    import protext

    trained = _protocol(rows=(Row("P", "prompts", "protext", preset="text_only/imagenet"),), published={},
                        published_averages={})
    table, cells = _build(trained, {}, epochs=2)
    assert table["protext_version"] == protext.__version__
    assert table["departures"][-1] == "--epochs 2: every preset trained for 2 epochs, not its own"
    assert trained.trains_prompts and not _protocol().trains_prompts
    assert not any(d.startswith("--epochs") for d in _build(_protocol(), {}, epochs=2)[0]["departures"])  # trains nothing
    config = ReproduceConfig("mini", "ROOT")
    cells = plan_cells(_protocol(), config)
    recs = {c.key: _record(c, 40.0, seconds=0.12345) for c in cells[:2]}
    prompts = {"a": {"cost": {"seconds": 0.12345}}, "b": {"cost": {}}}  # a record without its time counts 0
    table = build_table(_protocol(), config, cells, _Folder(recs), Availability(present=list(_DATASETS)), None, prompts)
    assert table["cost"] == {"evaluation_seconds": 0.247, "training_seconds": 0.123}  # to the millisecond


def test_a_given_depth_above_the_tower_is_refused_before_anything_loads(tmp_path):
    def check(**kw):
        validate(ReproduceConfig("protext-dg", str(tmp_path), out=str(tmp_path / "out"), model="tiny-clip", **kw))

    with pytest.raises(UserError) as err:
        check(depth=3)
    assert str(err.value) == "--depth 3: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less."
    check(depth=2)
    check()  # the preset's depth 9 is lowered when the table trains, not refused here


@pytest.mark.parametrize("out", ["taken", None])
def test_an_out_that_is_a_file_is_named_as_given(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("x")
    (tmp_path / "reproduction").write_text("x")  # where the results go without --out
    with pytest.raises(UserError) as err:
        validate(ReproduceConfig("tpt-ood", str(tmp_path), out=out))
    assert str(err.value) == f"--out {out or 'reproduction'} is a file, not a directory; give a directory."


def test_a_cells_settings_are_its_datasets_and_only_prompts_name_a_preset():
    tpt = TTASpec("tpt", views=None, selection=None, steps=None, lr=None, init=None, augmix=False,
                  augmix_by_dataset=(("dtd", True),))
    rows = (Row("T", "clip", "tpt", tta=tpt), Row("Plain", "clip", "protext", preset="text_only/imagenet"))
    cells = {(c.row, c.dataset): c for c in plan_cells(_protocol(rows=rows, published={}, published_averages={}),
                                                       ReproduceConfig("mini", "x"))}
    assert (cells[("T", "dtd")].tta["augmix"], cells[("T", "eurosat")].tta["augmix"]) == (True, False)
    assert cells[("Plain", "dtd")].preset is None and cells[("Plain", "dtd")].n_ctx is None


# --------------------------------------------------------------------------------------------------
# run folder: against the survivors of its mutmut run


def test_the_run_folder_records_its_run_and_refuses_a_cell_of_other_settings_or_format(tmp_path):
    folder = RunFolder(tmp_path / "out", tmp_path / "prompts")
    folder.open({"model": "m"}, "mini")
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {
        "format": "protext-reproduce/1", "table": "mini", "identity": {"model": "m"}}
    cell = plan_cells(_protocol(), ReproduceConfig("mini", "x"))[0]
    other = Cell(**{**cell.settings(), "template": "another {}."})
    for record in ({"format": "protext-reproduce-cell/1", "settings": other.settings()},  # right format, other settings
                   {"format": "protext-reproduce-cell/0", "settings": cell.settings()}):  # right settings, other format
        folder.write_cell(cell, record)
        with pytest.raises(ReproduceError) as err:
            folder.read_cell(cell)
        assert str(err.value) == (f"{folder.cell_file(cell)} is not this table's result for {cell.key} (other settings "
                                  "or format); delete it to recompute the cell.")


def test_a_damaged_or_non_object_json_file_is_refused_naming_it_and_the_way_out(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text("", encoding="utf-8")  # a file cut before its first byte
    with pytest.raises(ReproduceError) as err:
        read_json(path, "delete it")
    assert str(err.value) == (f"{path} is damaged or half-written (JSONDecodeError: Expecting value: line 1 column 1 "
                              "(char 0)); delete it.")
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ReproduceError) as err:
        read_json(path, "delete it")
    assert str(err.value) == f"{path} is not a JSON object; delete it."
    path.write_text('{"a": 1}', encoding="utf-8")
    assert read_json(path, "delete it") == {"a": 1}


def test_run_json_is_indented_json_and_a_rerun_with_the_same_flags_reuses_the_folder(tmp_path):
    folder = RunFolder(tmp_path / "out", tmp_path / "prompts")
    identity = {"model": "m", "seed": 1}
    assert folder.check(identity) is False  # nothing there yet
    folder.open(identity, "mini")
    run_json = tmp_path / "out" / "run.json"
    written = ('{\n  "format": "protext-reproduce/1",\n  "table": "mini",\n  "identity": {\n    "model": "m",\n'
               '    "seed": 1\n  }\n}\n')
    assert run_json.read_text(encoding="utf-8") == written
    assert folder.check(dict(identity)) is True
    folder.open(identity, "another table")  # the same run: nothing rewritten
    assert run_json.read_text(encoding="utf-8") == written


def test_another_runs_folder_is_refused_naming_every_setting_that_differs(tmp_path):
    folder = RunFolder(tmp_path / "out", tmp_path / "prompts")
    folder.open({"model": "m", "seed": 1, "epochs": 2}, "mini")
    with pytest.raises(ReproduceError) as err:
        folder.check({"model": "n", "seed": 1, "epochs": 3})
    assert str(err.value) == (f"--out {tmp_path / 'out'} holds another run (model 'm' there, 'n' now, epochs 2 there, "
                              "3 now); pass another --out or the same flags.")
    for saved in ('{"format": "protext-reproduce/1"}', '{"identity": ["m"]}'):  # no identity, or not an object
        (tmp_path / "out" / "run.json").write_text(saved, encoding="utf-8")
        with pytest.raises(ReproduceError) as err:
            folder.check({"model": "n"})
        assert str(err.value) == (f"--out {tmp_path / 'out'} holds another run (model None there, 'n' now); pass "
                                  "another --out or the same flags.")


def test_a_damaged_run_or_cell_file_names_its_own_way_out(tmp_path):
    folder = RunFolder(tmp_path / "out", tmp_path / "prompts")
    folder.open({"model": "m"}, "mini")
    run_json = tmp_path / "out" / "run.json"
    run_json.write_text("[]", encoding="utf-8")
    with pytest.raises(ReproduceError) as err:
        folder.check({"model": "m"})
    assert str(err.value) == f"{run_json} is not a JSON object; delete the folder or pass another --out."
    cell = plan_cells(_protocol(), ReproduceConfig("mini", "x"))[0]
    folder.cell_file(cell).parent.mkdir(parents=True)
    folder.cell_file(cell).write_text("[]", encoding="utf-8")
    with pytest.raises(ReproduceError) as err:
        folder.read_cell(cell)
    assert str(err.value) == f"{folder.cell_file(cell)} is not a JSON object; delete that file to recompute the cell."


def test_only_a_missing_or_empty_folder_becomes_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert RunFolder(tmp_path / "empty", tmp_path / "p").check({"model": "m"}) is False
    (tmp_path / "file").write_text("x", encoding="utf-8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x", encoding="utf-8")
    for name in ("file", "full"):
        with pytest.raises(ReproduceError) as err:
            RunFolder(tmp_path / name, tmp_path / "p").check({"model": "m"})
        assert str(err.value) == (f"--out {tmp_path / name} is not empty and has no run.json: not a protext reproduce "
                                  "folder; pass another --out.")
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x"  # nothing touched


# --------------------------------------------------------------------------------------------------
# descriptions: which datasets a table reads from CuPL's release, and the file each run keeps


def _cell(dataset: str, features: str = "clip", preset: Optional[str] = None) -> Cell:
    return Cell("mini", "R", dataset, "all", features, "coop", "a photo of a {}.", "coop", 2, preset=preset)


def test_imagenet_variants_read_imagenets_cupl_file_and_others_their_own():
    assert [cupl_source(d) for d in ("imagenet", "imagenet_a", "imagenet_sketch", "dtd", "eurosat")] == [
        "imagenet", "imagenet", "imagenet", "dtd", "eurosat"]


def test_gathered_descriptions_are_those_a_cell_scores_with_or_its_preset_trains_on(shared_dir):
    texture = json.loads((shared_dir / "cupl" / "texture_prompts_full.json").read_text(encoding="utf-8"))
    imagenet = json.loads((shared_dir / "classnames" / "imagenet.json").read_text(encoding="utf-8"))
    found = Availability(present=["dtd", "eurosat", "imagenet_a"],
                         classes={"dtd": ["gauzy", "banded"], "eurosat": ["Forest"], "imagenet_a": ["goldfish"]})
    cells = [_cell("dtd", "cupl"),                                 # scores with descriptions: dtd's, its classes only
             _cell("eurosat"),                                     # templates, no preset: needs none
             _cell("oxford_pets", "cupl"),                         # not under --root: needs none
             _cell("imagenet_a", preset="cross_dataset")]          # trained on ImageNet: all 1000 of its classes
    got = gather_descriptions(ReproduceConfig("mini", "ROOT", descriptions=str(shared_dir / "cupl")), cells, found)
    assert list(got) == ["dtd", "imagenet"]
    assert got["dtd"] == {"gauzy": texture["gauzy"], "banded": texture["banded"]}
    # keyed by class name: ImageNet's two "missile" and two "sunglasses" classes share one key each
    assert list(got["imagenet"]) == list(dict.fromkeys(imagenet)) and len(got["imagenet"]) == 998
    assert all(got["imagenet"][c] for c in imagenet)


def test_an_imagenet_variant_scored_with_descriptions_reads_imagenets_file_for_its_own_classes(shared_dir):
    found = Availability(present=["imagenet_r"], classes={"imagenet_r": ["goldfish", "tench"]})
    got = gather_descriptions(ReproduceConfig("mini", "ROOT", descriptions=str(shared_dir / "cupl")),
                              [_cell("imagenet_r", "cupl")], found)
    assert list(got) == ["imagenet_r"] and list(got["imagenet_r"]) == ["goldfish", "tench"]
    assert len(got["imagenet_r"]["tench"]) > 1


def test_gathering_without_a_release_folder_names_what_needs_it():
    found = Availability(present=["dtd", "eurosat"], classes={"dtd": ["banded"], "eurosat": ["Forest"]})
    cells = [_cell("dtd", "cupl"), _cell("eurosat", preset="text_only/eurosat")]
    with pytest.raises(ReproduceError) as err:
        gather_descriptions(ReproduceConfig("mini", "ROOT"), cells, found)
    assert str(err.value) == ("mini needs CuPL descriptions for dtd, eurosat: pass --descriptions DIR (CuPL's release "
                              "folder, as published at github.com/sarahpratt/CuPL).")
    assert gather_descriptions(ReproduceConfig("mini", "ROOT"), [_cell("dtd")], found) == {}


def test_a_run_keeps_the_descriptions_it_began_with_and_refuses_changed_ones(tmp_path):
    folder = RunFolder(tmp_path / "out", tmp_path / "prompts")
    data = {"banded": ["stripes.", "stripes."], "gauzy": ["thin cloth."]}  # a repeat is two samples
    path = materialise("REL", "dtd", data, folder)
    assert path == tmp_path / "out" / "descriptions" / "dtd.jsonl"
    written = path.read_bytes()
    assert materialise("REL", "dtd", dict(data), folder) == path and path.read_bytes() == written
    with pytest.raises(ReproduceError) as err:
        materialise("REL", "dtd", {**data, "gauzy": ["thick cloth."]}, folder)
    assert str(err.value) == (f"{path} differs from CuPL's file for dtd in REL: the descriptions changed since this run "
                              "began; pass another --out.")
    assert path.read_bytes() == written


# --------------------------------------------------------------------------------------------------
# availability: what a root holds of a table, what to place where for the rest, and --coop


def test_availability_lists_each_dataset_found_and_says_what_is_wrong_with_the_others(tmp_path, shared_dir):
    made = make_tree(tmp_path, ["dtd", "eurosat"], classes_per_dataset=2, shared=shared_dir)
    made["eurosat"].images["test"][0].path.unlink()  # listed but gone: incomplete
    found = check_datasets(_protocol(), str(tmp_path))
    assert found.present == ["dtd"] and list(found.classes) == ["dtd"] and len(found.classes["dtd"]) == 47
    assert found.classes["dtd"][:2] == ["banded", "blotchy"]
    assert found.found == {"dtd": {"layout": "coop", "folder": str(tmp_path / "dtd"), "test_images": 2,
                                   "published_test_images": 1692}}
    eurosat = dataset_status("eurosat", tmp_path)
    assert eurosat.state == "incomplete" and eurosat.problem and eurosat.fix
    assert found.missing["eurosat"] == f"incomplete: {eurosat.problem}; {eurosat.fix}"
    assert found.missing["oxford_pets"].startswith(f"missing: nothing of it under {tmp_path}; CoOp layout: "
                                                   f"{tmp_path / 'oxford_pets' / 'split_zhou_OxfordPets.json'}")
    assert list(found.missing) == ["eurosat", "oxford_pets"]


def test_a_root_with_none_of_the_tables_datasets_is_refused_with_the_first_fix(tmp_path):
    with pytest.raises(ReproduceError) as err:
        check_datasets(_protocol(), str(tmp_path))
    dtd = dataset_status("dtd", tmp_path)
    assert str(err.value) == (f"--root {tmp_path} holds none of mini's 3 datasets (dtd, eurosat, oxford_pets); for "
                              f"example missing: nothing of it under {tmp_path}; {dtd.fix}")


def test_coop_rows_run_only_from_a_coop_file_that_exists(tmp_path):
    external = _protocol(rows=(Row("CLIP", "clip", "coop"), Row("CoOp", "clip", "coop", external="coop")))
    coop = tmp_path / "coop.pth"
    assert check_external(ReproduceConfig("mini", "x"), _protocol()) is None  # no row needs it
    assert check_external(ReproduceConfig("mini", "x"), external) == (
        "needs CoOp's 16-shot ImageNet prompts (trained on images): pass --coop FILE")
    with pytest.raises(ReproduceError) as err:
        check_external(ReproduceConfig("mini", "x", coop=str(coop)), external)
    assert str(err.value) == f"--coop {coop}: no such file (CoOp's ImageNet prompt checkpoint, .pth)."
    coop.write_bytes(b"")
    assert check_external(ReproduceConfig("mini", "x", coop=str(coop)), external) is None


# --------------------------------------------------------------------------------------------------
# render: the rest of its survivors


def test_a_base_to_novel_table_titles_its_halves_and_the_harmonic_mean():
    table = _table_payload()
    half = {"base": _e(60.0), "novel": _e(40.0), "hm": _e(48.0)}
    average = {m: _a(None) for m in half}
    table.update(measures=["base", "novel", "hm"], datasets=["dtd"],
                 rows=[{"name": "CLIP", "note": "", "cells": {"dtd": half}, "averages": {"avg (1)": average}}])
    text = render_markdown(table)
    assert "## base\n\n| method | dtd | avg (1) |" in text and "## novel\n\n" in text
    assert "## harmonic mean\n\n| method | dtd | avg (1) |\n| --- | --- | --- |\n| CLIP | 48.00 | — |\n" in text


def test_a_cell_shows_the_classes_it_scored_and_a_protocol_cell_leaves_out_its_fixed_tta_settings():
    table = _table_payload()
    table["cells"][0]["metrics"]["n_classes"] = 200  # e.g. ImageNet-A: 200 of the 1000 classes
    table["cells"][0]["settings"]["n_classes"] = 1000
    assert "| clip__dtd__all | clip | all | 200 | `{} texture.` (coop) |" in render_markdown(table)
    runs = _runs_payload()
    runs["cells"][0]["settings"]["tta"]["selection"] = 0.1
    row = _line(render_markdown(runs), "| tda__dtd__all |")
    assert "| method tda views 1 augmix False options {'tda_alpha': 2.0} |" in row


@pytest.mark.parametrize("gflops, text", [(35.123, "35.1"), (2304.4, "2304"), (99.96, "100"), (100.4, "100"),
                                          (0.01234, "0.0123"), (12345.6, "12346")])
def test_gflops_per_image_read_as_plain_numbers(gflops, text):
    runs = _runs_payload()
    runs["cells"][0]["cost"]["gflops_per_image"] = gflops
    row = _line(render_markdown(runs), "| tda__dtd__all |")
    assert row.endswith(f"| 40.00 | 30.00 | 1.23 | {text} | 3.0 | cuda |")
