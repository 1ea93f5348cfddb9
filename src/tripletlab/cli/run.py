"""Commands on a trained run: eval, embed, index, search, verify, report.

Each parses its options, calls :class:`tripletlab.inference.Inference` (or the report) and
prints; the work itself is in the library.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..validation import EVAL_DISTANCES
from ._base import add_faces, add_postprocess, faces_line, print_json, register_command


def _inference(args):
    from ..inference.run import Inference

    inf = Inference.from_run(args.model, device=getattr(args, "device", "auto"))
    inf.use_postprocess(getattr(args, "postprocess", None) or "auto")
    inf.use_faces(getattr(args, "faces", None) or "auto")
    return inf


def _print_faces(inf, file=None) -> None:
    line = faces_line(inf)
    if line:
        print(line, file=file)
    _faces_notes(inf)


def _faces_notes(inf) -> None:
    """One stderr note per face-cache entry pruned by the last folder aligned."""
    from ..rundir.cache import cache_keep

    for p in getattr(inf, "faces_pruned", None) or []:
        print(f"note: faces cache: removed the least recently used {p} (keeping "
              f"{cache_keep()}; TRIPLETLAB_FACES_CACHE_KEEP sets it)", file=sys.stderr)  # fmt: skip


def _embed_source(inf, args):
    """(embeddings, labels, paths, classes) of --data, image folders and manifests streamed."""
    import sys

    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    return inf.embed_source(
        args.data,
        skip_bad=args.skip_bad,
        workers=args.workers,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        # embed / index take a plain photo folder (the file path is the id); eval needs labels
        unlabelled=getattr(args, "command", None) != "eval",
    )


def _streams(inf, args) -> bool:
    """Image folders and manifests given to an image model are streamed in batches."""
    from ..data.open import is_image_source

    spec = args.data if args.data is not None else inf.config.get("train", {}).get("data")
    return inf.takes_images and spec is not None and is_image_source(spec)


def _add_device(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")


def _add_model_data(p, data_required: bool = False) -> None:
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument(
        "--data",
        required=data_required,
        default=None,
        help=(
            "data to embed: an image folder (class sub-folders, or a plain folder of photos: "
            "each file path is then its id), a manifest, or vectors/texts; a folder is used whole"
            if data_required
            else "labelled data to evaluate (ROOT/<class>/<image>, a manifest, vectors or "
            "texts; a folder is used whole; default: the run's test split)"
        ),
    )
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files")
    _add_device(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes decoding streamed images (image folders, manifests; default min(2, cores))",
    )
    p.add_argument("--batch-size", type=int, default=256, help="items per forward pass (256)")


def _add_distributed(p) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: every process embeds its share of the items, rank 0 merges them "
        "in the original order and alone writes the output (gloo on CPU, NCCL on CUDA)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a process waits for the others before stopping with an error (600)",
    )


def _embeddings(inf, args):
    """An :class:`~.inference.shard.Embedded` of ``--data``; under ``--distributed`` sharded
    over the ranks (None on ranks > 0, which write nothing)."""
    from ..inference.shard import Embedded, embed_sharded

    stream = _streams(inf, args)
    if args.distributed:
        from ..runtime.process_group import init_from_env, shutdown

        if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
            raise InputError("--batch-size must be >= 1 and --workers >= 0")
        env = init_from_env(str(inf.device), args.dist_timeout, command=args.command)
        try:
            return embed_sharded(
                inf, args.data, stream=stream, env=env, skip_bad=args.skip_bad,
                workers=args.workers, batch_size=args.batch_size,
            )  # fmt: skip
        finally:
            shutdown(env)  # every rank has its share merged: rank 0 writes alone
    if stream:
        emb, labels, paths, classes = _embed_source(inf, args)
        return Embedded(emb, labels, paths, classes)
    ds = inf.load_data(args.data, args.skip_bad)
    return Embedded(inf.embed_dataset(ds), ds.y, ds.paths, ds.classes, ds.texts)


# ------------------------------------------------------------------------- eval and embed


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
        choices=list(EVAL_DISTANCES),
        default=None,
        help="distance for evaluation (default: cosine for normalised embeddings)",
    )
    add_postprocess(p, 'scored beside the raw metrics ("postprocess" in --json)')
    add_faces(p)
    p.add_argument(
        "--groups",
        default=None,
        metavar="SPEC",
        help="evaluation groups (camera, session): each query's gallery leaves out every item "
        "of its own group. path:N = the N-th folder above each file (1 = its parent), "
        "column:NAME = a column of the CSV manifest, or a .csv/.tsv file of path,group rows",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_eval)


def _eval_groups(inf, args, paths, n_items):
    """The --groups codes of the evaluated items (None without --groups)."""
    if args.groups is None:
        return None
    from ..data.groups import load_groups, manifest_columns

    cols = None
    if args.groups.startswith("column:") and paths is not None:
        manifest = args.data if args.data is not None else inf.config.get("train", {}).get("data")
        cols = manifest_columns(manifest, paths)
    return load_groups(args.groups, paths, n_items, csv_columns=cols)


def _cmd_eval(args) -> int:
    from ..metrics.evaluate import summary_lines

    inf = _inference(args)
    if args.data is None and inf.faces != (inf.config.get("train") or {}).get("faces"):
        print("note: --faces applies to --data; the run's own test split is read as the run "
              "was trained", file=sys.stderr)  # fmt: skip
    if _streams(inf, args):
        emb, labels, paths, _ = _embed_source(inf, args)
        groups = _eval_groups(inf, args, paths, len(labels))
        result = inf.evaluate_embeddings(emb, labels, args.distance, groups=groups)
        leak = inf.training_items(None, args.data, paths)
        if leak:
            result["training_items"] = leak
    else:
        ds = inf.load_data(args.data, args.skip_bad)
        groups = _eval_groups(inf, args, ds.paths, len(ds))
        result = inf.evaluate(ds, args.distance, data=args.data, groups=groups)
    if args.data is not None:  # a folder of the user's, not the run's test split
        result = {**result, "split": "data", "data": str(args.data)}
    if inf.faces_summary:
        keep = ("images", "with_face", "no_face", "errors", "template", "size")
        result = {**result, "faces": {k: inf.faces_summary[k] for k in keep}}
    if args.json:
        print_json(result)
        _faces_notes(inf)
    else:
        print("\n".join(summary_lines(result, inf.run_dir, training=False)))
        _print_faces(inf)
    return 0


@register_command("embed")
def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="write embeddings of a data set to an .npz file",
        description="Embed every item of a data set; writes an .npz with "
        "'embeddings', 'labels', 'paths' and 'classes' (and 'texts' for text data).",
    )
    _add_model_data(p, data_required=True)
    p.add_argument("--out", required=True, help="output .npz file")
    add_faces(p)
    _add_distributed(p)
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args) -> int:
    from ..utils import atomic_write_bytes, check_replaceable

    check_replaceable(args.out)  # before the work: never rename over /dev/full or a FIFO
    inf = _inference(args)
    got = _embeddings(inf, args)
    if got is None:  # a rank > 0 of --distributed: rank 0 writes
        return 0
    emb, labels, paths, classes = got.embeddings, got.labels, got.paths, got.classes
    extra = {"texts": np.asarray(got.texts, dtype=str)} if got.texts is not None else {}
    # data without files (digits, vectors, idx): "<data>[row]" identifies each item
    paths = paths if paths is not None else [f"{args.data}[{i}]" for i in range(len(emb))]
    buf = io.BytesIO()
    np.savez(
        buf,
        embeddings=emb,
        labels=labels.numpy(),
        paths=np.asarray(paths, dtype=str),
        classes=np.asarray(classes, dtype=str),
        **extra,
    )
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {Path(args.out)}")
    _print_faces(inf)
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
    from ..index.embedding_index import KINDS

    p.add_argument(
        "--kind",
        choices=list(KINDS),
        default="flat",
        help="flat = exact (default); hnsw / ivf = approximate, for large sets; ivfpq = "
        "inverted lists of product-quantised codes (faiss), for millions of vectors. "
        "Approximate kinds report recall@10 against exact search and the query latency",
    )
    add_postprocess(p, "built into the index (DBA augments the stored gallery; the manifest "
                    "records it and search uses it)")  # fmt: skip
    add_faces(p)
    _add_distributed(p)
    p.set_defaults(func=_cmd_index)


def _cmd_index(args) -> int:
    import sys
    import time

    t0 = time.perf_counter()
    inf = _inference(args)
    print(f"index: embedding {args.data} ...", file=sys.stderr, flush=True)
    got = _embeddings(inf, args)
    if got is None:  # a rank > 0 of --distributed: rank 0 builds and writes the index
        return 0
    print(
        f"index: {len(got.embeddings)} embeddings in {time.perf_counter() - t0:.0f}s; building "
        f"the {args.kind} index"
        + (" and measuring its recall against exact search" if args.kind != "flat" else ""),
        file=sys.stderr,
        flush=True,
    )
    # text items are shown by their text
    paths = got.texts if got.texts is not None else got.paths
    index = inf.index_embeddings(
        got.embeddings, got.labels, paths, got.classes, kind=args.kind,
        files=got.texts is None,
    )  # fmt: skip
    from ..rundir.lock import lock_gallery

    lock = lock_gallery(args.out)  # a server writing this gallery would lose our index
    try:
        index.save(args.out, fingerprint=inf.fingerprint)
    finally:
        if lock is not None:
            lock.close()
    post = "" if index.postprocess.method == "none" else f", post-processing {index.postprocess}"
    print(f"indexed {len(index)} items ({inf.distance}, {args.kind}{post}) in {args.out}")
    _print_faces(inf)
    q = index.quality
    if q:
        print(
            f"recall@{q['k']} vs exact search: {q['recall_at_k']:.4f} over {q['n_queries']} "
            f"queries; {q['ms_per_query']:.3f} ms/query ({q['exact_ms_per_query']:.3f} exact)"
        )
    return 0


@register_command("search")
def _add_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="find the nearest indexed items of query images/vectors",
        description="Embed queries with the model and print their k nearest "
        "items in an index (label, path, distance).",
    )
    p.add_argument(
        "queries",
        nargs="+",
        help="image files or folders of images (searched for every image in them, "
        "sub-folders too), or one .npy/.npz/.csv of raw vectors (scaled as the training data "
        "was: a warning says when they are not); for a text model query strings (quoted) or "
        "one .txt/.csv/.tsv/.jsonl file of texts",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="the run that built it")
    _add_device(p)
    p.add_argument("--index", required=True, metavar="DIR", help="index directory")
    p.add_argument("-k", type=int, default=5, help="neighbours per query (5)")
    add_postprocess(p, "(must be the one the index was built with)")
    add_faces(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_search)


def _expand_folders(queries: list[str]) -> list[str]:
    """Image queries with every folder replaced by the images under it (sorted, hidden files
    skipped); a folder without images is an InputError."""
    from ..data import IMAGE_EXTENSIONS

    out: list[str] = []
    for q in queries:
        p = Path(q)
        if not p.is_dir():
            out.append(q)
            continue
        found = sorted(
            str(f)
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {q}")
        out.extend(found)
    return out


def _with_a_face(inf, queries: list[str]) -> list[str]:
    """The queries of a folder given with --faces, less the images without a face (one note
    each on stderr; detections are cached, so embedding them does not detect again)."""
    kept = []
    for q in queries:
        try:
            inf.detect_face(q)
        except InputError as e:
            if not str(e).startswith("no face found"):
                raise
            print(f"note: {e}: skipped", file=sys.stderr)
            continue
        kept.append(q)
    if not kept:
        raise InputError(f"no face found in any of the {len(queries)} query images")
    return kept


def _cmd_search(args) -> int:
    inf = _inference(args)
    index = inf.load_index(args.index)
    queries = args.queries if inf.takes_texts else _expand_folders(args.queries)
    if inf.faces is not None and inf.takes_images and any(Path(q).is_dir() for q in args.queries):
        queries = _with_a_face(inf, queries)
    emb, names = inf.embed_inputs(queries)
    if args.k > len(index):
        print(f"note: -k {args.k} is more than the {len(index)} indexed items; showing all of "
              "them", file=sys.stderr)  # fmt: skip
    dist, ids = inf.search(index, emb, args.k)
    results = [
        {"query": name, "neighbours": hits}
        for name, hits in zip(names, inf.describe_neighbours(index, dist, ids), strict=True)
    ]
    if args.json:
        print_json(results)
        return 0
    column = "text" if inf.takes_texts else "path"
    for r in results:
        print(f"query: {r['query']}")
        # a text index shows each item by its text
        print(f"  {'rank':>4}  {'distance':>9}  {'label':<20} {column}")
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
        "distance threshold calibrated on the run's validation classes "
        "(eval.json) unless --threshold is given.",
    )
    p.add_argument("inputs", nargs="*", help="two image files (two quoted texts for a text model)")
    p.add_argument(
        "--model",
        required=True,
        metavar="RUN_DIR",
        help="a trained run directory (its eval.json holds the calibrated threshold)",
    )
    _add_device(p)
    p.add_argument(
        "--pairs",
        default=None,
        help="CSV file with one pair per line: path_a,path_b (text_a,text_b for a text model)",
    )
    p.add_argument("--threshold", type=float, default=None, help="override the threshold")
    add_faces(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_verify)


def _read_pairs(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            pairs = [
                tuple(c.strip() for c in row[:2])
                for row in csv.reader(f)
                if row and not row[0].startswith("#")
            ]
    except OSError as e:
        raise InputError(f"cannot read pairs file {path}: {e}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise InputError(f"{path}: expected lines 'path_a,path_b'")
    return pairs


def threshold_facts(info: dict | None) -> dict:
    """How a run's threshold was chosen and what it lets through, from its eval.json
    verification block: the rule, the target FAR, the FAR/TAR on the validation identities
    with their 95% intervals, how many identities, and the small-set warning (keys absent where
    the run did not record them, e.g. runs made before these were)."""
    v = info or {}
    keys = {
        "threshold_rule": "threshold_rule",
        "target_far": "target_far",
        "validation_far": "far",
        "validation_far_ci": "far_ci",
        "validation_tar": "tar",
        "validation_tar_ci": "tar_ci",
        "validation_identities": "identities",
        "validation_interval": "interval",
        "validation_warning": "calibration_warning",
    }
    return {new: v[old] for old, new in keys.items() if v.get(old) is not None}


def _cmd_verify(args) -> int:
    if args.pairs:
        pairs = _read_pairs(args.pairs)
    elif len(args.inputs) == 2:
        pairs = [tuple(args.inputs)]
    else:
        raise UsageError(
            f"verify needs two inputs or --pairs FILE (got {len(args.inputs)} input(s))"
        )
    inf = _inference(args)
    threshold = args.threshold if args.threshold is not None else inf.threshold
    if threshold is None:
        raise InputError(f"{args.model}/eval.json has no calibrated threshold; pass --threshold")
    files = sorted({p for pair in pairs for p in pair})
    emb, _ = inf.embed_inputs(files)
    pos = {f: i for i, f in enumerate(files)}
    a = emb[[pos[p[0]] for p in pairs]]
    b = emb[[pos[p[1]] for p in pairs]]
    out = [
        {"a": pa, "b": pb, "distance": r["distance"], "same": r["same"]}
        for (pa, pb), r in zip(pairs, inf.verify(a, b, threshold), strict=True)
    ]
    calibration = {} if args.threshold is not None else threshold_facts(inf.threshold_info)
    if args.json:
        src = "--threshold" if args.threshold is not None else inf.threshold_source
        print_json(
            {
                "threshold": threshold,
                "threshold_source": src,
                **calibration,
                "distance": inf.distance,
                "pairs": out,
            }
        )
        return 0
    if calibration.get("calibration_warning"):
        import sys

        print(f"warning: {calibration['calibration_warning']}", file=sys.stderr)
    for r in out:
        verdict = "SAME" if r["same"] else "DIFFERENT"
        print(
            f"{verdict:<9}  d={r['distance']:.4f} (threshold {threshold:.4f})  {r['a']}  {r['b']}"
        )
    return 0


# ---------------------------------------------------------------------------------- report


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
    from ..report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0
