"""Keep what the backbone knew (train/robust.py): the guard, whitening shrinkage, WiSE-FT
interpolation, L2-SP and LP-FT; a synthetic case where training hurts off-domain."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tripletlab.errors import InputError
from tripletlab.losses.triplet import TripletLoss
from tripletlab.metrics import retrieval_metrics
from tripletlab.models.backbones import MobileNetV2
from tripletlab.rundir.files import load_weights
from tripletlab.samplers import PKSampler
from tripletlab.train import Trainer, load_run
from tripletlab.train.config import resolve_config
from tripletlab.train.robust import (
    ALPHA_GRID,
    candidates,
    interpolate_state,
    l2sp_penalty,
    parse_interpolate,
    parse_shrink,
    pick,
)

from conftest import make_image_folder


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is several times faster than many on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ pure functions
def test_interpolation_ends_are_exactly_the_start_and_the_trained_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    bn = torch.nn.BatchNorm1d(3)
    start = {**a.state_dict(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    bn.num_batches_tracked += 7
    trained = {**b.state_dict(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    s0, s1 = interpolate_state(start, trained, 0.0), interpolate_state(start, trained, 1.0)
    assert all(torch.equal(s0[k], start[k]) for k in start)
    assert all(torch.equal(s1[k], trained[k]) for k in trained)
    half = interpolate_state(start, trained, 0.5)
    assert torch.allclose(half["weight"], (start["weight"] + trained["weight"]) / 2)
    assert int(half["bn.num_batches_tracked"]) == 7  # counters: the trained ones
    with pytest.raises(InputError, match="keys differ"):
        interpolate_state(start, {"weight": b.weight}, 0.5)


def test_pick_prefers_the_simpler_candidate_on_ties_and_ignores_missing_scores():
    assert pick([("untrained", 0.5), ("start", 0.5), ("trained", 0.4)]).name == "untrained"
    assert pick([("untrained", None), ("start", 0.3), ("trained", 0.4)]).name == "trained"
    got = pick([("a", 0.1), ("b", 0.2)])
    assert (got.name, got.score, got.scores) == ("b", 0.2, {"a": 0.1, "b": 0.2})


def test_option_values_parse_and_bad_ones_are_named():
    assert parse_interpolate("auto") == ALPHA_GRID and parse_interpolate("none") is None
    assert parse_interpolate("0.25") == (0.25,)
    assert parse_shrink("lw") == (None,) and parse_shrink("1") == (1.0,)
    for bad in ("1.5", "half", "-0.1"):
        with pytest.raises(InputError, match="--interpolate"):
            parse_interpolate(bad)
        with pytest.raises(InputError, match="--whiten-shrink"):
            parse_shrink(bad)
    with pytest.raises(InputError, match="anchor-weights"):
        resolve_config(overrides={"anchor_weights": -1.0})
    with pytest.raises(InputError, match="lp-ft"):
        resolve_config(overrides={"pretrained": True, "lp_ft": True, "freeze_stages": "all"})


def test_cli_flags_parse_into_the_config():
    import argparse

    from tripletlab.cli.train import add_config_flags, config_overrides

    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(
        "--pretrained --freeze-stages 0 --whiten-shrink 0.3 --whiten-power 0.4 "
        "--interpolate 0.5 --anchor-weights 0.01 --no-guard --lp-ft".split()
    )
    cfg = resolve_config(overrides=config_overrides(args))
    assert (cfg.whiten_shrink, cfg.whiten_power, cfg.interpolate) == ("0.3", 0.4, "0.5")
    assert (cfg.anchor_weights, cfg.guard, cfg.lp_ft) == (0.01, False, True)
    default = resolve_config()
    assert (default.whiten_shrink, default.interpolate, default.guard) == ("auto", "auto", True)


def test_l2sp_penalty_is_zero_at_the_start_and_pulls_back():
    lin = torch.nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    pen = l2sp_penalty(lin, start, 2.0)
    assert float(pen.detach()) == pytest.approx(6.0)  # 2/2 * 6 entries * 1^2
    pen.backward()
    assert torch.allclose(lin.weight.grad, 2.0 * torch.ones(2, 3))


# ------------------------------------------------------------------ the synthetic domain shift
def _domain(n_classes: int, per_class: int, spurious: bool, seed: int):
    """8-d features: dims 0-3 a weak identity signal shared by both domains, dims 4-7 noise;
    in domain A (``spurious``) dim 4 separates the classes strongly, in domain B it is noise
    (lighting that differs between cameras)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(n_classes, 4, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 8, generator=g) * 0.6
    x[:, :4] += centre[y]
    if spurious:
        x[:, 4] += 4.0 * torch.randn(n_classes, generator=g)[y]
    else:
        x[:, 4] += 4.0 * torch.randn(len(y), generator=g)
    return x, y


