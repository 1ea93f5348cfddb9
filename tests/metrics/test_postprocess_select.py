"""Choosing the retrieval post-processing on validation classes: the none baseline equals
retrieval_metrics, a method is kept only when its gain is above the noise, and none is chosen
where nothing helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tripletlab import InputError
from tripletlab.metrics import retrieval_metrics
from tripletlab.metrics.postprocess_select import (
    _bootstrap_se,
    _subsample_classes,
    choose_postprocess,
    postprocess_candidates,
    postprocessed_metrics,
)


def _noisy_clusters(n_cls=30, per=12, dim=16, noise=1.2, seed=0):
    """Gaussian classes with enough noise that averaging with neighbours (QE, DBA) helps."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cls, dim, generator=g)
    y = torch.arange(n_cls).repeat_interleave(per)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_none_is_retrieval_metrics():
    x, y = _noisy_clusters()
    got = postprocessed_metrics(x, y, "none", ks=(1, 4))
    ref = retrieval_metrics(x, y, ks=(1, 4), nmi=False)
    for key in ("precision_at_1", "recall_at_4", "r_precision", "map_at_r"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12)


def test_a_method_that_pays_is_kept_with_its_gain_and_noise():
    x, y = _noisy_clusters()
    c = choose_postprocess(x, y, n_boot=300)
    assert c["method"] != "none"
    assert c["validation_gain"] > max(2 * c["validation_gain_se"], 0.001)
    assert c["validation_map_at_r"] == pytest.approx(
        c["validation_map_at_r_none"] + c["validation_gain"]
    )
    assert c["spec"] == c["best_candidate"] and c["chosen_by"] == "validation"
    assert {r["spec"] for r in c["candidates"]} == {str(s) for s in postprocess_candidates(y)}


def test_none_where_nothing_can_gain():
    """Separated classes: raw MAP@R is 1, no candidate can beat it, none is the answer."""
    x, y = _noisy_clusters(noise=0.01)
    c = choose_postprocess(x, y, n_boot=100)
    assert c["validation_map_at_r_none"] == 1.0
    assert c["method"] == "none" and c["spec"] == "none" and c["params"] == {}
    assert c["validation_gain"] <= 0


def test_noise_decides_a_small_gain():
    """The same tiny gain is kept with a tight bootstrap and dropped with a loose one."""
    x, y = _noisy_clusters(n_cls=8, per=6, noise=1.0, seed=3)
    c = choose_postprocess(x, y, z=0.0, min_gain=0.0, n_boot=100)
    best = max(c["candidates"], key=lambda r: r["gain"])
    assert (c["method"] != "none") == (best["gain"] > 0)
    strict = choose_postprocess(x, y, z=1e6, n_boot=100)
    assert strict["method"] == "none" and strict["best_candidate"] == best["spec"]


def test_bootstrap_se_and_class_subsample():
    assert _bootstrap_se(np.array([1.0]), np.array([1.0]), 10, 0) == float("inf")
    assert _bootstrap_se(np.ones(5), np.ones(5), 50, 0) == 0.0  # every class gains the same
    y = torch.arange(10).repeat_interleave(torch.arange(1, 11))
    pick = _subsample_classes(y, 20, seed=0)
    kept = torch.unique(y[pick])
    assert len(pick) <= 20 and all(int((y[pick] == c).sum()) == int((y == c).sum()) for c in kept)


def test_degenerate_validation_sets():
    one = choose_postprocess(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), n_boot=10)
    assert one["method"] == "none" and one["validation_gain_se"] is None  # JSON-safe, no inf
    from tripletlab.metrics.evaluate import postprocess_line

    assert "no estimate of the noise" in postprocess_line(one, {})
    single = choose_postprocess(torch.randn(4, 4), torch.arange(4), n_boot=10)
    assert single["method"] == "none" and "skipped" in single
    with pytest.raises(InputError):
        postprocessed_metrics(torch.randn(1, 4), torch.zeros(1, dtype=torch.long), "dba")


def test_a_spec_k_above_the_set_is_clamped_with_a_note():
    x, y = _noisy_clusters(n_cls=3, per=3)
    with pytest.warns(UserWarning, match="larger than"):
        m = postprocessed_metrics(x, y, "dba:k=50")
    assert 0 <= m["map_at_r"] <= 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the grid over a tiny validation set: silent
        choose_postprocess(x, y, n_boot=20)
