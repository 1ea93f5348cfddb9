"""`tripletlab eval --groups`: the same groups from folder levels, a manifest column and a
path,group file give the same grouped metrics; bad specs are clean errors."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from tripletlab.cli import main

from conftest import make_image_folder

FAST = ["--steps", "6", "--eval-every", "6", "--log-every", "3", "--embedding-dim", "8"]


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory):
    """A tiny image run, and a manifest of its images moved under cam0/ and cam1/ folders,
    with a camera column."""
    base = tmp_path_factory.mktemp("cli_groups")
    data = make_image_folder(base / "faces", n_classes=4, per_class=6, size=(12, 10))
    run = base / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--p", "2", "--k", "3"]
    args += ["--test-classes", "class3", "--val-fraction", "0", *FAST, "--quiet", "--no-report"]
    assert main(args) == 0
    rows = []
    for c in range(4):
        for i, img in enumerate(sorted((data / f"class{c}").iterdir())):
            rel = f"cam{i % 2}/c{c}_{img.name}"
            (base / rel).parent.mkdir(exist_ok=True)
            shutil.copy(img, base / rel)
            rows.append({"path": rel, "label": f"class{c}", "camera": f"cam{i % 2}"})
    manifest = base / "items.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "camera"])
        w.writeheader()
        w.writerows(rows)
    groups = base / "groups.tsv"
    groups.write_text(
        "path\tgroup\n" + "".join(f"{r['path']}\t{r['camera']}\n" for r in rows[::-1])
    )
    return run, manifest, groups


def _eval(capsys, run, manifest, *extra):
    code = main(["eval", "--model", str(run), "--data", str(manifest), "--json", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_eval_groups_from_levels_column_and_file_agree(cam_run, capsys):
    run, manifest, groups = cam_run
    code, plain = _eval(capsys, run, manifest)
    assert code == 0 and "groups" not in plain["retrieval"]
    results = []
    for spec in ("path:1", "column:camera", str(groups)):
        code, r = _eval(capsys, run, manifest, "--groups", spec)
        assert code == 0, r
        results.append(r["retrieval"])
    assert results[0] == results[1] == results[2]
    g = results[0]
    assert g["groups"] == 2 and "mean_average_precision" in g and "minp" in g
    assert g["n_queries_evaluated"] == 24  # 3 same-label items in the other camera each
    assert plain["verification"] == r["verification"]  # verification does not use groups
    assert main(["eval", "--model", str(run), "--data", str(manifest), "--groups", "path:1"]) == 0
    text = capsys.readouterr().out
    assert "mAP=" in text and "mINP=" in text and "2 groups" in text


def test_eval_groups_bad_specs_are_clean_errors(cam_run, capsys, tmp_path):
    run, manifest, _ = cam_run
    code, err = _eval(capsys, run, manifest, "--groups", "column:session")
    assert code == 1 and "no column 'session'" in err and "Traceback" not in err
    code, err = _eval(capsys, run, manifest, "--groups", "path:0")
    assert code == 1 and "N >= 1" in err
    partial = tmp_path / "g.csv"
    partial.write_text(f"path,group\n{manifest.parent / 'cam0' / 'c0_img0.png'},a\n")
    code, err = _eval(capsys, run, manifest, "--groups", str(partial))
    assert code == 1 and "has no group for" in err and "c0_img1" in err
    code, err = _eval(capsys, run, manifest, "--groups", str(tmp_path / "missing.csv"))
    assert code == 1 and "not found" in err
