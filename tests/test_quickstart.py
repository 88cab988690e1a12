"""The README's main job, end to end on tiny-clip: descriptions -> train -> eval (4 methods)."""

from __future__ import annotations

import json

from protext.checkpoint import load_prompts
from protext.descriptions import read_descriptions
from protext.quickstart import EXAMPLE_PHOTOS, main


def test_quickstart_runs_every_stage_and_reports_four_methods(tmp_path, capsys):
    work = tmp_path / "qs"
    code = main(["--model", "tiny-clip", "--pretrained", "random", "--workdir", str(work),
                 "--epochs", "2", "--tpt-views", "8", "--device", "cpu"])
    assert code == 0

    photos = sorted(p.parent.name for p in (work / "images").glob("*/*.png"))
    assert photos == sorted(EXAMPLE_PHOTOS)
    descriptions = read_descriptions(work / "llm_data" / "example.jsonl")
    assert sorted(descriptions) == sorted(EXAMPLE_PHOTOS) and all(len(v) >= 3 for v in descriptions.values())

    checkpoint = load_prompts(work / "checkpoints" / "example.safetensors")
    assert (checkpoint.n_ctx, checkpoint.depth, checkpoint.width) == (4, 2, 64)
    assert sorted(checkpoint.meta["classes"]) == sorted(EXAMPLE_PHOTOS)

    rows = json.loads((work / "results" / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["clip", "cupl", "prompts", "prompts+tpt"]
    for row in rows:
        assert row["n_images"] == len(EXAMPLE_PHOTOS)
        assert 0 <= row["top1"] <= row["top5"] <= 100 and row["images_per_second"] > 0
    tpt = json.loads((work / "results" / "prompts+tpt.json").read_text())
    assert tpt["tpt"] is not None and tpt["metrics"]["n_images"] == 12

    table = capsys.readouterr().out
    assert "| prompts+tpt |" in table and "chance-level" in table
