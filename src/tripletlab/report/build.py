"""The steps of :func:`build_report`, each a function of plain values: load the run and its
held-out data, embed it before and after training, compute the tables, draw each section's
plots, and write the page.

``build_report`` runs them in this order (the random draws, seeded by the run's seed, happen in
the same order every time, so a run's report is reproducible).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .html import ReportSection, Table, render_html, write_html
from .plots import (
    TSNE_MAX_POINTS,
    embedding_map_2d,
    plot_distance_histograms,
    plot_embedding_map,
    plot_retrieval_gallery,
    plot_roc,
    plot_training_curves,
)

__all__ = [
    "RunFiles",
    "build_report",
    "data_rows",
    "distances_section",
    "embed_before_and_after",
    "embedding_map_section",
    "environment_rows",
    "headline_kpis",
    "hinge_margin",
    "load_inference",
    "nearest_neighbours",
    "per_class_table",
    "pick_gallery_queries",
    "read_run_files",
    "retrieval_section",
    "run_section",
    "sample_held_out",
    "sample_pairs",
    "text_gallery_rows",
    "timing_rows",
    "training_section",
    "threshold_section",
    "verification_section",
    "worst_queries",
    "worst_query_rows",
    "write_per_class_csv",
    "write_report_page",
]

N_WORST = 10  # queries listed in the retrieval table
N_WORST_SHOWN = 6  # of them, the queries drawn with their top matches (image runs)
MAX_CLASS_ROWS = 30  # classes listed in the per-class table (all of them in the CSV)
PER_CLASS_CSV = "per_class_retrieval.csv"
MAX_PAIRS = 200_000  # pairs drawn for the distance histograms
NO_VALIDATION = "— (no validation: the last model is kept)"


# ---------------------------------------------------------------------------- load


@dataclass
class RunFiles:
    """What the run directory recorded: ``eval.json`` (``{}`` when absent), the training and
    the validation records of ``metrics.jsonl``, and ``split.json``."""

    evaluation: dict
    train_records: list[dict]
    eval_records: list[dict]
    split: dict


def load_inference(run: Path, model: Any = None) -> Any:
    """The run's :class:`~tripletlab.inference.Inference`: rebuilt from the run, or around
    ``model`` (a module of the run's architecture, given the run's weights here)."""
    from ..inference.run import Inference
    from ..rundir.files import load_weights, model_fingerprint, read_json

    if model is None:
        return Inference.from_run(run)
    model.load_state_dict(load_weights(run / "model.safetensors"))
    ev_path = run / "eval.json"
    return Inference(
        model,
        read_json(run / "config.json", "run config"),
        run,
        evaluation=read_json(ev_path, "evaluation") if ev_path.exists() else None,
        fingerprint=model_fingerprint(run),
    )


def read_run_files(run: Path) -> RunFiles:
    """``eval.json``, ``metrics.jsonl`` (split into training and validation records) and
    ``split.json`` of ``run``."""
    from ..rundir.files import read_json, read_jsonl

    ev = read_json(run / "eval.json", "evaluation") if (run / "eval.json").exists() else {}
    records = read_jsonl(run / "metrics.jsonl")
    return RunFiles(
        evaluation=ev,
        train_records=[r for r in records if r.get("type") != "eval"],
        eval_records=[r for r in records if r.get("type") == "eval"],
        split=read_json(run / "split.json", "split"),
    )


def sample_held_out(test: Any, max_points: int, rng: np.random.Generator) -> Any:
    """``test`` itself, or a random subset of ``max_points`` items (in their order)."""
    if len(test) > max_points:
        keep = np.sort(rng.choice(len(test), size=max_points, replace=False))
        test = test.subset(keep)
    return test


# ---------------------------------------------------------------------------- embed


def embed_before_and_after(
    inf: Any, test: Any, seed: int, initial_model: Any = None
) -> tuple[np.ndarray | None, np.ndarray]:
    """Embeddings of ``test`` by the initial model (rebuilt with the run's ``seed``: the weights
    training started from; ``None`` for a text run whose pretrained encoder is gone) and by
    the trained one."""
    import torch

    from ..inference.embed import embed
    from ..models import build_model

    cfg = inf.config
    torch.manual_seed(seed)
    emb_before = None
    if inf.takes_texts:  # the pretrained encoder training started from, where still available
        from ..errors import TripletLabError
        from ..models.text import build_text_encoder

        try:
            initial = build_text_encoder(cfg["model"])
            emb_before = embed(initial, test.inputs(), 64).numpy()
        except TripletLabError:
            emb_before = None
    else:
        initial = initial_model if initial_model is not None else build_model(cfg["model"])
        emb_before = embed(initial, test.x).numpy()
    return emb_before, inf.embed_dataset(test)


def sample_pairs(labels: np.ndarray, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random index pairs ``(P, 2)`` of the items and whether each pair is same-class."""
    from ..metrics import pairs_from_labels

    pairs = pairs_from_labels(labels, max_pairs=max_pairs, seed=seed)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    return pairs, same


