"""Text data files (.csv/.tsv/.jsonl): labelled texts, triplet files and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tripletlab.data import split_dataset
from tripletlab.data.text import (
    TextTriplets,
    is_text_file,
    load_text_dataset,
    load_text_file,
    load_text_triplets,
)
from tripletlab.errors import FileFormatError, InputError, MissingFileError

ROWS = [
    ("a bond issued by a corporation", "bond"),
    ("a bond that is an IOU of the United States Treasury", "bond"),
    ("a small domesticated feline", "cat"),
    ("a wild feline of the forest, often striped", "cat"),
    ("a young cat", "cat"),
]


def write_csv(path, rows, header="text,label"):
    lines = [header] + [",".join(f'"{v}"' for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_labelled_formats_load_the_same(tmp_path, ext):
    p = tmp_path / f"data{ext}"
    if ext == ".csv":
        write_csv(p, ROWS)
    elif ext == ".tsv":
        p.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in ROWS))
    else:
        p.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    ds = load_text_file(p)
    assert ds.kind == "text"
    assert ds.texts == [t for t, _ in ROWS]
    assert ds.classes == ["bond", "cat"]
    assert ds.y.tolist() == [0, 0, 1, 1, 1]
    assert ds.x.tolist() == [0, 1, 2, 3, 4]
    assert is_text_file(p)


def test_csv_quoted_commas_and_newlines_and_bom(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes(
        '\ufefftext,label\n"one, two",a\n"line one\nline two",a\n"three",b\n"four",b\n'.encode()
    )
    ds = load_text_dataset(p)
    assert ds.texts[:2] == ["one, two", "line one\nline two"]
    assert ds.info["lines"] == [2, 3, 5, 6]  # the row starting on line 3 spans two lines


def test_subset_and_class_split_keep_texts(tmp_path):
    ds = load_text_dataset(write_csv(tmp_path / "d.csv", ROWS))
    train, test, info = split_dataset(ds, by="class", test_classes=["bond"])
    assert test.texts == [ROWS[0][0], ROWS[1][0]]
    assert train.texts == [r[0] for r in ROWS[2:]]
    assert train.x.tolist() == [2, 3, 4]  # row numbers of the file survive the split


def test_triplet_file(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(
        json.dumps({"anchor": "a cat", "positive": "a kitten", "negative": "a car"})
        + "\n\n"
        + json.dumps({"anchor": "a dog", "positive": "a puppy", "negative": "a bus"})
        + "\n"
    )
    t = load_text_file(p)
    assert isinstance(t, TextTriplets)
    assert (t.anchors, t.positives, t.negatives) == (
        ["a cat", "a dog"],
        ["a kitten", "a puppy"],
        ["a car", "a bus"],
    )
    assert t.lines == [1, 3]
    assert t.subset([1]).negatives == ["a bus"]
    with pytest.raises(InputError, match="text,label"):
        load_text_dataset(p)


# ------------------------------------------------------------------------------ bad input


def test_empty_text_names_the_line(tmp_path):
    p = write_csv(tmp_path / "e.csv", [*ROWS[:2], ("  ", "bond"), *ROWS[2:]])
    with pytest.raises(InputError, match=r"line 4: empty text.*--skip-bad"):
        load_text_dataset(p)
    with pytest.warns(UserWarning, match=r"skipped 1 rows: line 4 \(empty text\)"):
        ds = load_text_dataset(p, skip_bad=True)
    assert len(ds) == len(ROWS)


def test_empty_triplet_field_names_the_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("anchor,positive,negative\na,b,c\nd,,f\n")
    with pytest.raises(InputError, match=r"line 3: empty positive"):
        load_text_triplets(p)


def test_file_without_label_column(tmp_path):
    p = tmp_path / "nolabel.csv"
    p.write_text("text,category\nhello,a\nworld,b\n")
    with pytest.raises(InputError, match=r"no 'label' column \(columns: text, category\)"):
        load_text_file(p)
    p2 = tmp_path / "other.jsonl"
    p2.write_text('{"sentence": "x"}\n')
    with pytest.raises(InputError, match="expected text,label or anchor,positive,negative"):
        load_text_file(p2)


def test_labels_with_one_item(tmp_path):
    p = write_csv(tmp_path / "one.csv", [*ROWS, ("a lone dog", "dog")])
    with pytest.warns(UserWarning, match="1 of 3 labels have a single text"):
        ds = load_text_dataset(p)
    assert ds.classes == ["bond", "cat", "dog"]
    assert torch.bincount(ds.y).tolist() == [2, 3, 1]  # kept: a negative for the others
    p2 = write_csv(tmp_path / "all_single.csv", [("x", "a"), ("y", "b"), ("z", "c")])
    with pytest.raises(InputError, match="every label has a single text"):
        load_text_dataset(p2)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_non_utf8_bytes_name_the_line(tmp_path, ext):
    p = tmp_path / f"latin1{ext}"
    head = {".csv": b"text,label\n", ".tsv": b"text\tlabel\n", ".jsonl": b""}[ext]
    good = {
        ".csv": b"fine,a\n",
        ".tsv": b"fine\ta\n",
        ".jsonl": b'{"text": "fine", "label": "a"}\n',
    }
    bad = "caf\u00e9".encode("latin-1")
    row = {".csv": bad + b",a\n", ".tsv": bad + b"\ta\n", ".jsonl": b'{"text": "' + bad + b'"}\n'}
    p.write_bytes(head + good[ext] * 2 + row[ext])
    line = 4 if head else 3
    with pytest.raises(FileFormatError, match=rf"line {line}: bytes .* are not UTF-8"):
        load_text_file(p)


def test_malformed_rows(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("text,label\nok,a\ntoo,many,fields\n")
    with pytest.raises(FileFormatError, match="line 3: 3 fields but the header has 2"):
        load_text_file(p)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n{not json}\n')
    with pytest.raises(FileFormatError, match="line 2: not a JSON object"):
        load_text_file(j)
    e = tmp_path / "empty.csv"
    e.write_text("")
    with pytest.raises(FileFormatError, match="empty file"):
        load_text_file(e)
    with pytest.raises(MissingFileError, match="not found"):
        load_text_file(tmp_path / "missing.csv")
    with pytest.raises(FileFormatError, match="is a folder, not a text data file"):
        load_text_file(tmp_path)  # a folder is not a text file