def _map_at_r(model, x, y) -> float:
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(x), dim=1)
    return float(retrieval_metrics(emb, y, ks=(1,), nmi=False)["map_at_r"])


def test_training_that_hurts_off_domain_is_undone_by_the_guard_and_interpolation():
    torch.manual_seed(0)
    xa, ya = _domain(20, 8, spurious=True, seed=1)  # training source
    xb, yb = _domain(12, 8, spurious=False, seed=2)  # validation source (other domain)
    xt, yt = _domain(12, 8, spurious=False, seed=3)  # test people of the other domain
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():  # the "pretrained" start: plain features, but dim 4 damped
        model.weight.copy_(torch.diag(torch.tensor([1, 1, 1, 1, 0.05, 1, 1, 1.0])))
        model.bias.zero_()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    untrained = {"weight": torch.eye(8), "bias": torch.zeros(8)}
    loss_fn, opt = TripletLoss(strategy="semihard"), torch.optim.Adam(model.parameters(), 0.05)
    sampler = PKSampler(ya, p=8, k=4, seed=0)
    for _, idx in zip(range(100), (i for _ in range(100) for i in sampler), strict=False):
        opt.zero_grad()
        loss_fn(torch.nn.functional.normalize(model(xa[idx]), dim=1), ya[idx]).backward()
        opt.step()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = {}
    for name, w in (("start", start), ("trained", trained)):
        model.load_state_dict(w)
        scores[name] = (_map_at_r(model, xa, ya), _map_at_r(model, xt, yt))
    assert scores["trained"][0] > scores["start"][0]  # better on its own domain ...
    assert scores["trained"][1] < scores["start"][1] - 0.05  # ... clearly worse off it

    def on_b(w):  # validation on the other source
        model.load_state_dict(w)
        return _map_at_r(model, xb, yb)

    pool = candidates(start, trained, untrained, ALPHA_GRID)
    assert [n for n, _ in pool] == [
        "untrained", "start", "alpha=0.25", "alpha=0.5", "alpha=0.75", "trained"
    ]  # fmt: skip
    chosen = pick([(n, on_b(w)) for n, w in pool])
    assert chosen.name != "trained"
    model.load_state_dict(dict(pool)[chosen.name])
    assert _map_at_r(model, xt, yt) >= scores["start"][1] - 0.02  # the start's score is back


# ------------------------------------------------------------------ whitening that survives N < D
def test_shrunk_whitening_with_fewer_samples_than_dimensions_is_finite():
    from tripletlab.models.backbones import BackboneEmbedding

    m = BackboneEmbedding([1, 32, 32], blocks=[3, 6], embedding_dim=56, freeze_stages="all")
    feats = torch.randn(10, m.num_features) * torch.linspace(0.01, 3, m.num_features)
    for shrink in (0.0, 0.1, 0.5, 1.0, None):
        d = m.init_whitening(feats, shrink=shrink)
        assert d <= 9  # never more dimensions than the data supports (rank N - 1)
        assert torch.isfinite(m.proj.weight).all() and torch.isfinite(m.proj.bias).all()
        emb = m.head(feats)
        assert torch.isfinite(emb).all()
    assert 0.0 < m.whiten_shrink <= 1.0  # Ledoit-Wolf's estimate for N << D
    assert m.init_identity(feats)
    assert torch.allclose(m.head(feats), torch.nn.functional.normalize(feats), atol=1e-6)


