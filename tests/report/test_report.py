"""Report plots and HTML (pure parts); reports of run directories are tested in
test_report_browser.py and tests/system/test_report_newcomer.py."""

from __future__ import annotations

import base64
import re

import numpy as np

from tripletlab.report import (
    ReportSection,
    embedding_map_2d,
    plot_distance_histograms,
    plot_embedding_map,
    plot_retrieval_gallery,
    plot_roc,
    plot_training_curves,
    render_html,
)


def _figures():
    rng = np.random.default_rng(0)
    train = [
        {"step": i, "loss": 1 / (i + 1), "active_fraction": 0.5, "mean_distance": 1.0}
        for i in range(50)
    ]
    evals = [
        {"step": 0, "precision_at_1": 0.5, "map_at_r": 0.3},
        {"step": 49, "precision_at_1": 0.9, "map_at_r": 0.7},
    ]
    emb = rng.normal(size=(60, 5))
    lab = rng.integers(0, 4, 60)
    xy, method = embedding_map_2d(emb)
    return {
        "training": plot_training_curves(train, evals),
        "distances": plot_distance_histograms(
            [
                ("before", rng.random(20), rng.random(80)),
                ("after", rng.random(20) / 2, rng.random(80)),
            ],
            margin=0.2,
            threshold=0.4,
        ),
        "map": plot_embedding_map(xy, lab, method, [f"c{i}" for i in range(4)]),
        "gallery": plot_retrieval_gallery(
            rng.random((60, 1, 8, 8)), lab, [0, 1], rng.integers(0, 60, (2, 4)), rng.random((2, 4))
        ),
        "roc": plot_roc(
            np.linspace(0, 1, 20), np.linspace(0, 1, 20) ** 0.3, 0.9, 0.12, {1e-3: 0.2, 1e-2: 0.4}
        ),
    }, method


def test_html_embeds_every_plot_and_writes_pngs(tmp_path):
    figs, method = _figures()
    assert method == "t-SNE"
    sections = [
        ReportSection(
            name,
            text="x < y & z",
            figures={name: fig},
            tables=[("config", [("lr", 0.001), ("nested", {"a": 1})])],
        )
        for name, fig in figs.items()
    ]
    page = render_html("run <1>", "subtitle", [("ROC AUC", "0.99")], sections, tmp_path)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "run &lt;1&gt;" in page and "x &lt; y &amp; z" in page  # escaped
    plots = re.findall(r"data-plot='([^']+)' src='data:image/png;base64,([^']+)'", page)
    assert sorted(p for p, _ in plots) == sorted(figs)
    for name, b64 in plots:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"{name}.png").read_bytes() == png
    assert "http://" not in page and "https://" not in page  # opens offline


def test_embedding_map_small_and_large_inputs():
    xy, method = embedding_map_2d(np.zeros((2, 4)))
    assert xy.shape == (2, 2)
    xy, method = embedding_map_2d(np.random.default_rng(0).normal(size=(3500, 3)))
    assert method == "PCA" and xy.shape == (3500, 2)


def test_importing_and_plotting_keeps_the_matplotlib_backend(tmp_path):
    """report must not switch matplotlib's backend for whoever imports it."""
    import os
    import subprocess
    import sys

    code = (
        "import matplotlib, numpy as np\n"
        "import tripletlab.report as r\n"
        "fig = r.plot_roc(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5, 0.5, {})\n"
        "from tripletlab.report.html import png_bytes\n"
        "assert png_bytes(fig)[:4] == b'\\x89PNG'\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {**os.environ, "MPLBACKEND": "pdf"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pdf"


def test_report_steps_tables_from_plain_values():
    from tripletlab.report.build import (
        headline_kpis,
        hinge_margin,
        report_subtitle,
        timing_rows,
    )

    ev = {
        "retrieval": {"precision_at_1": 0.9, "map_at_r": 0.5},
        "verification": {"roc_auc": 0.97, "eer": 0.051},
        "train_time_s": 12.4,
        "steps": 10,
        "best_step": -1,
    }
    assert headline_kpis(ev) == [
        ("P@1 (test)", "0.900"),
        ("MAP@R (test)", "0.500"),
        ("ROC AUC (test)", "0.9700"),
        ("EER (test)", "5.10%"),
        ("training time", "12 s"),
    ]
    assert headline_kpis({}) == []
    rows = timing_rows(ev, [{"samples_per_s": 10.0}, {"samples_per_s": 30.0}])
    assert rows[:2] == [("steps", 10), ("best_step", "— (no validation: the last model is kept)")]
    assert rows[-1] == ("throughput (samples/s, median)", 20.0)
    assert hinge_margin({"distance": "cosine", "margin": 0.3}, "cosine") == 0.3
    assert hinge_margin({"distance": "cosine", "soft_margin": True}, "cosine") is None
    assert hinge_margin({"distance": "euclidean"}, "cosine") is None
    assert "soft margin (softplus)" in report_subtitle({"soft_margin": True}, "cosine")
