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

import json
import os
from pathlib import Path

import numpy as np

from . import plots
from .html import ReportSection, render_html, write_html
from .plots import (
    embedding_map_2d,
    plot_distance_histograms,
    plot_embedding_map,
    plot_retrieval_gallery,
    plot_roc,
    plot_training_curves,
)

__all__ = ["ReportSection", "build_report", "render_html", "write_html", *plots.__all__]


def _sample_pairs(labels: np.ndarray, max_pairs: int, seed: int):
    from ..metrics import pairs_from_labels

    pairs = pairs_from_labels(labels, max_pairs=max_pairs, seed=seed)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    return pairs, same


def _environment_rows(env: dict | None) -> list[tuple[str, object]]:
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


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    n_gallery: int = 6,
    k: int = 6,
    max_points: int = 2000,
    model=None,
    test_data=None,
    initial_model=None,
) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the HTML path.

    Evaluates the trained model (``model.safetensors``) and the initial model (rebuilt with the
    run's seed, exactly the weights training started from) on the run's held-out split.
    ``model`` / ``test_data`` / ``initial_model``: a run trained with your own module or data
    (see :meth:`tripletlab.train.Trainer.report`, which passes them).
    """
    import torch

    from ..inference.run import Inference
    from ..metrics import knn_search, pair_distances, retrieval_metrics, verification_metrics
    from ..metrics.evaluate import embed
    from ..models import build_model
    from ..rundir.files import read_json, read_jsonl

    run = Path(run_dir)
    if model is None:
        inf = Inference.from_run(run)
    else:
        from ..rundir.files import load_weights, model_fingerprint

        model.load_state_dict(load_weights(run / "model.safetensors"))
        ev_path = run / "eval.json"
        inf = Inference(
            model,
            read_json(run / "config.json", "run config"),
            run,
            evaluation=read_json(ev_path, "evaluation") if ev_path.exists() else None,
            fingerprint=model_fingerprint(run),
        )
    cfg = inf.config
    train_cfg = cfg.get("train", {})
    seed = int(train_cfg.get("seed", 0))
    ev = read_json(run / "eval.json", "evaluation") if (run / "eval.json").exists() else {}
    records = read_jsonl(run / "metrics.jsonl")
    train_recs = [r for r in records if r.get("type") != "eval"]
    eval_recs = [r for r in records if r.get("type") == "eval"]
    split = read_json(run / "split.json", "split")
    test = test_data if test_data is not None else inf.load_data()  # the held-out split
    rng = np.random.default_rng(seed)
    if len(test) > max_points:
        keep = np.sort(rng.choice(len(test), size=max_points, replace=False))
        test = test.subset(keep)
    dist = inf.distance
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
    emb_after = inf.embed_dataset(test)
    y = test.y.numpy()
    pairs, same = _sample_pairs(y, 200_000, seed)
    d_before = pair_distances(emb_before, pairs, dist) if emb_before is not None else None
    d_after = pair_distances(emb_after, pairs, dist)
    threshold = ev.get("threshold")
    margin = (  # the hinge margin, drawn where it is in the evaluation distance's units
        float(train_cfg.get("margin", 0.2))
        if train_cfg.get("distance") == dist and not train_cfg.get("soft_margin")
        else None
    )
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
    if eval_recs:
        val_text = " Validation metrics per evaluation."
    elif not train_cfg.get("evaluate", True):
        val_text = " No validation: the run used --no-eval."
    elif not train_cfg.get("val_fraction"):
        val_text = " No validation: --val-fraction 0 (the last model is kept)."
    else:
        val_text = " No validation was recorded (too few validation items or classes)."
    sections.append(
        ReportSection(
            "Training",
            text=(
                "Loss, share of mined triplets that still violate the margin (active fraction) "
                "and the mean pairwise distance in the batch (a collapse signal: it falls to 0 "
                "when all embeddings converge to one point)." + val_text
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
                        *(
                            [("before training (initial weights)", d_before[same], d_before[~same])]
                            if d_before is not None
                            else []
                        ),
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
        e = torch.from_numpy(emb_after)
        nd, ni = knn_search(e, e, k, distance=dist, exclude_self=True)
        nd, ni = nd.numpy(), ni.numpy()
        wrong_first = np.flatnonzero(y[ni[:, 0]] != y)
        bad_rate = np.mean(y[ni] != y[:, None], axis=1)
        worst = np.argsort(-bad_rate, kind="stable")[: min(10, len(y))]
        rows = []
        for q in worst:
            name = (
                test.texts[q]
                if test.texts is not None
                else test.paths[q]
                if test.paths
                else f"item {q}"
            )
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
        if test.texts is not None:  # the gallery of a text run: texts instead of images
            picks = list(rng.choice(len(y), size=min(n_gallery, len(y)), replace=False))
            picks = picks[: max(1, n_gallery - 3)] + [q for q in worst[:3] if q not in picks]
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
            sec.tables.append(("retrieval gallery (✓ same class, ✗ other class)", gallery))
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
    no_val = "— (no validation: the last model is kept)"
    timing = [
        (k, no_val if k in ("best_step", "best_val_map_at_r") and ev[k] in (None, -1) else ev[k])
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
                (
                    "training configuration (— : automatic choice)",
                    list(train_cfg.items()),
                ),
                ("environment", _environment_rows(cfg.get("environment"))),
            ],
        )
    )
    if ev.get("collapse"):
        sections.insert(
            0, ReportSection("Warning: embedding collapse", text=json.dumps(ev["collapse"]))
        )
    margin_text = (
        "soft margin (softplus)"
        if train_cfg.get("soft_margin")
        else f"margin {train_cfg.get('margin')}"
    )
    page = render_html(
        f"tripletlab report — {run.name}",
        f"{train_cfg.get('data')} · strategy {train_cfg.get('strategy')} · "
        f"{margin_text} · {dist} evaluation",
        kpis,
        sections,
        run / "plots",
    )
    out = run / "report.html"
    write_html(out, page)
    return out
