"""Verification metrics vs scikit-learn and brute force over every threshold; pair sampling;
the AT&T protocol. (Bad embeddings/labels are in the shared table of
test_metrics_retrieval.py; the cases here are specific to pairs.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from tripletlab import InputError
from tripletlab.metrics import (
    best_threshold,
    pair_distances,
    pairs_from_labels,
    verification_metrics,
)

from conftest import SHARED_DATA

ATT = SHARED_DATA / "att_faces"


def _data(n=45, d=4, n_cls=5, seed=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, n_cls, n)


def _brute_pairs(emb, y, distance):
    d, same = [], []
    for i in range(len(emb)):
        for j in range(i + 1, len(emb)):
            a, b = emb[i], emb[j]
            if distance == "cosine":
                d.append(1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            else:
                d.append(float(np.sqrt(((a - b) ** 2).sum())))
            same.append(y[i] == y[j])
    return np.array(d), np.array(same)


def _rates(d, same, t):
    """(TAR, FAR) of the rule 'same iff d <= t'."""
    return float((d[same] <= t).mean()), float((d[~same] <= t).mean())


def _brute_best(d, same):
    cands = np.concatenate([[-np.inf], np.unique(d)])
    return max(float(((d <= t) == same).mean()) for t in cands)


def _check_against_bruteforce(m, d, same, fars=(1e-3, 1e-2)):
    assert m["roc_auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-12)
    assert m["n_pairs_same"] == same.sum() and m["n_pairs_diff"] == (~same).sum()
    best = _brute_best(d, same)
    assert m["accuracy"] == pytest.approx(best)
    assert float(((d <= m["threshold"]) == same).mean()) == pytest.approx(best)
    rates = [_rates(d, same, t) for t in np.concatenate([[-np.inf], np.unique(d)])]
    for far in fars:  # TAR at the largest threshold with FAR <= far
        assert m["tar_at_far"][far] == pytest.approx(max(ta for ta, fa in rates if fa <= far))
    # EER: where FAR = FRR on the (interpolated) ROC; it is bracketed by the best threshold
    # points on either side of the crossing
    lo = max(min(fa, 1 - ta) for ta, fa in rates)
    hi = min(max(fa, 1 - ta) for ta, fa in rates)
    assert lo - 1e-12 <= m["eer"] <= hi + 1e-12
    # the error rates of the calibrated threshold itself
    ta, fa = _rates(d, same, m["threshold"])
    assert m["tar_at_threshold"] == pytest.approx(ta) and m["far_at_threshold"] == pytest.approx(fa)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_all_pairs_against_sklearn_and_bruteforce(distance):
    emb, y = _data()
    m = verification_metrics(emb, y, distance=distance, return_curve=True)
    d, same = _brute_pairs(emb, y, distance)
    np.testing.assert_allclose(m["pair_distances"], d, atol=1e-12)
    assert np.array_equal(m["pair_same"], same)
    _check_against_bruteforce(m, d, same)
    assert (np.diff(m["fpr"]) >= 0).all() and (np.diff(m["tpr"]) >= 0).all()
    assert (np.diff(m["thresholds"]) > 0).all() and m["thresholds"][0] == -np.inf
    assert m["fpr"][-1] == m["tpr"][-1] == 1.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.integers(2, 12), n=st.integers(4, 60))
def test_tied_distances_against_bruteforce(seed, levels, n):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, levels, n) / levels  # heavy ties
    same = rng.random(n) < 0.4
    if same.all() or not same.any():
        same[0], same[-1] = True, False
    m = verification_metrics(distances=d, pair_labels=same, fars=(0.1, 0.5))
    _check_against_bruteforce(m, d, same, fars=(0.1, 0.5))


def test_ten_fold_is_lfw_protocol():
    """Each fold is scored with the best-accuracy threshold of the other nine; folds are the
    documented seeded assignment permutation % 10."""
    emb, y = _data(60, 3, 4, 1)
    m = verification_metrics(emb, y, distance="euclidean", seed=5)
    d, same = _brute_pairs(emb, y, "euclidean")
    fold = np.random.default_rng(5).permutation(len(d)) % 10
    accs = []
    for f in range(10):
        train = fold != f
        cands = np.concatenate([[-np.inf], np.unique(d[train])])
        acc_t = [float(((d[train] <= t) == same[train]).mean()) for t in cands]
        t, _ = best_threshold(d[train], same[train])
        assert float(((d[train] <= t) == same[train]).mean()) == pytest.approx(max(acc_t))
        accs.append(float(((d[~train] <= t) == same[~train]).mean()))
    assert m["accuracy_10fold_mean"] == pytest.approx(np.mean(accs))
    assert m["accuracy_10fold_std"] == pytest.approx(np.std(accs))
    assert m["accuracy_10fold_mean"] <= m["accuracy"] + 0.05


def test_perfect_separation_and_explicit_pairs():
    d = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    same = np.array([1, 1, 1, 0, 0])
    m = verification_metrics(distances=d, pair_labels=same)
    assert m["roc_auc"] == 1.0 and m["eer"] == 0.0 and m["accuracy"] == 1.0
    assert 0.3 <= m["threshold"] < 0.8 and m["tar_at_far"][0.001] == 1.0
    assert m["accuracy_10fold_mean"] == 1.0
    emb = np.array([[0.0, 0], [0, 0.1], [3, 0], [3, 0.2]])
    pairs = np.array([[0, 1], [2, 3], [0, 2], [1, 3]])
    m1 = verification_metrics(emb, pairs=pairs, pair_labels=[1, 1, 0, 0], distance="euclidean")
    m2 = verification_metrics(emb, [0, 0, 1, 1], pairs=pairs, distance="euclidean")
    assert m1["roc_auc"] == m2["roc_auc"] == 1.0 and m1["threshold"] == m2["threshold"]
    assert m1["n_pairs_same"] == 2 and 0.2 <= m1["threshold"] < 3.0


def test_best_threshold_edge_cases():
    t, acc = best_threshold(np.array([1.0, 2.0]), np.array([False, False]))
    assert acc == 1.0 and t < 1.0  # accept nothing
    t, acc = best_threshold(np.array([1.0, 2.0]), np.array([True, True]))
    assert acc == 1.0 and t >= 2.0  # accept everything
    a = 1e8
    b = np.nextafter(a, np.inf)  # adjacent floats: no float strictly between them
    d, same = np.array([a, b]), np.array([True, False])
    t, acc = best_threshold(d, same)
    assert acc == 1.0 and ((d <= t) == same).all()
    t, acc = best_threshold(np.array([1e8, 1e8 + 2]), np.array([False, True]))
    assert acc == 0.5 and t < 1e8  # equally good cuts: the one accepting fewest pairs


def test_att_protocol_pair_counts():
    """AT&T protocol: 10 identities x 10 images -> 450 same and 4,500 different pairs."""
    y = np.repeat(np.arange(10), 10)
    emb = np.random.default_rng(0).normal(size=(100, 8))
    m = verification_metrics(emb, y)
    assert (m["n_pairs_same"], m["n_pairs_diff"]) == (450, 4500)


@pytest.mark.skipif(not ATT.exists(), reason=f"real data att_faces not found at {ATT}")
def test_att_raw_pixels_reproduce_reference_figures():
    """s31-s40 raw pixels at 46x56, cosine: the data README's reference AUC 0.936, EER 13.9%."""
    from PIL import Image

    x, y = [], []
    for s in range(31, 41):
        for f in sorted((ATT / f"s{s}").glob("*.pgm")):
            img = Image.open(f).convert("L").resize((46, 56), Image.BILINEAR)
            x.append(np.asarray(img, dtype=np.float32).ravel() / 255.0)
            y.append(s)
    m = verification_metrics(np.stack(x), np.array(y), distance="cosine")
    assert (m["n_pairs_same"], m["n_pairs_diff"]) == (450, 4500)
    assert m["roc_auc"] == pytest.approx(0.936, abs=0.01)
    assert m["eer"] == pytest.approx(0.139, abs=0.01)


