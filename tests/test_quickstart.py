"""The README's main job, end to end on tiny-clip: descriptions -> train -> every method side by side."""

from __future__ import annotations

import json

from protext.checkpoint import load_prompts
from protext.descriptions import read_descriptions
from protext.example import EXAMPLE_PHOTOS, TTA_SHOWN
from protext.quickstart import main

METHODS = ["clip", "cupl", "prompts", *(f"prompts+{m}" for m in ("tpt", "ctpt", "zero", "tda", "mta"))]


def test_quickstart_runs_every_stage_and_reports_every_method(tmp_path, capsys):
    work = tmp_path / "qs"
    code = main(["--model", "tiny-clip", "--pretrained", "random", "--workdir", str(work),
                 "--epochs", "2", "--tta-views", "8", "--device", "cpu"])
    assert code == 0
    assert TTA_SHOWN == ("tpt", "ctpt", "zero", "tda", "mta")

    photos = sorted(p.parent.name for p in (work / "images").glob("*/*.png"))
    assert photos == sorted(EXAMPLE_PHOTOS)
    descriptions = read_descriptions(work / "llm_data" / "example.jsonl")
    assert sorted(descriptions) == sorted(EXAMPLE_PHOTOS) and all(len(v) >= 3 for v in descriptions.values())

    checkpoint = load_prompts(work / "checkpoints" / "example.safetensors")
    assert (checkpoint.n_ctx, checkpoint.depth, checkpoint.width) == (4, 2, 64)
    assert sorted(checkpoint.meta["classes"]) == sorted(EXAMPLE_PHOTOS)

    rows = json.loads((work / "results" / "summary.json").read_text())
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["n_images"] == len(EXAMPLE_PHOTOS)
        assert 0 <= row["top1"] <= row["top5"] <= 100 and 0 <= row["ece"] <= 100
        assert row["seconds_per_image"] > 0
    for method in ("tpt", "ctpt", "zero", "mta"):
        result = json.loads((work / "results" / f"prompts+{method}.json").read_text())
        assert result["tta"]["method"] == method and result["tta"]["settings"]["views"] == 8
        assert result["checkpoint"] is not None  # adapted from the learned prompts, not CLIP's template
    tda = json.loads((work / "results" / "prompts+tda.json").read_text())
    assert tda["tta"]["settings"]["views"] == 1  # one view on a plain folder, as published for the fine-grained sets

    table = capsys.readouterr().out
    assert "| prompts+mta |" in table and "chance-level" in table
    assert "$ python -m protext.eval --dataset folder" in table
