"""Faces in scenes: AT&T faces pasted into larger textured frames, and the detector's figures.

The generator (:func:`texture`, :func:`paste_scene`) is also used by the tests
(tests/faces/). A face of size (h, w) pasted at ``(x0, y0)`` with scale ``s`` maps a point
``p`` of the original crop to ``s * p + (x0, y0)``; ground truth for a pasted face is the
detection on the original crop mapped through that transform (box and 5 landmarks), so the
error measures what pasting into a scene costs, not how MTCNN's box convention differs from the
crop's border.

Run (figures for docs/faces.md):

    PYTHONPATH=src python benchmarks/faces_in_scenes.py --n 200 --size 640x480 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A colour (h, w, 3) uint8 background: noise at several scales plus a gradient."""
    out = np.zeros((h, w, 3), np.float64)
    for cell, amp in ((64, 90.0), (16, 50.0), (4, 30.0), (1, 15.0)):
        small = rng.normal(0, 1, (max(1, h // cell + 1), max(1, w // cell + 1), 3))
        im = Image.fromarray(
            ((small - small.min()) / (np.ptp(small) + 1e-9) * 255).astype(np.uint8)
        )
        big = np.asarray(im.resize((w, h), Image.BILINEAR), np.float64) / 255.0 - 0.5
        out += amp * big
    yy, xx = np.mgrid[0:h, 0:w]
    out += (40 * rng.uniform(-1, 1)) * (xx / max(w, 1) - 0.5)[..., None]
    out += 128 + 30 * rng.uniform(-1, 1, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def paste_scene(
    faces: list[np.ndarray],
    size: tuple[int, int] = (480, 640),
    scales: tuple[float, float] = (0.3, 1.0),
    rng: np.random.Generator | None = None,
    fixed: list[tuple[int, int, float]] | None = None,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """A (H, W, 3) uint8 frame with ``faces`` (grey (h, w) uint8 arrays) pasted at random
    non-overlapping positions and scales in ``scales`` (or at ``fixed`` ``(x0, y0, scale)``);
    and each paste's ``(x0, y0, scale)``. A face is scaled from the original crop, so its
    size is ``round(scale * (h, w))``, at least 12 pixels."""
    rng = rng or np.random.default_rng(0)
    H, W = size
    frame = texture(H, W, rng)
    placed: list[tuple[float, float, float]] = []
    rects: list[tuple[int, int, int, int]] = []
    for k, face in enumerate(faces):
        h, w = face.shape[:2]
        for _ in range(100):
            if fixed is not None:
                x0, y0, s = fixed[k]
            else:
                s = float(rng.uniform(*scales))
            fh, fw = max(12, round(h * s)), max(12, round(w * s))
            if fh > H or fw > W:
                s = min(H / h, W / w)
                fh, fw = int(h * s), int(w * s)
            if fixed is None:
                x0, y0 = int(rng.integers(0, W - fw + 1)), int(rng.integers(0, H - fh + 1))
            r = (x0, y0, x0 + fw, y0 + fh)
            if fixed is not None or all(
                r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1] for q in rects
            ):
                break
        im = Image.fromarray(face).resize((fw, fh), Image.BILINEAR)
        frame[y0 : y0 + fh, x0 : x0 + fw] = np.asarray(im.convert("RGB"))
        rects.append(r)
        placed.append((float(x0), float(y0), fw / w))  # the exact horizontal scale
    return frame, placed


def _truth(det, paste):
    x0, y0, s = paste
    box = det.boxes[0].numpy() * s + np.array([x0, y0, x0, y0])
    pts = det.landmarks[0].numpy() * s + np.array([x0, y0])
    return box, pts


def _draw(frame: np.ndarray, det, width: int = 320) -> Image.Image:
    """The frame at ``width`` pixels with the boxes (green) and landmarks (red) drawn."""
    from PIL import ImageDraw

    im = Image.fromarray(frame)
    r = width / im.width
    im = im.resize((width, round(im.height * r)), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for b, pts in zip(det.boxes.tolist(), det.landmarks.tolist(), strict=True):
        draw.rectangle([v * r for v in b], outline=(0, 255, 0), width=2)
        for x, y in pts:
            draw.ellipse([x * r - 2, y * r - 2, x * r + 2, y * r + 2], fill=(255, 0, 0))
    return im


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/att_faces")
    ap.add_argument("--n", type=int, default=100, help="number of frames")
    ap.add_argument("--size", default="640x480", help="frame WxH")
    ap.add_argument("--second", type=float, default=0.3, help="share of frames with two faces")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument(
        "--figure", default=None, help="draw the first ten frames' detections into this image"
    )
    args = ap.parse_args(argv)

    import torch

    from tripletlab.faces import MTCNN, box_overlap

    torch.set_num_threads(args.threads)
    W, H = (int(v) for v in args.size.lower().split("x"))
    files = sorted(Path(args.data).glob("s*/*.pgm"))
    if not files:
        print(f"no AT&T faces under {args.data}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    det = MTCNN()
    n_faces = found = false_pos = 0
    crop_missed = 0
    lm_err, box_err, times = [], [], []
    drawn: list = []
    for _ in range(args.n):
        k = 2 if rng.uniform() < args.second else 1
        picks = [files[int(i)] for i in rng.choice(len(files), k, replace=False)]
        faces = [np.asarray(Image.open(p).convert("L")) for p in picks]
        truths = [det.detect(f) for f in faces]
        frame, pastes = paste_scene(faces, (H, W), rng=rng)
        t0 = time.perf_counter()
        d = det.detect(frame)
        times.append(time.perf_counter() - t0)
        if args.figure and len(drawn) < 10:
            drawn.append(_draw(frame, d))
        matched = torch.zeros(len(d), dtype=torch.bool)
        for tdet, paste in zip(truths, pastes, strict=True):
            if len(tdet) == 0:  # the detector misses the original crop: no ground truth
                crop_missed += 1
                continue
            n_faces += 1
            box, pts = _truth(tdet, paste)
            if len(d) == 0:
                continue
            iou = box_overlap(torch.tensor(box[None], dtype=torch.float32), d.boxes)[0]
            j = int(iou.argmax())
            if float(iou[j]) < 0.5:
                continue
            found += 1
            matched[j] = True
            side = box[2] - box[0]
            lm_err.append(float(np.linalg.norm(d.landmarks[j].numpy() - pts, axis=1).mean() / side))
            box_err.append(float(np.abs(d.boxes[j].numpy() - box).mean() / side))
        # detections matching no pasted face (faces whose crop had no detection are not truth;
        # a box over such a face still counts as a false positive here: an upper bound)
        false_pos += int((~matched).sum())
    res = {
        "frames": args.n,
        "frame_size": f"{W}x{H}",
        "threads": args.threads,
        "faces_with_truth": n_faces,
        "original_crops_missed": crop_missed,
        "detection_rate": found / max(n_faces, 1),
        "false_positives": false_pos,
        "mean_landmark_error_over_box_side": float(np.mean(lm_err)) if lm_err else None,
        "mean_box_error_over_box_side": float(np.mean(box_err)) if box_err else None,
        "ms_per_frame_median": 1000 * float(np.median(times)),
        "ms_per_frame_mean": 1000 * float(np.mean(times)),
    }
    if drawn:
        w, h = drawn[0].size
        sheet = Image.new("RGB", (5 * w, 2 * h))
        for i, im in enumerate(drawn):
            sheet.paste(im, ((i % 5) * w, (i // 5) * h))
        sheet.save(args.figure, quality=85)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