def nearest_neighbours(emb: np.ndarray, k: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """Distances and ids ``(N, k)`` of each item's ``k`` nearest other items."""
    import torch

    from ..metrics import knn_search

    e = torch.from_numpy(emb)
    nd, ni = knn_search(e, e, k, distance=distance, exclude_self=True)
    return nd.numpy(), ni.numpy()


# ---------------------------------------------------------------------------- tables


def headline_kpis(ev: dict) -> list[tuple[str, str]]:
    """The figures at the top of the page, from ``eval.json``."""
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
    post = ev.get("postprocess") or {}
    if post.get("spec", "none") != "none" and isinstance(post.get("map_at_r"), (int, float)):
        kpis.append((f"MAP@R after {post['method']} (test)", f"{post['map_at_r']:.3f}"))
    if ev.get("train_time_s") is not None:
        kpis.append(("training time", f"{ev['train_time_s']:.0f} s"))
    return kpis


def hinge_margin(train_cfg: dict, distance: str) -> float | None:
    """The hinge margin, where it is in the evaluation distance's units (else ``None``)."""
    if train_cfg.get("distance") == distance and not train_cfg.get("soft_margin"):
        return float(train_cfg.get("margin", 0.2))
    return None


def item_name(test: Any, q: int) -> str:
    """How the report names held-out item ``q``: its text, its path, or its number."""
    if test.texts is not None:
        return test.texts[q]
    return test.paths[q] if test.paths else f"item {q}"


def worst_queries(y: np.ndarray, nd: np.ndarray, ni: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` worst queries: the most wrong neighbours among their top k, ties by the
    distance of the first wrong one (nearer is worse), then by index."""
    wrong = y[ni] != y[:, None]
    n_wrong = wrong.sum(axis=1)
    first = wrong.argmax(axis=1)
    first_d = np.where(n_wrong > 0, nd[np.arange(len(y)), first], np.inf)
    return np.lexsort((np.arange(len(y)), first_d, -n_wrong))[:n]


def _class_name(classes: Any, label: int | None) -> str:
    if label is None:
        return "—"
    return str(classes[label]) if 0 <= label < len(classes) else str(label)


def _sorted_by_name(per_class: list[dict], classes: Any) -> list[dict]:
    """The rows of :func:`~tripletlab.metrics.per_class_retrieval`, worst MAP@R first, ties
    (and the classes without a MAP@R, last) by class name."""
    return sorted(
        per_class,
        key=lambda r: (
            r["map_at_r"] is None,
            r["map_at_r"] or 0.0,
            _class_name(classes, r["label"]),
        ),
    )


def per_class_table(per_class: list[dict], classes: Any, max_rows: int = MAX_CLASS_ROWS) -> Table:
    """The per-class table of the report: the ``max_rows`` worst classes (MAP@R ascending,
    ties by name) with their items, P@1, MAP@R and most confused class, and how many more."""
    ordered = _sorted_by_name(per_class, classes)
    rows = []
    for r in ordered[:max_rows]:
        conf = (
            f"{_class_name(classes, r['confused_with'])} ({r['confused_count']} of "
            f"{r['n_items']} at rank 1)"
            if r["confused_with"] is not None
            else "—"
        )
        rows.append(
            (
                _class_name(classes, r["label"]),
                r["n_items"],
                "—" if r["precision_at_1"] is None else f"{r['precision_at_1']:.3f}",
                "—" if r["map_at_r"] is None else f"{r['map_at_r']:.3f}",
                conf,
            )
        )
    more = len(ordered) - len(rows)
    note = f"… and {more} more classes (all in {PER_CLASS_CSV} next to the report)." if more else ""
    if any(r["map_at_r"] is None for r in ordered):
        note += " —: a class of a single item (no other item to find)."
    return Table(
        "per class, the worst first (MAP@R ascending)",
        ("class", "items", "P@1", "MAP@R", "most confused with (its queries at rank 1)"),
        rows,
        note=note.strip(),
    )


def write_per_class_csv(path: Path, per_class: list[dict], classes: Any) -> None:
    """Every class's row of the per-class table as CSV (worst first), written atomically."""
    import csv
    import io

    from ..utils import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "class",
            "items",
            "queries",
            "precision_at_1",
            "r_precision",
            "map_at_r",
            "wrong_at_1",
            "confused_with",
            "confused_count",
        ]
    )
    for r in _sorted_by_name(per_class, classes):
        w.writerow(
            [
                _class_name(classes, r["label"]),
                r["n_items"],
                r["n_queries"],
                *(
                    "" if r[k] is None else f"{r[k]:.6f}"
                    for k in ("precision_at_1", "r_precision", "map_at_r")
                ),
                r["wrong_at_1"],
                "" if r["confused_with"] is None else _class_name(classes, r["confused_with"]),
                r["confused_count"],
            ]
        )
    atomic_write_text(path, buf.getvalue())


def worst_query_rows(
    test: Any, y: np.ndarray, nd: np.ndarray, ni: np.ndarray, worst: np.ndarray, k: int
) -> list[tuple[str, str]]:
    """One row per query in ``worst``: its name and class, how many of its ``k`` neighbours
    are wrong, and its nearest neighbour."""
    rows = []
    for q in worst:
        rows.append(
            (
                f"{item_name(test, q)} [{test.classes[y[q]]}]",
                f"{int((y[ni[q]] != y[q]).sum())}/{k} wrong; top-1 "
                f"{test.classes[y[ni[q, 0]]]} at d={nd[q, 0]:.3f}",
            )
        )
    return rows


def pick_gallery_queries(
    rng: np.random.Generator, n_items: int, n_gallery: int, worst: np.ndarray
) -> list:
    """The queries of a retrieval gallery: random ones, then up to 3 of the worst."""
    picks = list(rng.choice(n_items, size=min(n_gallery, n_items), replace=False))
    head = picks[: max(1, n_gallery - 3)]
    return head + [q for q in worst[:3] if q not in head]


def text_gallery_rows(
    test: Any, y: np.ndarray, nd: np.ndarray, ni: np.ndarray, picks: list, k: int
) -> list[tuple[str, str]]:
    """The retrieval gallery of a text run as table rows: each query, then its neighbours
    marked ✓ (same class) or ✗."""
    gallery = []
    for q in picks:
        gallery.append((f"query [{test.classes[y[q]]}]", test.texts[q]))
        for j in range(min(k, ni.shape[1])):
            n = ni[q, j]
            mark = "✓" if y[n] == y[q] else "✗"
            gallery.append(
                (
                    f"  {j + 1}. {mark} d={nd[q, j]:.3f}",
                    f"{test.texts[n]} [{test.classes[y[n]]}]",
                )
            )
    return gallery


def data_rows(cfg: dict, split: dict) -> list[tuple[str, str]]:
    """The data table: items, classes and input shape per part, and how the split was made."""
    rows = []
    for part in ("train", "val", "test"):
        s = (cfg.get("data") or {}).get(part)
        if s:
            rows.append(
                (part, f"{s['items']} items, {s['classes']} classes, input {s['input_shape']}")
            )
    split_keys = ("by", "seed", "test_classes")
    rows.append(
        ("split", json.dumps({k: v for k, v in split["test"].items() if k in split_keys})[:400])
    )
    return rows


def timing_rows(ev: dict, train_records: list[dict]) -> list[tuple[str, Any]]:
    """The timing table: steps, best step, training time, best validation MAP@R, skipped
    steps (from ``eval.json``) and the median throughput (from the training records)."""
    no_best = ("best_step", "best_val_map_at_r")
    timing: list[tuple[str, Any]] = [
        (key, NO_VALIDATION if key in no_best and ev[key] in (None, -1) else ev[key])
        for key in (
            "steps",
            "best_step",
            "train_time_s",
            "best_val_map_at_r",
            "skipped_nonfinite_steps",
        )
        if key in ev
    ]
    if train_records and "samples_per_s" in train_records[-1]:
        sps = [r["samples_per_s"] for r in train_records if "samples_per_s" in r]
        timing.append(("throughput (samples/s, median)", float(np.median(sps))))
    return timing


def environment_rows(env: dict | None) -> list[tuple[str, object]]:
    """config.json's environment as table rows (runs written before it was recorded: a note)."""
    if not isinstance(env, dict):
        return [("recorded", "not recorded by the tripletlab version that trained this run")]
    names = {
        "git_commit": "git commit of the code",
        "cpu_count": "CPU cores",
        "load_average": "load average (1, 5, 15 min)",
        "threads": "torch CPU threads",
    }
    return [(names.get(k, k), v if v is not None else "—") for k, v in env.items()]


# ---------------------------------------------------------------------------- sections


def training_section(
    train_records: list[dict], eval_records: list[dict], train_cfg: dict
) -> ReportSection:
    """Did it learn? The training curves, and why there is no validation where there is none."""
    if eval_records:
        val_text = " Validation metrics per evaluation."
    elif not train_cfg.get("evaluate", True):
        val_text = " No validation: the run used --no-eval."
    elif not train_cfg.get("val_fraction"):
        val_text = " No validation: --val-fraction 0 (the last model is kept)."
    else:
        val_text = " No validation was recorded (too few validation items or classes)."
    return ReportSection(
        "Training",
        text=(
            "Loss, share of mined triplets that still violate the margin (active fraction) "
            "and the mean pairwise distance in the batch (a collapse signal: it falls to 0 "
            "when all embeddings converge to one point)." + val_text
        ),
        figures={"training_curves": plot_training_curves(train_records, eval_records)},
    )


def distances_section(
    d_before: np.ndarray | None,
    d_after: np.ndarray,
    same: np.ndarray,
    *,
    distance: str,
    n_items: int,
    margin: float | None,
    threshold: float | None,
) -> ReportSection:
    """Same-class vs different-class pair distances before (where known) and after training."""
    groups = []
    if d_before is not None:
        groups.append(("before training (initial weights)", d_before[same], d_before[~same]))
    groups.append(("after training", d_after[same], d_after[~same]))
    return ReportSection(
        "Distances on the held-out split, before and after training",
        text=f"Same-class vs different-class pair distances ({distance}) on {n_items} held-out "
        f"items ({int(same.sum())} same / {int((~same).sum())} different pairs). Good "
        "embeddings separate the two humps; the dashed line is the calibrated threshold.",
        figures={
            "distance_histograms": plot_distance_histograms(
                groups, margin=margin, threshold=threshold
            )
        },
    )


def embedding_map_section(
    emb: np.ndarray, y: np.ndarray, classes: list[str], seed: int
) -> ReportSection:
    """A 2-D map of the held-out embeddings (t-SNE, or PCA for large sets)."""
    xy, method = embedding_map_2d(emb, seed=seed)
    return ReportSection(
        "Embedding map",
        figures={"embedding_map": plot_embedding_map(xy, y, method, classes)},
    )


def retrieval_section(
    emb: np.ndarray,
    test: Any,
    *,
    distance: str,
    k: int,
    n_gallery: int,
    rng: np.random.Generator,
    per_class: list[dict] | None = None,
) -> ReportSection:
    """Where does it fail? P@1 and MAP@R, the per-class table (``per_class``: the rows of
    :func:`~tripletlab.metrics.per_class_retrieval`, computed here when not given), the worst
    queries (a table, and for images a figure of them with their top-k matches), and a
    retrieval gallery (images, or texts) of random and worst queries (drawn with ``rng``)."""
    from ..metrics import per_class_retrieval

    y = test.y.numpy()
    if per_class is None:
        per_class = per_class_retrieval(emb, y, distance=distance)
    n_q = sum(r["n_queries"] for r in per_class)  # the overall figures, from the same search
    p1 = sum(r["n_queries"] * r["precision_at_1"] for r in per_class if r["n_queries"])
    mapr = sum(r["n_queries"] * r["map_at_r"] for r in per_class if r["n_queries"])
    nd, ni = nearest_neighbours(emb, k, distance)
    k = ni.shape[1]
    wrong_first = np.flatnonzero(y[ni[:, 0]] != y)
    worst = worst_queries(y, nd, ni, min(N_WORST, len(y)))
    summary = (
        f"Held-out P@1 {p1 / n_q:.3f}, MAP@R {mapr / n_q:.3f}; "
        if n_q
        else "No class has two items: P@1 and MAP@R are undefined; "
    )
    sec = ReportSection(
        "Retrieval",
        text=summary + f"{len(wrong_first)} of {len(y)} queries have a wrong nearest neighbour. "
        f"Per class ({len(per_class)} classes): P@1 and MAP@R over its items as queries, and "
        "the other class most often at rank 1.",
        tables=[
            per_class_table(per_class, test.classes),
            (
                "worst queries (most wrong among the top neighbours)",
                worst_query_rows(test, y, nd, ni, worst, k),
            ),
        ],
    )
    if test.kind == "image":
        shown = [int(q) for q in worst[:N_WORST_SHOWN] if (y[ni[q]] != y[q]).any()]
        if shown:
            sec.figures["worst_queries"] = plot_retrieval_gallery(
                test.x.numpy(),
                y,
                shown,
                ni[shown],
                nd[shown],
                title=f"the {len(shown)} worst queries | their top {k} "
                "(green = same class, red = other class: named)",
                class_names=test.classes,
            )
        else:
            sec.text += f" No query has a wrong neighbour among its top {k}."
        picks = pick_gallery_queries(rng, len(y), n_gallery, worst)
        sec.figures["retrieval_gallery"] = plot_retrieval_gallery(
            test.x.numpy(), y, picks, ni[picks], nd[picks]
        )
    if test.texts is not None:  # the gallery of a text run: texts instead of images
        picks = pick_gallery_queries(rng, len(y), n_gallery, worst)
        sec.tables.append(
            (
                "retrieval gallery (✓ same class, ✗ other class; random queries, then the worst)",
                text_gallery_rows(test, y, nd, ni, picks, k),
            )
        )
    return sec


def verification_section(emb: np.ndarray, y: np.ndarray, distance: str, seed: int) -> ReportSection:
    """The ROC curve with EER and TAR@FAR, or why verification is not available."""
    from ..metrics import verification_metrics

    try:
        vm = verification_metrics(emb, y, distance=distance, return_curve=True, seed=seed)
        return ReportSection(
            "Verification",
            text=f"ROC AUC {vm['roc_auc']:.4f}, EER {100 * vm['eer']:.2f}%, accuracy "
            f"{vm['accuracy']:.4f} at distance threshold {vm['threshold']:.4f} "
            f"(LFW 10-fold {vm['accuracy_10fold_mean']:.4f} ± "
            f"{vm['accuracy_10fold_std']:.4f}).",
            figures={
                "roc": plot_roc(vm["fpr"], vm["tpr"], vm["roc_auc"], vm["eer"], vm["tar_at_far"])
            },
        )
    except Exception as e:  # noqa: BLE001 - e.g. a single class: say so in the report
        return ReportSection("Verification", text=f"not available: {e}")


def threshold_section(ev: dict) -> ReportSection | None:
    """How the deployment threshold was chosen (target FAR on the validation identities, with
    its interval and the small-set warning) and what it does on the test pairs, from eval.json;
    None without a threshold."""
    from ..metrics.evaluate import calibration_lines

    v = ev.get("verification", {})
    if not isinstance(v.get("threshold"), (int, float)):
        return None
    lines = calibration_lines(v)
    rows = [
        ("threshold (distance <= it: same)", f"{v['threshold']:.4f}"),
        ("test FAR at it", f"{v.get('far_at_threshold', float('nan')):.4f}"),
        ("test TAR at it", f"{v.get('tar_at_threshold', float('nan')):.4f}"),
        ("pairs (same / different)", f"{v.get('n_pairs_same')} / {v.get('n_pairs_diff')}"),
    ]
    if v.get("validation_interval"):
        rows.append(("interval", v["validation_interval"]))
    return ReportSection(
        "Verification threshold",
        text=" ".join(lines[:1]) + "." + (" " + " ".join(lines[1:]) if lines[1:] else ""),
        tables=[("threshold", rows)],
    )


def run_section(cfg: dict, files: RunFiles) -> ReportSection:
    """The configuration: data, timing, model, training configuration and environment."""
    return ReportSection(
        "Run",
        tables=[
            ("data", data_rows(cfg, files.split)),
            ("timing", timing_rows(files.evaluation, files.train_records)),
            ("model", list(cfg["model"].items())),
            (
                "training configuration (— : automatic choice)",
                list(cfg.get("train", {}).items()),
            ),
            ("environment", environment_rows(cfg.get("environment"))),
        ],
    )


# ---------------------------------------------------------------------------- page


def report_subtitle(train_cfg: dict, distance: str) -> str:
    """The line under the title: data, strategy, margin and evaluation distance."""
    margin_text = (
        "soft margin (softplus)"
        if train_cfg.get("soft_margin")
        else f"margin {train_cfg.get('margin')}"
    )
    return (
        f"{train_cfg.get('data')} · strategy {train_cfg.get('strategy')} · "
        f"{margin_text} · {distance} evaluation"
    )


def write_report_page(
    run: Path, subtitle: str, kpis: list[tuple[str, str]], sections: list[ReportSection]
) -> Path:
    """Render the page to ``run/report.html`` with its plots in ``run/plots/``; returns the
    HTML path."""
    page = render_html(f"tripletlab report — {run.name}", subtitle, kpis, sections, run / "plots")
    out = run / "report.html"
    write_html(out, page)
    return out


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    n_gallery: int = 6,
    k: int = 6,
    max_points: int = 2000,
    model=None,
    test_data=None,
    initial_model=None,
    log=None,
) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the HTML path.
    ``log``: where the progress lines of its slow steps go (default: stderr).

    Evaluates the trained model (``model.safetensors``) and the initial model (rebuilt with the
    run's seed, exactly the weights training started from) on the run's held-out split.
    ``model`` / ``test_data`` / ``initial_model``: a run trained with your own module or data
    (see :meth:`tripletlab.train.Trainer.report`, which passes them).

    Example:
        >>> build_report("runs/faces")  # doctest: +SKIP
        PosixPath('runs/faces/report.html')
    """
    import sys
    import time

    from ..metrics import pair_distances

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()

    def step(what: str) -> None:
        say(f"report: {what} ({time.perf_counter() - t0:.0f}s)")

    run = Path(run_dir)
    inf = load_inference(run, model)
    cfg = inf.config
    train_cfg = cfg.get("train", {})
    seed = int(train_cfg.get("seed", 0))
    files = read_run_files(run)
    ev = files.evaluation
    rng = np.random.default_rng(seed)  # draws the subset, then the gallery queries
    test = test_data if test_data is not None else inf.load_data()  # the held-out split
    test = sample_held_out(test, max_points, rng)
    dist = inf.distance
    step(f"embedding {len(test)} held-out items before and after training")
    emb_before, emb_after = embed_before_and_after(inf, test, seed, initial_model)
    y = test.y.numpy()
    pairs, same = sample_pairs(y, MAX_PAIRS, seed)
    d_before = pair_distances(emb_before, pairs, dist) if emb_before is not None else None
    d_after = pair_distances(emb_after, pairs, dist)

    step(
        f"plots; a 2-D map of {len(test)} points "
        + ("(t-SNE)" if 3 <= len(test) <= TSNE_MAX_POINTS else "(PCA)")
    )
    sections = [
        training_section(files.train_records, files.eval_records, train_cfg),
        distances_section(
            d_before,
            d_after,
            same,
            distance=dist,
            n_items=len(test),
            margin=hinge_margin(train_cfg, dist),
            threshold=ev.get("threshold"),
        ),
        embedding_map_section(emb_after, y, test.classes, seed),
    ]
    step("per-class retrieval, retrieval gallery and ROC curve")
    if len(np.unique(y)) >= 2:
        from ..metrics import per_class_retrieval

        per_class = per_class_retrieval(emb_after, y, distance=dist)
        write_per_class_csv(run / PER_CLASS_CSV, per_class, test.classes)
        sections.append(
            retrieval_section(
                emb_after,
                test,
                distance=dist,
                k=k,
                n_gallery=n_gallery,
                rng=rng,
                per_class=per_class,
            )
        )
    sections.append(verification_section(emb_after, y, dist, seed))
    threshold = threshold_section(ev)
    if threshold is not None:
        sections.append(threshold)
    sections.append(run_section(cfg, files))
    if ev.get("collapse"):
        sections.insert(
            0, ReportSection("Warning: embedding collapse", text=json.dumps(ev["collapse"]))
        )
    return write_report_page(run, report_subtitle(train_cfg, dist), headline_kpis(ev), sections)
