"""Metrics, calibration and result files, against values computed by hand from their definitions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protext.results import (
    Prediction,
    calibration_bins,
    compute_metrics,
    expected_calibration_error,
    merge_predictions,
    metrics_dict,
    predictions_from_logits,
    result_files,
    write_results,
)


def test_ece_by_hand_with_bin_edges():
    """20 bins, ``lower < conf <= upper``: 0.05 is the top of bin 0, 0.25 the top of bin 4, 1.0 of bin 19."""
    conf = [0.05, 0.25, 0.25, 0.26, 1.0, 0.999, 0.5]
    correct = [True, False, True, False, True, False, True]
    # bins by hand: (0, .05]: {0.05 ok}; (.2, .25]: {0.25 x, 0.25 ok}; (.25, .3]: {0.26 x};
    # (.45, .5]: {0.5 ok}; (.95, 1]: {1.0 ok, 0.999 x}
    n = 7
    want = (
        1 / n * abs(1.0 - 0.05)
        + 2 / n * abs(0.5 - 0.25)
        + 1 / n * abs(0.0 - 0.26)
        + 1 / n * abs(1.0 - 0.5)
        + 2 / n * abs(0.5 - (1.0 + 0.999) / 2)
    )
    assert expected_calibration_error(conf, correct) == pytest.approx(100 * want, abs=1e-12)
    bins = calibration_bins(conf, correct)
    assert [b.n for b in bins] == [1, 0, 0, 0, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[4].lower == 0.2 and bins[4].upper == 0.25 and bins[4].accuracy == 0.5


def test_ece_edge_goes_to_the_lower_bin_not_the_upper():
    # 0.5 sits in (0.45, 0.5]; if it went to (0.5, 0.55] the value would change (its confidence
    # would then share a bin with 0.52)
    assert expected_calibration_error([0.5, 0.52], [True, False]) == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 0.52))
    assert expected_calibration_error([0.0], [True]) == 0.0  # a confidence of 0 is in no bin
    assert expected_calibration_error([], []) == 0.0


def test_predictions_from_logits_confidence_and_calibration_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    calib = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    preds = predictions_from_logits([4, 9], [0, 2], logits, calibration_logits=calib)
    assert preds[0].topk == (0, 1, 2) and preds[0].calibration_pred == 1
    assert preds[0].confidence == pytest.approx(math.exp(3) / (math.exp(3) + 2))
    assert preds[1].confidence == pytest.approx(1 / 3)
    plain = predictions_from_logits([4], [0], logits[:1])
    assert plain[0].confidence == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1) + 1)) and plain[0].calibration_pred == 0


def _pred(index: int, label: int, topk: tuple[int, ...]) -> Prediction:
    return Prediction(index, label, topk, 0.9, topk[0])


def test_top5_and_mean_per_class_by_hand_with_seven_classes():
    names = [f"c{i}" for i in range(7)]
    preds = [
        _pred(0, 0, (0, 1, 2, 3, 4)),  # top-1 hit
        _pred(1, 0, (1, 2, 3, 4, 5)),  # miss, label 0 not in the top 5
        _pred(2, 0, (1, 0, 2, 3, 4)),  # top-5 hit only
        _pred(3, 3, (3, 0, 1, 2, 4)),  # top-1 hit
        _pred(4, 6, (0, 1, 2, 3, 4)),  # miss
        _pred(5, 6, (5, 4, 3, 2, 6)),  # top-5 hit at rank 5
    ]
    m = compute_metrics(preds, names)
    assert m.top1 == pytest.approx(100 * 2 / 6)
    assert m.top5 == pytest.approx(100 * 4 / 6)
    # per class: c0 1/3, c3 1/1, c6 0/2; classes without images are not in the mean
    assert m.mean_per_class == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)
    assert set(m.per_class) == {"c0", "c3", "c6"} and m.per_class["c6"] == {"accuracy": 0.0, "n": 2}
    d = metrics_dict(m)
    assert d["acc1"] == pytest.approx(2 / 6) and d["acc5"] == pytest.approx(4 / 6)
    assert d["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_ece_uses_the_calibration_prediction_not_the_final_one():
    # ZERO: the final prediction is right, view 0's (the calibration logits) is wrong
    p = Prediction(0, 1, (1, 0), confidence=0.8, calibration_pred=0)
    assert compute_metrics([p], ["a", "b"]).ece == pytest.approx(80.0)


def test_record_round_trip_and_merge():
    preds = predictions_from_logits([3, 1], [0, 1], torch.randn(2, 7, dtype=torch.float64).float(), keep_logits=True)
    back = [Prediction.from_record(json.loads(json.dumps(p.record()))) for p in preds]
    assert back == preds
    assert [p.index for p in merge_predictions([[back[0]], [back[1], back[0]]])] == [1, 3]
    other = Prediction(3, 0, (6, 5, 4, 3, 2), 0.5, 6)
    with pytest.raises(RuntimeError, match="image 3"):
        merge_predictions([[back[0]], [other]])


def test_write_results_files(tmp_path):
    preds = predictions_from_logits([0, 1, 2], [0, 1, 1], torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]))
    from protext.results import calibration_dict, predictions_table

    m = compute_metrics(preds, ["a", "b"])
    payload = {
        "dataset": {"name": "toy", "split": "all"},
        "method": "clip",
        "metrics": metrics_dict(m),
        "timing": {"seconds_per_image": 0.5},
        "calibration": calibration_dict(preds),
        "predictions": predictions_table(preds),
    }
    files = write_results(payload, tmp_path / "sub" / "r.json")
    assert files == result_files(tmp_path / "sub" / "r.json")
    assert json.loads(files["json"].read_text())["metrics"]["top1"] == pytest.approx(200 / 3)
    assert files["markdown"].read_text().startswith("| dataset | split | method |")
    assert files["reliability"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json", "r.md", "r.reliability.png"]


# ---- written against surviving mutants (mutmut): the JSON columns, the bins' count, the markdown


def test_predictions_table_columns_by_hand():
    from protext.results import Prediction, predictions_table

    preds = [
        Prediction(index=4, label=1, topk=(1, 0), confidence=0.75, calibration_pred=1),
        Prediction(index=9, label=0, topk=(2, 0), confidence=0.5, calibration_pred=2),
    ]
    assert predictions_table(preds) == {
        "index": [4, 9],
        "label": [1, 0],
        "topk": [[1, 0], [2, 0]],
        "confidence": [0.75, 0.5],
        "calibration_pred": [1, 2],
    }
    with_logits = [Prediction(index=0, label=0, topk=(0,), confidence=0.6, calibration_pred=0, logits=(2.0, 1.0))]
    assert predictions_table(with_logits)["logits"] == [[2.0, 1.0]]


def test_calibration_dict_uses_the_number_of_bins_asked_for():
    from protext.results import Prediction, calibration_dict

    preds = [
        Prediction(index=0, label=0, topk=(0,), confidence=0.3, calibration_pred=0),
        Prediction(index=1, label=1, topk=(0,), confidence=0.9, calibration_pred=0),
    ]
    four = calibration_dict(preds, n_bins=4)
    assert four["n_bins"] == 4 and four["rule"] == "lower < confidence <= upper"
    assert len(four["bins"]) == 4
    # 0.3 falls in (0.25, 0.5], 0.9 in (0.75, 1.0]; the first correct, the second wrong
    assert [b["n"] for b in four["bins"]] == [0, 1, 0, 1]
    assert [b["upper"] for b in four["bins"]] == [0.25, 0.5, 0.75, 1.0]
    assert [b["accuracy"] for b in four["bins"]] == [0.0, 1.0, 0.0, 0.0]
    assert len(calibration_dict(preds)["bins"]) == 20


def test_markdown_table_by_hand():
    from protext.results import markdown_table

    text = markdown_table([{"method": "clip", "top-1": 12.345, "images": 3}, {"method": "zero", "top-1": 50.0}])
    assert text == (
        "| method | top-1 | images |\n"
        "| --- | --- | --- |\n"
        "| clip | 12.35 | 3 |\n"
        "| zero | 50.00 |  |"
    )
    assert markdown_table([]) == ""


def test_prediction_record_round_trip():
    from protext.results import Prediction

    p = Prediction(index=3, label=2, topk=(2, 1, 0), confidence=0.25, calibration_pred=1, logits=(0.5, 1.5, 2.5))
    assert Prediction.from_record(p.record()) == p
    without = Prediction(index=1, label=0, topk=(0,), confidence=0.5, calibration_pred=0)
    assert "z" not in without.record() and Prediction.from_record(without.record()) == without