def test_pair_sampling():
    y = np.zeros(1000, dtype=int)
    p = pairs_from_labels(y, max_pairs=5000, seed=3)
    assert p.shape == (5000, 2) and (p[:, 0] < p[:, 1]).all() and p.max() < 1000
    assert len({tuple(r) for r in p}) == 5000
    assert np.array_equal(p, pairs_from_labels(y, max_pairs=5000, seed=3))
    assert not np.array_equal(p, pairs_from_labels(y, max_pairs=5000, seed=4))
    # the index -> (i, j) inversion is a bijection: sampling all but one pair of a small set
    small = pairs_from_labels(np.zeros(30, dtype=int), max_pairs=434, seed=0)
    assert len({tuple(r) for r in small}) == 434 and (small[:, 0] < small[:, 1]).all()
    full = pairs_from_labels(np.zeros(30, dtype=int))
    assert len(full) == 435 and {tuple(r) for r in small} < {tuple(r) for r in full}
    # roughly uniform: every item appears about equally often
    counts = np.bincount(p.ravel(), minlength=1000)
    assert counts.mean() == 10.0 and counts.std() < 5
    # sampled pairs give the metrics on that sample
    emb, yy = _data(300, 4, 6, 2)
    m = verification_metrics(emb, yy, max_pairs=2000, seed=1, distance="euclidean")
    assert m["n_pairs_same"] + m["n_pairs_diff"] == 2000
    pp = pairs_from_labels(yy, max_pairs=2000, seed=1)
    d = pair_distances(emb, pp, "euclidean")
    same = yy[pp[:, 0]] == yy[pp[:, 1]]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(same, -d))


