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


def _held_out(kind="image", n_cls=4, per_class=5, seed=0):
    """A tiny held-out split as the report sees it, and embeddings where class 'c1' lies
    inside class 'c2' (its queries find c2 first)."""
    from types import SimpleNamespace

    import torch

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_cls), per_class)
    centres = rng.normal(size=(n_cls, 8)) * 5
    centres[1] = centres[2]
    emb = (centres[y] + rng.normal(size=(len(y), 8)) * 0.3).astype(np.float32)
    classes = [f"c{i}" for i in range(n_cls)]
    test = SimpleNamespace(
        y=torch.from_numpy(y),
        x=torch.from_numpy(rng.random((len(y), 1, 8, 8)).astype(np.float32)),
        classes=classes,
        kind=kind,
        texts=[f"text {i}" for i in range(len(y))] if kind == "text" else None,
        paths=None,
    )
    return emb, test


def test_retrieval_section_shows_per_class_table_and_worst_query_figure(tmp_path):
    from tripletlab.metrics import per_class_retrieval
    from tripletlab.report import Table
    from tripletlab.report.build import N_WORST_SHOWN, retrieval_section

    emb, test = _held_out()
    sec = retrieval_section(
        emb, test, distance="cosine", k=4, n_gallery=3, rng=np.random.default_rng(0)
    )
    assert set(sec.figures) == {"worst_queries", "retrieval_gallery"}
    fig = sec.figures["worst_queries"]
    assert len(fig.axes) == N_WORST_SHOWN * 5  # each worst query, then its top 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("query #") and titles[0].endswith(("c1", "c2"))
    table = sec.tables[0]
    assert isinstance(table, Table) and table.header[:4] == ("class", "items", "P@1", "MAP@R")
    rows = per_class_retrieval(emb, test.y.numpy())
    worst = rows[0]
    assert table.rows[0][0] == f"c{worst['label']}" and table.rows[0][3] == (
        f"{worst['map_at_r']:.3f}"
    )
    assert {table.rows[0][0], table.rows[1][0]} == {"c1", "c2"}  # the two mixed classes
    assert table.rows[0][4].startswith(("c1 (", "c2 ("))
    assert [r[0] for r in table.rows[2:]] == ["c0", "c3"]  # perfect: a tie, by name
    assert sec.tables[1][0].startswith("worst queries")  # the existing table is kept
    page = render_html("r", "s", [], [sec], tmp_path)
    assert "data-plot='worst_queries'" in page and (tmp_path / "worst_queries.png").exists()
    assert "<th>most confused with (its queries at rank 1)</th>" in page
    assert re.search(r"<tr><td>c[12]</td><td>5</td><td>[0-9.]+</td><td>[0-9.]+</td>", page)


def test_worst_queries_order_and_text_gallery_keeps_them():
    from tripletlab.report.build import (
        nearest_neighbours,
        pick_gallery_queries,
        retrieval_section,
        worst_queries,
    )

    y = np.array([0, 0, 1, 1])
    ni = np.array([[2, 1], [2, 3], [3, 0], [0, 1]])  # wrong: 1, 2, 1, 2
    nd = np.array([[0.5, 0.6], [0.1, 0.2], [0.1, 0.3], [0.2, 0.3]])
    assert list(worst_queries(y, nd, ni, 4)) == [1, 3, 2, 0]  # ties: the nearer wrong first
    emb, test = _held_out("text")
    nd, ni = nearest_neighbours(emb, 4, "cosine")
    worst = worst_queries(test.y.numpy(), nd, ni, 10)
    for seed in range(20):  # a worst query drawn at random past the cut still appears
        picks = pick_gallery_queries(np.random.default_rng(seed), 20, 4, worst)
        assert set(worst[:3]) <= set(picks) and len(set(picks)) == len(picks)
    sec = retrieval_section(
        emb, test, distance="cosine", k=4, n_gallery=4, rng=np.random.default_rng(0)
    )
    assert sec.figures == {}
    queries = [text for name, text in sec.tables[2][1] if name.startswith("query")]
    assert {test.texts[q] for q in worst[:3]} <= set(queries)


def test_per_class_table_caps_rows_and_says_how_many_more(tmp_path):
    from tripletlab.metrics import per_class_retrieval
    from tripletlab.report.build import per_class_table, write_per_class_csv

    emb, test = _held_out(n_cls=12, per_class=3)
    rows = per_class_retrieval(emb, test.y.numpy())
    table = per_class_table(rows, test.classes, max_rows=5)
    assert len(table.rows) == 5 and table.note.startswith("… and 7 more classes")
    maps = [float(r[3]) for r in table.rows]
    assert maps == sorted(maps)
    write_per_class_csv(tmp_path / "pc.csv", rows, test.classes)
    lines = (tmp_path / "pc.csv").read_text().splitlines()
    assert len(lines) == 13 and lines[0].startswith("class,items,queries,precision_at_1")
    assert [line.split(",")[0] for line in lines[1:6]] == [r[0] for r in table.rows]
