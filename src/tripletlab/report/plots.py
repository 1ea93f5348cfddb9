"""Report plots: pure functions, arrays in, a matplotlib :class:`~matplotlib.figure.Figure` out.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so importing or using
this module never switches matplotlib's backend or opens a window; PNGs are rendered with Agg
where they are saved (:func:`tripletlab.report.html.png_bytes`).

Example:
    >>> import numpy as np
    >>> from tripletlab.report.plots import plot_roc
    >>> fig = plot_roc(np.array([0.0, 0.1, 1.0]), np.array([0.0, 0.9, 1.0]), 0.95, 0.1, {})
    >>> len(fig.axes)
    2
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "embedding_map_2d",
    "plot_distance_histograms",
    "plot_embedding_map",
    "plot_retrieval_gallery",
    "plot_roc",
    "plot_training_curves",
    "subplots",
]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize, squeeze: bool = True):
    """``pyplot.subplots`` without pyplot: a standalone Figure and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            xs.append(r.get("step", len(xs)))
            ys.append(float(v))
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _legend_below(ax, handles=None, labels=None, ncol: int = 2) -> None:
    """A legend under the axes (never over the curves)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )


def plot_training_curves(train: Sequence[dict], evals: Sequence[dict]) -> Figure:
    """Loss, active-triplet fraction and the collapse signal over steps; validation metrics
    (a third panel only when validation was recorded). Legends sit under the panels."""
    n = 3 if evals else 2
    fig, axes = subplots(1, n, figsize=(5 * n, 4.2))
    ax = axes[0]
    x, y = _series(train, "loss")
    ax.plot(x, y, color="tab:blue", lw=0.8, alpha=0.5, label="loss")
    if len(y) >= 5:
        w = max(len(y) // 25, 2)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1 :], smooth, color="tab:blue", lw=2, label=f"loss (mean of {w})")
    ax.set_title("training loss")
    ax.set_xlabel("step")
    _legend_below(ax)
    ax = axes[1]
    x, y = _series(train, "active_fraction")
    ax.plot(x, y, color="tab:orange", label="active-triplet fraction")
    handles, labels = ax.get_legend_handles_labels()
    x2, y2 = _series(train, "mean_distance")
    if len(y2):
        ax2 = ax.twinx()
        ax2.plot(x2, y2, color="tab:gray", ls="--", label="mean pairwise distance")
        ax2.set_ylabel("mean pairwise distance (collapse if -> 0)", fontsize=8)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("mining")
    ax.set_xlabel("step")
    _legend_below(ax, handles, labels, ncol=1)
    if evals:
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
        _legend_below(ax, ncol=3)
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
    fig, axes = subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
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
        _legend_below(ax)
    fig.tight_layout()
    return fig


#: t-SNE up to this many points (about 10 s on 2 cores), PCA above: 2000 points took 45 s
TSNE_MAX_POINTS = 1000


def embedding_map_2d(
    embeddings: np.ndarray, seed: int = 0, method: str = "auto"
) -> tuple[np.ndarray, str]:
    """Project embeddings to 2-D: t-SNE (scikit-learn) up to :data:`TSNE_MAX_POINTS` points,
    else PCA."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.shape[0] < 3:
        return np.pad(emb[:, :2], ((0, 0), (0, max(0, 2 - emb.shape[1])))), "identity"
    if method == "auto":
        method = "tsne" if emb.shape[0] <= TSNE_MAX_POINTS else "pca"
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
    fig, ax = subplots(figsize=(7, 6))
    cmap = matplotlib.colormaps.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None and int(c) < len(class_names) else c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=12, color=cmap(i % cmap.N), label=str(name))
    if len(classes) <= 20:
        ax.legend(  # beside the map, not over the points
            fontsize=7,
            markerscale=1.5,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            ncol=2 if len(classes) > 10 else 1,
            frameon=False,
        )
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
    class_names: Sequence[str] | None = None,
) -> Figure:
    """One row per query: the query image, then its k nearest neighbours framed green/red,
    each titled with its distance (where given). With ``class_names`` (indexed by label) the
    query's class is named, and so is the class of each wrong neighbour."""
    k = neighbours.shape[1]
    rows = len(queries)
    height = 1.45 if class_names is None else 1.7  # a second title line: the class
    fig, axes = subplots(rows, k + 1, figsize=(1.3 * (k + 1), height * rows + 0.5), squeeze=False)

    def name(i: int) -> str:
        s = str(class_names[int(labels[i])])  # type: ignore[index]
        return s if len(s) <= 16 else s[:15] + "…"

    for r, q in enumerate(queries):
        ax = axes[r, 0]
        ax.imshow(_as_image(images[q]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"query #{q}" + (f"\n{name(q)}" if class_names is not None else ""), fontsize=7
        )
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
            lines = [f"{distances[r, j]:.3f}"] if distances is not None else []
            if class_names is not None and not ok:
                lines.append(name(nb))
            if lines:
                ax.set_title("\n".join(lines), fontsize=7, color="black" if ok else "tab:red")
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
    fig, axes = subplots(1, 2, figsize=(11, 4.2))
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
