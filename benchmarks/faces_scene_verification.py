"""Face verification in scenes (issue #26): whole-image embedding vs ``--faces``, through the CLI.

The people splits are the cross-domain protocol's (``benchmarks/face_protocol.py``, fixed,
never chosen by a test score): AT&T s1-s25 train, s26-s30 validation, s31-s40 test; Extended
Yale B the first 15 people train, the next 5 validation. Every photo of the AT&T validation
and test people is pasted alone into its own textured 640x480 frame (``faces_in_scenes``'s
generator; a random position and scale 0.3-1.0 of the 92x112 crop, seeded per photo).

Runs, all ``--config faces`` on the AT&T + Yale B training people (the AT&T test people held
out by name) with ``--val-data`` the two sources' validation people (``--val-mode only``):
``none`` (whole images), ``arcface`` and ``head`` (``--faces``, crop 136), ``arcface<S>``
(``--faces arcface --face-size S``); ``arcface64-photos`` is validated (its step, head and
threshold chosen) on the AT&T validation people in scenes instead of crops;
``photos-arcface`` and ``photos-arcface64`` also train on the AT&T training people in scenes
(photos, as a user's own training folder would be). Each run is
scored (``tripletlab eval --data``) on the validation people: AT&T crops, AT&T scenes and
Yale B crops, which choose the template, the face size and whether ``--faces`` pays; the
test people (AT&T crops and scenes) are scored afterwards, once, for the record.

    PYTHONPATH=src python benchmarks/faces_scene_verification.py build
    PYTHONPATH=src python benchmarks/faces_scene_verification.py train   # the three runs
    PYTHONPATH=src python benchmarks/faces_scene_verification.py eval    # the table (JSON + md)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from face_protocol import att_split as att_part  # noqa: E402
from face_protocol import yale_split as yale_parts  # noqa: E402
from faces_in_scenes import paste_scene  # noqa: E402

DATA = (HERE.parent / ".." / "shared" / "data").resolve()
if not DATA.exists():
    DATA = Path("/work/shared/data")
WORK = Path("/work/cache/face_scenes")
RUNS = ("none", "arcface", "head", "arcface32", "arcface48", "arcface64", "arcface96",
        "arcface64-photos", "photos-arcface", "photos-arcface64")  # fmt: skip


def run_options(name: str) -> list[str]:
    """The training options of run ``name`` (see the module docstring)."""
    if name == "none":
        return ["--faces", "none"]
    base = name.removesuffix("-photos").removeprefix("photos-")
    template = base.rstrip("0123456789")
    size = base[len(template) :] or "136"
    return ["--faces", template, "--face-size", size]


def stage_build(work: Path, size=(480, 640)) -> None:
    """Class folders of crops per part, and the AT&T validation and test people in scenes."""
    att, yale = DATA / "att_faces", DATA / "extended_yale_b"
    parts = {p.name: att_part(p.name) for p in att.iterdir() if p.is_dir()}
    for person, part in parts.items():
        shutil.copytree(att / person, work / "crops" / f"att_{part}" / person, dirs_exist_ok=True)
        if part != "val":  # the training source: the test people are held out by name
            shutil.copytree(att / person, work / "crops" / "att" / person, dirs_exist_ok=True)
    ysplit = yale_parts([p.name for p in yale.iterdir() if p.is_dir()])
    for person, part in ysplit.items():
        if part != "test":
            dst = work / "crops" / f"yale_{part}" / person
            shutil.copytree(yale / person, dst, dirs_exist_ok=True)
    pastes = {}
    for part in ("train", "val", "test"):
        for person in sorted(p for p, q in parts.items() if q == part):
            for f in sorted((att / person).iterdir()):
                seed = int(person[1:]) * 100 + int(f.stem)
                face = np.asarray(Image.open(f).convert("L"))
                frame, placed = paste_scene([face], size, rng=np.random.default_rng(seed))
                # scenes/att_val, scenes/att_test: scored; scenes/att (training people and
                # the test people, held out by name): the training source of the photos- runs
                folders = {"train": ["att"], "val": ["att_val"], "test": ["att_test", "att"]}
                for folder in folders[part]:
                    out = work / "scenes" / folder / person / f"{f.stem}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(frame).save(out)
                    pastes[str(out.relative_to(work))] = placed[0]
    (work / "scenes" / "pastes.json").write_text(json.dumps(pastes, indent=0))
    print(f"built {work}: crops {sorted(p.name for p in (work / 'crops').iterdir())}, "
          f"{len(pastes)} scenes")  # fmt: skip


def cli(argv: list[str]) -> tuple[int, str]:
    from tripletlab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def stage_train(work: Path, runs: list[str], extra: list[str]) -> None:
    c = work / "crops"
    for name in runs:
        out = work / "runs" / name
        if (out / "model.pt").exists() or (out / "config.json").exists() and not extra:
            print(f"{name}: exists ({out})")
            continue
        test = ",".join(f"att/s{i}" for i in range(31, 41))
        # "-photos": the AT&T validation people in scenes, not crops, pick the step and
        # calibrate the threshold (validated on photos like the ones it will be used on)
        photos = name.endswith("-photos") or name.startswith("photos-")
        att_val = work / "scenes" / "att_val" if photos else c / "att_val"
        # "photos-": trained on the AT&T training people in scenes too (a user's own photos)
        att = work / "scenes" / "att" if name.startswith("photos-") else c / "att"
        argv = ["train", "--data", str(att), "--data", str(c / "yale_train"),
                "--val-data", str(att_val), "--val-data", str(c / "yale_val"),
                "--val-mode", "only", "--test-classes", test, "--config", "faces",
                "--out", str(out), "--no-report", *run_options(name), *extra]  # fmt: skip
        t = time.time()
        rc, _ = cli(argv)
        print(f"{name}: rc {rc}, {time.time() - t:.0f} s", flush=True)


def score(run: Path, folder: Path, faces: str | None = None) -> dict:
    argv = ["eval", "--model", str(run), "--data", str(folder), "--json", "--postprocess", "none"]
    if faces is not None:
        argv += ["--faces", faces]
    rc, out = cli(argv)
    if rc != 0:
        return {"error": rc}
    r = json.loads(out)
    v, q = r.get("verification", {}), r.get("retrieval", {})
    keep = {k: v.get(k) for k in ("roc_auc", "eer", "far_at_threshold", "tar_at_threshold")}
    keep.update({k: q.get(k) for k in ("precision_at_1", "map_at_r")})
    if "faces" in r:
        keep["faces"] = r["faces"]
    return keep


SETS = {  # (people, images, folder under WORK)
    "val": [("crops", "crops/att_val"), ("scenes", "scenes/att_val"), ("yale", "crops/yale_val")],
    "test": [("crops", "crops/att_test"), ("scenes", "scenes/att_test")],
}


def stage_eval(work: Path, out_json: Path, parts=("val", "test")) -> None:
    rows = []
    for name in RUNS:
        run = work / "runs" / name
        if not (run / "config.json").exists():
            continue
        for part in parts:
            for kind, folder in SETS[part]:
                t = time.time()
                r = score(run, work / folder, None)  # the run's own --faces and --face-size
                rows.append({"run": name, "people": part, "images": kind, **r,
                             "seconds": round(time.time() - t, 1)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    out_json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows``: one line per run, AUC / EER per (people, images)."""
    cols = [(p, k) for p in SETS for k, _ in SETS[p]]
    head = " | ".join(f"{p} {k}" for p, k in cols)
    out = [f"| run | {head} |", "|---" * (len(cols) + 1) + "|"]
    for name in RUNS:
        cells = []
        for p, k in cols:
            r = next((x for x in rows if (x["run"], x["people"], x["images"]) == (name, p, k)), {})
            ok = r.get("roc_auc") is not None
            cells.append(f"{r['roc_auc']:.3f} / {100 * r['eer']:.1f}%" if ok else "-")
        if any(c != "-" for c in cells):
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["build", "train", "eval"])
    ap.add_argument("--parts", default="val,test", help="eval: val, test or both")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--json", type=Path, default=None)
    args, extra = ap.parse_known_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "build":
        stage_build(args.work)
    elif args.stage == "train":
        stage_train(args.work, args.runs.split(","), extra)
    else:
        out = args.json or args.work / f"scene_verification_{args.parts.replace(',', '_')}.json"
        stage_eval(args.work, out, tuple(args.parts.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
