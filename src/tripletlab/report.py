"""Plots and a self-contained HTML report of a training run.

``build_report(run_dir)`` writes ``RUN_DIR/report.html`` (one file, every image embedded as a
base64 PNG, opens offline) and the same plots as PNG files in ``RUN_DIR/plots/``. The plotting
functions are pure (arrays in, a matplotlib Figure out) so they can be used on their own.

Sections: training curves (loss, active-triplet fraction, collapse signal) with validation
metrics per evaluation; anchor-positive vs anchor-negative distance histograms before and after
training with the margin and the calibrated threshold marked; a 2-D map of the validation
embeddings (t-SNE, or PCA for large sets); a retrieval gallery for image data (correct neighbours
framed green, wrong ones red) and the worst queries; the ROC curve with EER and TAR@FAR; the
configuration, data summary and timing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .utils import atomic_write_bytes, atomic_write_text  # noqa: E402

__all__ = [
    "ReportSection",
    "plot_distance_histograms",
    "plot_embedding_map",
    "plot_retrieval_gallery",
    "plot_roc",
    "plot_training_curves",
    "render_html",
]


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            xs.append(r.get("step", len(xs)))
            ys.append(float(v))
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def plot_training_curves(train: Sequence[dict], evals: Sequence[dict]) -> Figure:
    """Loss, active-triplet fraction and the collapse signal over steps; validation metrics."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    x, y = _series(train, "loss")
    ax.plot(x, y, color="tab:blue", lw=0.8, alpha=0.5, label="loss")
    if len(y) >= 5:
        w = max(len(y) // 25, 2)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1 :], smooth, color="tab:blue", lw=2, label=f"loss (mean of {w})")
    ax.set_title("training loss")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    x, y = _series(train, "active_fraction")
    ax.plot(x, y, color="tab:orange", label="active-triplet fraction")
    x2, y2 = _series(train, "mean_distance")
    if len(y2):
        ax2 = ax.twinx()
        ax2.plot(x2, y2, color="tab:gray", ls="--", label="mean pairwise distance")
        ax2.set_ylabel("mean pairwise distance (collapse if -> 0)", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("mining")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    for key, color in (
        ("precision_at_1", "tab:green"),
        ("map_at_r", "tab:purple"),
        ("r_precision", "tab:red"),
    ):
        x, y = _series(evals, key)
        if len(y):
            ax.plot(x, y, marker="o", color=color, label=key)
    ax.set_ylim(0, 1.02)
    ax.set_title("validation")
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation recorded", ha="center", va="center")
    fig.tight_layout()
    return fig


def plot_distance_histograms(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    margin: float | None = None,
    threshold: float | None = None,
) -> Figure:
    """Histograms of same-class (anchor-positive) vs different-class distances, one panel each.

    ``panels`` holds ``(title, same_distances, different_distances)``.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, same, diff) in zip(axes[0], panels, strict=True):
        same = np.asarray(same, dtype=float)
        diff = np.asarray(diff, dtype=float)
        both = np.concatenate([same, diff]) if same.size + diff.size else np.zeros(1)
        bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 60)
        ax.hist(
            diff,
            bins=bins,
            density=True,
            alpha=0.55,
            color="tab:red",
            label=f"different class (n={diff.size})",
        )
        ax.hist(
            same,
            bins=bins,
            density=True,
            alpha=0.55,
            color="tab:green",
            label=f"same class (n={same.size})",
        )
        if threshold is not None and "after" in title.lower():
            ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
        if margin is not None and same.size:
            m = float(np.median(same))
            ax.axvspan(
                m,
                m + margin,
                color="tab:blue",
                alpha=0.1,
                label=f"margin {margin:g} above median d(a,p)",
            )
        ax.set_title(title)
        ax.set_xlabel("distance")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def embedding_map_2d(
    embeddings: np.ndarray, seed: int = 0, method: str = "auto"
) -> tuple[np.ndarray, str]:
    """Project embeddings to 2-D: t-SNE (scikit-learn) up to 3000 points, else PCA."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.shape[0] < 3:
        return np.pad(emb[:, :2], ((0, 0), (0, max(0, 2 - emb.shape[1])))), "identity"
    if method == "auto":
        method = "tsne" if emb.shape[0] <= 3000 else "pca"
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (emb.shape[0] - 1) / 3)))
        xy = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(emb)
        return xy, "t-SNE"
    from sklearn.decomposition import PCA

    n_comp = min(2, emb.shape[1], emb.shape[0])
    xy = PCA(n_components=n_comp, random_state=seed).fit_transform(emb)
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy, "PCA"