def test_pair_distances():
    emb = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
    assert pair_distances(emb, [[0, 1], [0, 2]], "euclidean") == pytest.approx(
        [np.sqrt(9 + 9), 5.0]
    )
    assert pair_distances(emb, [[0, 1]], "cosine") == pytest.approx([1 - 4 / 5])
    assert pair_distances(emb, np.zeros((0, 2), dtype=int)).shape == (0,)


BAD = [
    (lambda: verification_metrics(np.zeros((4, 2)), np.arange(4)), "same"),  # no same pair
    (lambda: verification_metrics(np.zeros((4, 2)), np.zeros(4, dtype=int)), "same"),
    (lambda: verification_metrics(np.zeros((4, 2))), "labels"),
    (lambda: verification_metrics(), "embeddings"),
    (lambda: verification_metrics(np.zeros((4, 2)), pairs=[[0, 1]]), "pair_labels"),
    (lambda: verification_metrics(np.zeros((4, 2)), pairs=[[0, 9]], pair_labels=[1]), "range"),
    (lambda: verification_metrics(np.zeros((4, 2)), pairs=[[0, -1]], pair_labels=[1]), "range"),
    (lambda: verification_metrics(np.zeros((4, 2)), pairs=[0, 1], pair_labels=[1]), "shape"),
    (lambda: verification_metrics(np.zeros((4, 2)), pairs=[[0.0, 1]], pair_labels=[1]), "int"),
    (lambda: verification_metrics(distances=[0.1, 0.2], pair_labels=[1]), "pair_labels"),
    (lambda: verification_metrics(distances=[0.1, 0.2], pair_labels=[1, 2]), "0/1"),
    (lambda: verification_metrics(distances=[0.1, 0.2]), "pair_labels"),
    (lambda: verification_metrics(distances=[0.1, np.nan], pair_labels=[1, 0]), "NaN"),
    (lambda: verification_metrics(distances=[[0.1]], pair_labels=[1]), "1-D"),
    (lambda: verification_metrics(distances=[0.1, 0.2], pair_labels=[1, 0], fars=(0,)), "fars"),
    (lambda: verification_metrics(distances=[0.1, 0.2], pair_labels=[1, 0], fars=(2,)), "fars"),
    (lambda: verification_metrics(distances=[0.1, 0.2], pair_labels=[1, 0], n_folds=1), "n_fold"),
    (lambda: verification_metrics(np.zeros((4, 2)), np.arange(4), max_pairs=0), "max_pairs"),
    (lambda: pairs_from_labels(np.zeros(100_000)), "max_pairs"),  # ~5e9 pairs: refuse
    (lambda: pair_distances(np.zeros((4, 2)), [[0, 1, 2]]), "shape"),
]


@pytest.mark.parametrize("call, words", BAD)
def test_bad_inputs(call, words):
    with pytest.raises(InputError, match=words):
        call()