def test_shrink_zero_is_plain_whitening_and_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    from tripletlab.models.backbones import BackboneEmbedding, ledoit_wolf_shrinkage

    torch.manual_seed(0)
    m = BackboneEmbedding([1, 32, 32], blocks=[3], embedding_dim=24, normalize=False)
    feats = torch.randn(3000, 24) @ torch.randn(24, 24) + 1.0
    assert m.init_whitening(feats, shrink=0.0) == 24
    with torch.no_grad():
        z = m.proj(feats)
    assert torch.allclose(torch.cov(z.T, correction=0), torch.eye(24), atol=1e-3)
    assert ledoit_wolf_shrinkage(feats) < 0.05  # N >> D: hardly any shrinkage estimated
    for n, d in ((3000, 24), (20, 60)):  # both ways of computing it
        x = torch.randn(n, d).double() * torch.linspace(0.1, 2, d).double()
        expected = sk.ledoit_wolf(x.numpy())[1]
        assert ledoit_wolf_shrinkage(x) == pytest.approx(expected, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------ the trainer
@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", n_classes=8, per_class=6, size=(16, 12))


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "random_mobilenet.safetensors"  # stands in for ImageNet weights
    torch.manual_seed(0)
    save_file(MobileNetV2(num_classes=0).state_dict(), str(path))
    return path


def _cfg(tmp_path, folder, weights, name, **kw):
    base = {
        "data": str(folder), "out": str(tmp_path / name), "weights": str(weights),
        "image_size": [32, 32], "feature_blocks": [3, 6], "steps": 6, "eval_every": 3,
        "p": 3, "k": 3, "val_fraction": 0.3, "test_fraction": 0.25, "quiet": True,
        "report": False, "threads": 1, "device": "cpu", "stream": False,
    }  # fmt: skip
    return resolve_config(overrides={**base, **kw})


def test_frozen_run_scores_candidates_records_them_and_still_loads(tmp_path, folder, weights):
    lines = []
    cfg = _cfg(tmp_path, folder, weights, "guarded")
    trainer = Trainer(cfg, log=lines.append)
    result = trainer.fit()
    text = "\n".join(lines)
    assert "guard: the untrained backbone's features (no head) score" in text
    assert "shrinkage" in text and "chosen on validation map_at_r" in text
    kept, whitening = result["kept"], result["whitening"]
    assert set(kept["val_scores"]) == {
        "untrained", "start", "alpha=0.25", "alpha=0.5", "alpha=0.75", "trained"
    }  # fmt: skip
    assert kept["kept"] == pick(list(kept["val_scores"].items())).name
    assert set(whitening["val_scores"]) == {"0", "0.1", "0.3", "0.6", "1"}
    saved = json.loads((tmp_path / "guarded" / "eval.json").read_text())
    assert saved["kept"]["kept"] == kept["kept"]
    config = json.loads((tmp_path / "guarded" / "config.json").read_text())
    assert config["train"]["interpolate"] == "auto" and config["train"]["guard"] is True
    # the run directory rebuilds the kept model
    model, _ = load_run(cfg.out)
    x = torch.rand(3, 1, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.model(x), atol=1e-5)


@pytest.mark.parametrize(("alpha", "expect"), [("0", "start"), ("1", "trained")])
def test_a_given_alpha_saves_the_start_or_the_trained_weights(
    tmp_path, folder, weights, alpha, expect
):
    cfg = _cfg(tmp_path, folder, weights, f"a{alpha}", interpolate=alpha, guard=False,
               whiten_shrink="0.1")  # fmt: skip
    result = Trainer(cfg, log=lambda *a: None).fit()
    saved = load_weights(tmp_path / f"a{alpha}" / "model.safetensors")
    start = load_weights(tmp_path / f"a{alpha}" / "start.safetensors")
    assert result["kept"]["kept"] == expect and result["whitening"]["shrink"] == 0.1
    same = all(torch.equal(saved[k], start[k]) for k in start)
    assert same == (expect == "start")


def test_the_guard_keeps_the_untrained_features_and_says_so_in_one_line(
    tmp_path, folder, weights, monkeypatch
):
    cfg = _cfg(tmp_path, folder, weights, "keep_untrained", interpolate="none")
    trainer = Trainer(cfg, log=(lines := []).append)
    # a validation that prefers the plain features: the identity head scores best
    eye = torch.eye(trainer.model.proj.out_features, trainer.model.proj.in_features)
    monkeypatch.setattr(
        trainer,
        "validation_score",
        lambda *a: -float((trainer.model.proj.weight.detach() - eye).norm()),
    )
    result = trainer.fit()
    assert result["kept"]["kept"] == "untrained"
    said = [line for line in lines if line.startswith("guard: keeping the untrained")]
    assert len(said) == 1 and "neither the whitened head nor training beat them" in said[0]
    saved = load_weights(tmp_path / "keep_untrained" / "model.safetensors")
    assert torch.equal(saved["proj.weight"], eye)


def test_anchor_and_lp_ft_fine_tune_with_the_head_first(tmp_path, folder, weights):
    cfg = _cfg(tmp_path, folder, weights, "lpft", freeze_stages=0, feature_blocks=[3],
               lp_ft=True, anchor_weights=1.0, steps=3, eval_every=3)  # fmt: skip
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.fit()
    assert any(line.startswith("LP-FT: the head starts as whitening") for line in lines)
    assert trainer.cfg.head_warmup_steps == 1 and trainer.cfg.head_init == "whiten"
    changed = any(
        not torch.equal(before[k], v) for k, v in trainer.model.backbone.state_dict().items()
    )
    assert changed or trainer.kept["kept"] in ("untrained", "start")