def plot_embedding_map(
    xy: np.ndarray, labels: np.ndarray, method: str, class_names: Sequence[str] | None = None
) -> Figure:
    """Scatter of a 2-D embedding map coloured by class (legend when there are few classes)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None and int(c) < len(class_names) else c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=12, color=cmap(i % cmap.N), label=str(name))
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=2 if len(classes) > 10 else 1)
    ax.set_title(f"held-out embeddings ({method}), {len(classes)} classes")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def _as_image(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = np.transpose(x, (1, 2, 0))
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    return np.clip(x, 0.0, 1.0)


def plot_retrieval_gallery(
    images: np.ndarray,
    labels: np.ndarray,
    queries: Sequence[int],
    neighbours: np.ndarray,
    distances: np.ndarray | None = None,
    title: str = "retrieval: query | nearest neighbours (green = same class, red = different)",
) -> Figure:
    """One row per query: the query image, then its k nearest neighbours framed green/red."""
    k = neighbours.shape[1]
    rows = len(queries)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.45 * rows + 0.5), squeeze=False)
    for r, q in enumerate(queries):
        ax = axes[r, 0]
        ax.imshow(_as_image(images[q]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"query #{q}", fontsize=7)
        for s in ax.spines.values():
            s.set_edgecolor("tab:blue")
            s.set_linewidth(3)
        for j in range(k):
            ax = axes[r, j + 1]
            nb = int(neighbours[r, j])
            ax.imshow(_as_image(images[nb]), cmap="gray", vmin=0, vmax=1)
            ok = labels[nb] == labels[q]
            for s in ax.spines.values():
                s.set_edgecolor("tab:green" if ok else "tab:red")
                s.set_linewidth(3)
            if distances is not None:
                ax.set_title(f"{distances[r, j]:.3f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_roc(
    fpr: np.ndarray,
    tpr: np.ndarray,
    auc: float,
    eer: float,
    tar_at_far: dict[float, float] | None = None,
) -> Figure:
    """ROC curve (log-scaled FAR) with the EER point and TAR@FAR marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    fpr = np.asarray(fpr, dtype=float)
    tpr = np.asarray(tpr, dtype=float)
    for ax, log in zip(axes, (False, True), strict=True):
        ax.plot(fpr, tpr, color="tab:blue", label=f"ROC (AUC {auc:.4f})")
        ax.plot([eer], [1 - eer], "o", color="tab:red", label=f"EER {100 * eer:.2f}%")
        for far, tar in (tar_at_far or {}).items():
            ax.plot([float(far)], [tar], "s", label=f"TAR@FAR={float(far):g}: {tar:.3f}")
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR)")
        if log:
            ax.set_xscale("log")
            ax.set_xlim(max(1e-4, float(fpr[fpr > 0].min()) if (fpr > 0).any() else 1e-4), 1)
            ax.set_title("ROC (log FAR)")
        else:
            ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=0.8)
            ax.set_title("ROC")
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


@dataclass
class ReportSection:
    """One heading with optional text, tables and figures (name -> Figure)."""

    title: str
    text: str = ""
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: list[tuple[str, list[tuple[str, Any]]]] = field(default_factory=list)
    html_extra: str = ""


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str))
    return html.escape(str(v))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ddd;padding:3px 8px;
