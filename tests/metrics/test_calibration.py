"""Threshold calibration for a target FAR, with an identity-bootstrap interval (issue #24)."""

from math import erf, sqrt

import numpy as np
import pytest
import torch

from tripletlab.errors import InputError
from tripletlab.metrics.verification import (
    calibrate_threshold,
    identity_bootstrap,
    pairs_from_labels,
    threshold_at_far,
)

# impostor distance 0.8 + u_a + u_b + e, genuine 0.35 + v_a + e: identity effects make pairs that
# share an identity dependent, as faces are
SU, SV, SE = 0.06, 0.05, 0.08


def _draw(rng, n_id: int, per: int):
    y = np.repeat(np.arange(n_id), per)
    ids = y[pairs_from_labels(y)]
    same = ids[:, 0] == ids[:, 1]
    u, v = rng.normal(0, SU, n_id), rng.normal(0, SV, n_id)
    mean = np.where(same, 0.35 + v[ids[:, 0]], 0.8 + u[ids[:, 0]] + u[ids[:, 1]])
    return mean + rng.normal(0, SE, len(same)), same, ids


def _population_far(t: float) -> float:
    return 0.5 * (1 + erf((t - 0.8) / sqrt(2 * SU**2 + SE**2) / sqrt(2)))


def test_threshold_at_far_never_exceeds_the_target():
    rng = np.random.default_rng(0)
    d = np.round(rng.random(500), 2)  # many ties
    same = rng.random(500) < 0.2
    for target in (0.0, 0.01, 0.05, 0.3):
        t = threshold_at_far(d, same, target)
        assert (d[~same] <= t).mean() <= target
    with pytest.raises(InputError, match="impostor"):
        threshold_at_far(d, np.ones(500, bool), 0.01)


@pytest.mark.parametrize("rule", ["target-far", "best-accuracy"])
def test_interval_covers_the_far_on_fresh_people(rule):
    # over seeds, the 95% interval from 12 validation identities covers the FAR the threshold
    # has on new identities: on a large fresh test set and in the population
    n, hits_test, hits_pop = 40, 0, 0
    for seed in range(n):
        rng = np.random.default_rng(seed)
        d, same, ids = _draw(rng, 12, 8)
        cal = calibrate_threshold(
            distances=d,
            pair_labels=same,
            pair_ids=ids,
            target_far=0.01,
            rule=rule,
            seed=seed,
            n_boot=300,
        )
        lo, hi = cal["far_ci"]
        assert lo <= cal["far"] <= hi and hi < 0.25
        dt, st, _ = _draw(rng, 150, 4)
        hits_test += lo <= float((dt[~st] <= cal["threshold"]).mean()) <= hi
        hits_pop += lo <= _population_far(cal["threshold"]) <= hi
        if rule == "target-far":
            assert cal["far"] <= 0.01
    assert hits_test / n >= 0.85 and hits_pop / n >= 0.85


def test_pair_level_interval_would_be_too_narrow():
    # the reason for resampling identities: a fixed-threshold interval is narrower
    rng = np.random.default_rng(3)
    d, same, ids = _draw(rng, 20, 8)
    t = threshold_at_far(d, same, 0.02)
    fixed = identity_bootstrap(d, same, ids, t)
    full = identity_bootstrap(d, same, ids, t, target_far=0.02)
    assert full["far_ci"][1] - full["far_ci"][0] >= fixed["far_ci"][1] - fixed["far_ci"][0]
    assert "calibration resampled" in full["method"]


def test_warning_for_few_identities_or_pairs():
    rng = np.random.default_rng(1)
    d, same, ids = _draw(rng, 5, 10)
    cal = calibrate_threshold(distances=d, pair_labels=same, pair_ids=ids, target_far=0.01)
    assert "only 5 identities" in cal["warning"] and cal["n_identities"] == 5
    cal = calibrate_threshold(distances=d, pair_labels=same, pair_ids=ids, target_far=0.0001)
    assert "impostor pairs" in cal["warning"]
    d, same, ids = _draw(rng, 20, 6)
    assert calibrate_threshold(distances=d, pair_labels=same, pair_ids=ids)["warning"] is None


def test_from_embeddings_and_bad_input():
    y = torch.arange(12).repeat_interleave(4)
    emb = torch.nn.functional.one_hot(y, 12).float() + 0.3 * torch.randn(48, 12)
    cal = calibrate_threshold(emb, y, distance="cosine", target_far=0.05)
    assert cal["far"] <= 0.05 and 0 <= cal["tar_ci"][0] <= cal["tar"] <= cal["tar_ci"][1] <= 1
    with pytest.raises(InputError, match="rule"):
        calibrate_threshold(emb, y, rule="median")
    with pytest.raises(InputError, match="target_far"):
        calibrate_threshold(emb, y, target_far=1.5)
