"""Plots and a self-contained HTML report of a training run.

``build_report(run_dir)`` writes ``RUN_DIR/report.html`` (one file, every image embedded as a
base64 PNG, opens offline) and the same plots as PNG files in ``RUN_DIR/plots/``. The plotting
functions are pure (arrays in, a matplotlib Figure out) so they can be used on their own.

What lives where: ``build.py`` (:func:`build_report` and its steps: load the run and its
held-out data, embed, compute the tables, one function per section, write the page),
``plots.py`` (the pure plotting functions), ``html.py`` (:class:`ReportSection` and the page).

Sections: training curves (loss, active-triplet fraction, collapse signal) with validation
metrics per evaluation; anchor-positive vs anchor-negative distance histograms before and after
training with the margin and the calibrated threshold marked; a 2-D map of the validation
embeddings (t-SNE, or PCA for large sets); retrieval: a per-class table (P@1, MAP@R and the most
confused class of every class, the worst first), the worst queries with their top matches and a
retrieval gallery (images framed green for the same class, red for another; or texts); the ROC
curve with EER and TAR@FAR; the configuration, data summary and timing.
"""

from __future__ import annotations

from . import plots
from .build import build_report
from .html import ReportSection, Table, render_html, write_html
from .plots import *  # noqa: F403 - the plotting functions (plots.__all__)

__all__ = ["ReportSection", "Table", "build_report", "render_html", "write_html", *plots.__all__]
