"""Issue 19, item 6: ``benchmarks/bench_tta.py --quick`` runs every method and the multi-method pass.

The quick path (tiny model, at most 8 views, one image, 47 classes) checks the machinery only: no
figure here is a timing assertion. What is checked is what the full run's table is made of: one row
per method with its views as the registry resolves them for DTD (capped at 8), every second figure
present, and the shared pass encoding fewer views than one by one with the same logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TEST_TIMEOUT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tta.py"
SHARED_PASS = ["zero", "tda", "mta", "dmn", "boost"]
# DTD's published views (registry.resolve(name, {}, registry.context("dtd")).views) capped at 8
QUICK_VIEWS = {"tpt": 8, "ctpt": 8, "zero": 8, "tda": 1, "tda-64": 8, "mta": 8, "otpt": 8, "dmn": 8,
               "dmn-oracle": 8, "dpe": 1, "boost": 8, "tps": 8}


def test_quick_run_has_every_method_and_the_shared_pass(tmp_path):
    out = tmp_path / "tta.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU, even on a machine with a GPU
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    runs = {r["method"]: r for r in report["runs"]}
    assert list(runs) == list(QUICK_VIEWS)
    assert {m: r["views"] for m, r in runs.items()} == QUICK_VIEWS
    for r in runs.values():
        assert r["classes"] == 47 and r["batch"] == 1 and r["images"] == 1 and len(r["top1"]) == 1
        assert 0 <= r["top1"][0] < 47
        assert r["rest_seconds_per_image"] >= 0 and r["image_seconds_per_image"] >= 0
    assert len(report["table"]) == 2 + len(QUICK_VIEWS)
    assert "rest × TPT" in report["table"][0]

    (shared,) = report["shared"]
    assert shared["methods"] == SHARED_PASS and shared["classes"] == 47
    recipes = {tuple(r["methods"]): (r["views"], r["augmix"], tuple(r["crop_scale"])) for r in shared["recipes"]}
    # on DTD: ZERO, MTA and BoostAdapter share 64 plain views, TDA has one, DMN-ZS its AugMix crops of (0.5, 1)
    assert recipes == {("zero", "mta", "boost"): (8, False, (0.08, 1.0)), ("tda",): (1, False, (0.08, 1.0)),
                       ("dmn",): (8, True, (0.5, 1.0))}
    assert (shared["views_encoded_shared"], shared["views_encoded_one_by_one"]) == (17, 33)
    assert shared["same_logits"] == shared["compared"] == len(SHARED_PASS)
    assert shared["one_by_one_over_shared"] > 0  # a ratio is printed; how large is not asserted

    assert report["machine_line"].startswith("machine: ")
    assert report["machine_line"] in done.stdout and "one by one ÷ shared" in done.stdout
