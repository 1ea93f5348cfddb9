"""load_groups: folder levels, manifest columns, path,group files, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from tripletlab import InputError
from tripletlab.data.groups import load_groups, manifest_columns
from tripletlab.errors import FileFormatError, MissingFileError


def test_levels_count_folders_above_the_file():
    paths = ["r/s1/cam1/a.png", "r/s1/cam2/b.png", "r/s2/cam1/c.png"]
    assert load_groups("path:1", paths, 3).tolist() == [0, 1, 0]
    assert load_groups("path:2", paths, 3).tolist() == [0, 0, 1]
    assert load_groups(None, paths, 3) is None
    with pytest.raises(InputError, match="fewer than 4 folders"):
        load_groups("path:4", paths, 3)
    for bad in ("path:0", "path:x", "path:-1"):
        with pytest.raises(InputError, match="N >= 1"):
            load_groups(bad, paths, 3)
    with pytest.raises(InputError, match="file paths"):
        load_groups("path:1", None, 3)
    with pytest.raises(InputError, match="3 paths for 4 items"):
        load_groups("path:1", paths, 4)


def test_file_relative_to_its_folder_any_order(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "groups.csv"
    f.write_text(f"group,path\nB,x/b.png\nA,x/a.png\nA,{tmp_path / 'c.png'}\n")
    paths = [str(tmp_path / "d" / "x" / "a.png"), str(tmp_path / "d/x/../x/b.png")]
    paths.append(str(tmp_path / "c.png"))
    assert load_groups(str(f), paths, 3).tolist() == [0, 1, 0]
    with pytest.raises(InputError, match="no group for .*z.png"):
        load_groups(str(f), [*paths[:2], str(tmp_path / "z.png")], 3)
    tsv = tmp_path / "g.tsv"
    tsv.write_text("path\tgroup\nd/x/a.png\t7\n")
    assert load_groups(str(tsv), paths[:1], 1).tolist() == [0]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,group\na.png,1\n")
    with pytest.raises(FileFormatError, match="no 'path' column"):
        load_groups(str(bad), paths[:1], 1)
    bad.write_text("path,group\na.png,\n")
    with pytest.raises(FileFormatError, match="line 2: empty"):
        load_groups(str(bad), paths[:1], 1)
    with pytest.raises(MissingFileError, match="not found"):
        load_groups(str(tmp_path / "none.csv"), paths, 3)


def test_manifest_column(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,label,camera\nq/a.png,1,c1\nq/b.png,1,c2\nq/c.png,2,c1\n")
    paths = [str(tmp_path / "q" / n) for n in ("c.png", "a.png", "b.png")]
    cols = manifest_columns(m, paths)
    assert cols["camera"] == ["c1", "c1", "c2"]
    assert np.array_equal(load_groups("column:camera", paths, 3, csv_columns=cols), [0, 0, 1])
    with pytest.raises(InputError, match="no column 'session'.*camera"):
        load_groups("column:session", paths, 3, csv_columns=cols)
    with pytest.raises(InputError, match="CSV manifest"):
        load_groups("column:camera", paths, 3)
    with pytest.raises(InputError, match="does not list"):
        manifest_columns(m, [str(tmp_path / "q" / "z.png")])
    with pytest.raises(InputError, match="CSV manifest"):
        manifest_columns(tmp_path / "m.jsonl", paths)