font-size:13px;text-align:left} th{background:#f5f5f5}
img{max-width:100%;border:1px solid #eee;margin:6px 0} .muted{color:#666;font-size:13px}
.kpi{display:inline-block;margin:4px 16px 4px 0;padding:8px 12px;background:#f5f7fb;
border-radius:6px} .kpi b{font-size:20px;display:block}
"""


def render_html(
    title: str,
    subtitle: str,
    kpis: list[tuple[str, str]],
    sections: Sequence[ReportSection],
    plots_dir: str | os.PathLike[str] | None,
) -> str:
    """Render sections to one self-contained HTML page; PNGs also written to ``plots_dir``."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)}</p>",
    ]
    if kpis:
        parts.append("<div>")
        for name, value in kpis:
            parts.append(f"<div class='kpi'><b>{html.escape(value)}</b>{html.escape(name)}</div>")
        parts.append("</div>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        for caption, rows in sec.tables:
            parts.append(f"<table><tr><th colspan='2'>{html.escape(caption)}</th></tr>")
            for k, v in rows:
                parts.append(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>")
            parts.append("</table>")
        for name, fig in sec.figures.items():
            png = _png_bytes(fig)
            if plots_dir is not None:
                atomic_write_bytes(Path(plots_dir) / f"{name}.png", png)
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<img alt='{html.escape(name)}' data-plot='{html.escape(name)}' "
                f"src='data:image/png;base64,{b64}'>"
            )
        if sec.html_extra:
            parts.append(sec.html_extra)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike[str], page: str) -> None:
    """Write the page atomically."""
    atomic_write_text(path, page)


# --------------------------------------------------------------------------------------------
# a run directory -> report.html
# --------------------------------------------------------------------------------------------


def _sample_pairs(labels: np.ndarray, max_pairs: int, seed: int):
    from .metrics import pairs_from_labels

    pairs = pairs_from_labels(labels, max_pairs=max_pairs, seed=seed)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    return pairs, same


def build_report(
    run_dir: str | os.PathLike[str], *, n_gallery: int = 6, k: int = 6, max_points: int = 2000
) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the HTML path.

    Evaluates the trained model (``model.safetensors``) and the initial model (rebuilt with the
    run's seed, exactly the weights training started from) on the run's held-out split.
    """
    import torch

    from .data import apply_split
    from .evaluate import embed, eval_distance
    from .metrics import pair_distances, retrieval_metrics, verification_metrics
    from .models import build_model
    from .rundir import load_dataset_for_run, load_run, read_json, read_jsonl

    run = Path(run_dir)
    model, cfg = load_run(run)
    train_cfg = cfg.get("train", {})
    seed = int(train_cfg.get("seed", 0))
    ev = read_json(run / "eval.json", "evaluation") if (run / "eval.json").exists() else {}
    records = read_jsonl(run / "metrics.jsonl")
    train_recs = [r for r in records if r.get("type") != "eval"]
    eval_recs = [r for r in records if r.get("type") == "eval"]
    ds = load_dataset_for_run(cfg, train_cfg.get("data", "digits"))
    split = read_json(run / "split.json", "split")
    _, test = apply_split(ds, split["test"])
    rng = np.random.default_rng(seed)
    if len(test) > max_points:
        keep = np.sort(rng.choice(len(test), size=max_points, replace=False))
        test = test.subset(keep)
    dist = eval_distance(cfg["model"])
    torch.manual_seed(seed)
    initial = build_model(cfg["model"])
    emb_before = embed(initial, test.x).numpy()
    emb_after = embed(model, test.x).numpy()
    y = test.y.numpy()
    pairs, same = _sample_pairs(y, 200_000, seed)
    d_before = pair_distances(emb_before, pairs, dist)
    d_after = pair_distances(emb_after, pairs, dist)
    threshold = ev.get("threshold")
    margin = float(train_cfg.get("margin", 0.2)) if train_cfg.get("distance") == dist else None
    sections: list[ReportSection] = []
    kpis: list[tuple[str, str]] = []
    ret = ev.get("retrieval", {})
    ver = ev.get("verification", {})
    for name, key, src, fmt in (
        ("P@1", "precision_at_1", ret, "{:.3f}"),
        ("MAP@R", "map_at_r", ret, "{:.3f}"),
        ("ROC AUC", "roc_auc", ver, "{:.4f}"),
    ):
        if isinstance(src.get(key), (int, float)):
            kpis.append((name + " (test)", fmt.format(src[key])))
    if isinstance(ver.get("eer"), (int, float)):
        kpis.append(("EER (test)", f"{100 * ver['eer']:.2f}%"))
    if ev.get("train_time_s") is not None:
        kpis.append(("training time", f"{ev['train_time_s']:.0f} s"))

    # 1. did it learn?
    sections.append(
        ReportSection(
            "Training",
            text=(
                "Loss, share of mined triplets that still violate the margin (active fraction) "
                "and the mean pairwise distance in the batch (a collapse signal: it falls to 0 "
                "when all embeddings converge to one point); validation metrics per evaluation."
            ),
            figures={"training_curves": plot_training_curves(train_recs, eval_recs)},
        )
    )
    sections.append(
        ReportSection(
            "Distances on the held-out split, before and after training",
            text=f"Same-class vs different-class pair distances ({dist}) on {len(test)} held-out "
            f"items ({int(same.sum())} same / {int((~same).sum())} different pairs). Good "
            "embeddings separate the two humps; the dashed line is the calibrated threshold.",
            figures={
                "distance_histograms": plot_distance_histograms(
                    [
                        ("before training (initial weights)", d_before[same], d_before[~same]),
                        ("after training", d_after[same], d_after[~same]),
                    ],
                    margin=margin,
                    threshold=threshold,
                )
            },
        )
    )
    xy, method = embedding_map_2d(emb_after, seed=seed)
    sections.append(
        ReportSection(
            "Embedding map",
            figures={"embedding_map": plot_embedding_map(xy, y, method, test.classes)},
        )
    )
    # 2. where does it fail?
    if len(np.unique(y)) >= 2:
        rm = retrieval_metrics(emb_after, y, ks=(1,), distance=dist, nmi=False)
        from .metrics import knn_search

        e = torch.from_numpy(emb_after)
        nd, ni = knn_search(e, e, k, distance=dist, exclude_self=True)
        nd, ni = nd.numpy(), ni.numpy()
        wrong_first = np.flatnonzero(y[ni[:, 0]] != y)
        bad_rate = np.mean(y[ni] != y[:, None], axis=1)
        worst = np.argsort(-bad_rate, kind="stable")[: min(10, len(y))]
        rows = []
        for q in worst:
            name = test.paths[q] if test.paths else f"item {q}"
            rows.append(
                (
                    f"{name} [{test.classes[y[q]]}]",
                    f"{int((y[ni[q]] != y[q]).sum())}/{k} wrong; top-1 "
                    f"{test.classes[y[ni[q, 0]]]} at d={nd[q, 0]:.3f}",
                )
            )
        sec = ReportSection(
            "Retrieval",
            text=f"Held-out P@1 {rm['precision_at_1']:.3f}, MAP@R {rm['map_at_r']:.3f}; "
            f"{len(wrong_first)} of {len(y)} queries have a wrong nearest neighbour.",
            tables=[("worst queries (most wrong among the top neighbours)", rows)],
        )
        if test.kind == "image":
            picks = list(rng.choice(len(y), size=min(n_gallery, len(y)), replace=False))
            picks = picks[: max(1, n_gallery - 3)] + [q for q in worst[:3] if q not in picks]
            sec.figures["retrieval_gallery"] = plot_retrieval_gallery(
                test.x.numpy(), y, picks, ni[picks], nd[picks]
            )
        sections.append(sec)
    # 3. verification
    try:
        vm = verification_metrics(emb_after, y, distance=dist, return_curve=True, seed=seed)
        sections.append(
            ReportSection(
                "Verification",
                text=f"ROC AUC {vm['roc_auc']:.4f}, EER {100 * vm['eer']:.2f}%, accuracy "
                f"{vm['accuracy']:.4f} at distance threshold {vm['threshold']:.4f} "
                f"(LFW 10-fold {vm['accuracy_10fold_mean']:.4f} ± "
                f"{vm['accuracy_10fold_std']:.4f}).",
                figures={
                    "roc": plot_roc(
                        vm["fpr"], vm["tpr"], vm["roc_auc"], vm["eer"], vm["tar_at_far"]
                    )
                },
            )
        )
    except Exception as e:  # noqa: BLE001 - e.g. a single class: say so in the report
        sections.append(ReportSection("Verification", text=f"not available: {e}"))
    # 4. configuration
    data_rows = []
    for part in ("train", "val", "test"):
        s = (cfg.get("data") or {}).get(part)
        if s:
            data_rows.append(
                (part, f"{s['items']} items, {s['classes']} classes, input {s['input_shape']}")
            )
    data_rows.append(
        (
            "split",
            json.dumps(
                {k: v for k, v in split["test"].items() if k in ("by", "seed", "test_classes")}
            )[:400],
        )
    )
    timing = [
        (k, ev.get(k))
        for k in (
            "steps",
            "best_step",
            "train_time_s",
            "best_val_map_at_r",
            "skipped_nonfinite_steps",
        )
        if k in ev
    ]
    if train_recs and "samples_per_s" in train_recs[-1]:
        sps = [r["samples_per_s"] for r in train_recs if "samples_per_s" in r]
        timing.append(("throughput (samples/s, median)", float(np.median(sps))))
    sections.append(
        ReportSection(
            "Run",
            tables=[
                ("data", data_rows),
                ("timing", timing),
                ("model", list(cfg["model"].items())),
                ("training configuration", list(train_cfg.items())),
            ],
        )
    )
    if ev.get("collapse"):
        sections.insert(
            0, ReportSection("Warning: embedding collapse", text=json.dumps(ev["collapse"]))
        )
    page = render_html(
        f"tripletlab report — {run.name}",
        f"{train_cfg.get('data')} · strategy {train_cfg.get('strategy')} · "
        f"margin {train_cfg.get('margin')} · {dist} evaluation",
        kpis,
        sections,
        run / "plots",
    )
    out = run / "report.html"
    write_html(out, page)
    return out
