"""Commands that put a trained run to use elsewhere: ``serve`` (HTTP API + web page) and
``export`` (ONNX). Both need the ``serve`` extra; the work is in :mod:`tripletlab.serve` and
:mod:`tripletlab.inference.onnx`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError, missing_dependency, require
from ._base import add_faces, add_postprocess, print_json, register_command


@register_command("serve")
def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API + web page: search, verify, identify, enrol (needs the serve extra)",
        description="Serve a trained run over HTTP (FastAPI + uvicorn): a web page at /, "
        "POST /search /verify /identify /embed, a gallery (POST/GET /gallery, DELETE "
        "/gallery/ID) persisted in --index, /healthz, /metrics and the API docs at /docs. "
        "Binds to 127.0.0.1 unless --host says otherwise. See docs/serving.md.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument(
        "--index",
        metavar="DIR",
        default=None,
        help="gallery index directory (e.g. from `tripletlab index`; created on the first "
        "enrolment); without it the gallery lives in memory only",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--token",
        default=None,
        help="bearer token required on every API route (default: $TRIPLETLAB_TOKEN; none = "
        "open, fine on localhost only)",
    )
    p.add_argument(
        "--read-token",
        default=None,
        help="an extra token that may search/verify/identify/embed/list but not change the "
        "gallery (default: $TRIPLETLAB_READ_TOKEN)",
    )
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch", help="torch | onnx")
    p.add_argument(
        "--onnx",
        default=None,
        metavar="FILE",
        help="exported model for --runtime onnx (default: export the run at start-up)",
    )
    p.add_argument("--threshold", type=float, default=None, help="override the run's threshold")
    add_postprocess(p, "of /search and /identify (a gallery built with another is refused)")
    add_faces(p)
    p.add_argument(
        "--all-faces",
        action="store_true",
        help="with --faces (or a run trained with it): /search and /identify answer one "
        "result per face of the photo ('faces'), the largest first (its result stays the "
        "top-level answer)",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request size limit (10)")
    p.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="pixels per image (16,777,216)"
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per model call (64)")
    p.add_argument(
        "--max-request-pixels",
        type=int,
        default=4 * 4096 * 4096,
        help="decoded pixels of all images of one request, checked from their headers "
        "before decoding (67,108,864)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections; above it requests get 503 (256)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send its request headers (10); slower ones are closed",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for inference (torch or onnx)"
    )
    p.set_defaults(func=_cmd_serve)


def _token(given: str | None, flag: str, env_var: str) -> str | None:
    """The token of ``flag``, else of ``$env_var``, else ``None`` (no authentication). A given
    but empty or blank one is an error, never "no token": ``--token "$UNSET_VAR"`` must not
    open the server."""
    import os

    if given is None:
        given = os.environ.get(env_var)
        flag = f"${env_var}"
    if given is not None and not given.strip():
        raise InputError(
            f"{flag} is empty: give a token (e.g. `openssl rand -hex 16`), or leave {flag} "
            "out altogether to serve without authentication"
        )
    return given


def _cmd_serve(args) -> int:
    import ipaddress
    import math

    try:
        from ..serve import ServeSettings, create_app, run_server
    except ImportError as e:
        raise missing_dependency(e.name or "fastapi", "`tripletlab serve`") from None
    from ..serve.app import READ_TOKEN_ENV, TOKEN_ENV

    token = _token(args.token, "--token", TOKEN_ENV)
    read_token = _token(args.read_token, "--read-token", READ_TOKEN_ENV)
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number, got {args.threshold}")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be at least 1, got {args.max_connections}")
    if not (math.isfinite(args.header_timeout) and args.header_timeout > 0):
        raise InputError(f"--header-timeout must be a positive number, got {args.header_timeout}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ServeSettings(
        token=token,
        read_token=read_token,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        max_request_pixels=args.max_request_pixels,
        max_inflight_pixels=max(16 * 4096 * 4096, args.max_request_pixels),
        threshold=args.threshold,
        all_faces=args.all_faces,
    )
    app = create_app(
        args.model,
        index=args.index,
        settings=settings,
        runtime=args.runtime,
        onnx_path=args.onnx,
        threads=args.threads or 0,
        postprocess=args.postprocess,
        faces=args.faces,
    )
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and token is None:
        print(
            f"warning: serving on {args.host} without a token: anyone who can reach it may "
            "change the gallery (set --token or TRIPLETLAB_TOKEN)",
            file=sys.stderr,
        )
    emb = app.state.embedder
    rt = getattr(emb, "runtime", "torch")
    print(
        f"serving {args.model} ({rt}, {emb.distance}, threshold "
        f"{args.threshold if args.threshold is not None else emb.threshold}) with "
        f"a gallery of {len(app.state.store)} items on http://{args.host}:{args.port}/",
        flush=True,
    )
    run_server(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
    )
    return 0


@register_command("export")
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's model to ONNX (with --check-data: checked against PyTorch)",
        description="Write the model as ONNX (dynamic batch axis; the preprocessing, distance "
        "and threshold in its metadata). With --check-data, embed up to 64 images of that "
        "folder with both runtimes and report the max abs difference and CPU latency.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only one)")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (20)")
    p.add_argument(
        "--check-data",
        default=None,
        metavar="DIR",
        help="compare the ONNX model with PyTorch on up to 64 images of DIR (without it the "
        "export is not checked)",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference (1e-4)")
    p.add_argument("--threads", type=int, default=1, help="threads for the latency check (1)")
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    try:
        from ..inference.onnx import compare_onnx, export_onnx
    except ImportError as e:  # pragma: no cover
        raise missing_dependency(e.name or "onnx", "`tripletlab export`") from None
    require("onnx", "`tripletlab export`")  # before any work
    from ..utils import check_replaceable

    check_replaceable(args.out)  # before the work: never rename over /dev/full or a FIFO
    out = export_onnx(args.model, args.out, opset=args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if not args.check_data:
        return 0
    import os

    from ..data import IMAGE_EXTENSIONS

    root = Path(args.check_data)

    def unreadable(e: OSError) -> None:  # a sample to compare on: say so, and go on
        print(f"warning: cannot read folder {e.filename}: {e.strerror}", file=sys.stderr)

    files = sorted(
        os.path.join(d, f)
        for d, _, names in os.walk(root, onerror=unreadable)
        for f in names
        if Path(f).suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InputError(f"no images under {root}")
    files = files[:: max(1, len(files) // 64)][:64]
    print(
        f"checking against PyTorch on {len(files)} images of {root} (embeddings, then latency "
        "at a few batch sizes)...",
        file=sys.stderr,
        flush=True,
    )
    r = compare_onnx(args.model, out, files, threads=args.threads)
    r["tolerance"] = args.tolerance
    r["ok"] = r["max_abs_diff"] <= args.tolerance
    if args.json:
        print_json(r)
    else:
        print(
            f"checked on {r['n_images']} images: max abs difference {r['max_abs_diff']:.2e} "
            f"({'ok' if r['ok'] else 'ABOVE'} tolerance {args.tolerance:g})"
        )
        for bs, t in r["latency_ms"].items():
            print(
                f"  batch {bs:>3}: torch {t['torch']:.2f} ms, onnxruntime {t['onnx']:.2f} ms "
                f"({t['speedup']:.2f}x), {args.threads} thread(s)"
            )
    return 0 if r["ok"] else 1
