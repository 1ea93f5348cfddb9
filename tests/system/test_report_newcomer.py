"""The report says what the run was: soft margin, no empty panels, readable tables, legends
beside the curves, versions and machine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tripletlab.report import build_report
from tripletlab.report.plots import (
    plot_distance_histograms,
    plot_embedding_map,
    plot_training_curves,
)
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("soft") / "run"
    cfg = resolve_config(
        overrides={
            "steps": 12,
            "log_every": 3,
            "embedding_dim": 8,
            "p": 5,
            "soft_margin": True,
            "val_fraction": 0.0,
            "quiet": True,
            "out": str(run),
            "threads": 1,
        }
    )
    Trainer(cfg).fit()
    return run, build_report(run).read_text(encoding="utf-8")


def test_header_names_the_soft_margin(soft_run):
    _, html = soft_run
    header = re.search(r"<h1>.*?</p>", html, re.S).group(0)
    assert "soft margin (softplus)" in header and "margin 0.2" not in header


def test_no_empty_validation_panel_and_the_reason(soft_run):
    _, html = soft_run
    assert "No validation: --val-fraction 0" in html
    fig = plot_training_curves([{"step": 1, "loss": 1.0, "active_fraction": 0.5}], [])
    assert len([a for a in fig.axes if a.get_title()]) == 2


def test_tables_show_no_raw_none_or_minus_one(soft_run):
    _, html = soft_run
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells and not [c for c in cells if c in ("None", "-1", "null")]
    assert "no validation: the last model is kept" in html


def test_versions_commit_and_machine_in_run_and_report(soft_run):
    run, html = soft_run
    env = json.loads((run / "config.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["tripletlab"]
    assert env["threads"] == 1 and env["cpu_count"] >= 1 and env["cpu"]
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"])
    assert "torch CPU threads" in html and torch.__version__ in html


def _overlap(fig, ax, legend) -> float:
    fig.canvas.draw()
    a, b = ax.get_window_extent(), legend.get_window_extent()
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    return w * h


def test_legends_do_not_cover_the_plots():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    recs = [
        {"step": s, "loss": 1 / s, "active_fraction": 0.5, "mean_distance": 1.0}
        for s in range(1, 30)
    ]
    evals = [{"step": 10, "precision_at_1": 0.5, "map_at_r": 0.3, "r_precision": 0.4}]
    rng = np.random.default_rng(0)
    figs = [
        plot_training_curves(recs, evals),
        plot_distance_histograms(
            [("after", rng.random(50), rng.random(50) + 1)], margin=0.2, threshold=0.9
        ),
        plot_embedding_map(rng.random((40, 2)), np.arange(40) % 4, "pca", list("abcd")),
    ]
    checked = 0
    for fig in figs:
        FigureCanvasAgg(fig)
        for ax in fig.axes:
            if ax.get_legend() is not None:
                assert _overlap(fig, ax, ax.get_legend()) == 0, ax.get_title()
                checked += 1
    assert checked >= 5
