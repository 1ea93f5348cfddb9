"""Text data files: labelled texts (``text,label``) and triplets (``anchor,positive,negative``).

Formats, chosen by the file's extension:

* ``.csv`` — comma-separated with a header row, quoted fields as Python's ``csv`` reads them
  (a quoted field may span lines);
* ``.tsv`` — tab-separated with a header row, no quoting (a tab or newline cannot occur in a field);
* ``.jsonl`` — one JSON object per line (blank lines are skipped).

The file is UTF-8 (a leading byte-order mark is allowed). Errors name the file and the line:
bytes that are not UTF-8, a missing column, an empty text, a missing label, bad JSON. With
``skip_bad=True`` rows with an empty text or label are skipped with one warning that counts them
(undecodable bytes are always an error: the file is not a text file of this kind).

Labelled texts load as a :class:`~tripletlab.data.Dataset` of kind ``"text"``: ``texts`` holds the
strings, ``x`` the row numbers (0-based, in file order) so that subsets and splits keep working.
Triplet files load as :class:`TextTriplets`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FileFormatError, InputError, MissingFileError
from .dataset import Dataset, natural_key

__all__ = [
    "TEXT_EXTENSIONS",
    "is_triplet_file",
    "TextTriplets",
    "is_text_file",
    "load_text_dataset",
    "load_text_file",
    "load_text_triplets",
    "read_text_rows",
]

TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl")
_LABELLED = ("text", "label")
_TRIPLET = ("anchor", "positive", "negative")


def is_text_file(path: str | os.PathLike[str]) -> bool:
    """True for ``.tsv``/``.jsonl`` files, and ``.csv`` files whose header has a ``text`` or
    ``anchor`` column (other ``.csv`` files are numeric vector files)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in (".tsv", ".jsonl"):
        return True
    if ext != ".csv" or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    except OSError:
        return False
    try:  # a stray carriage return or NUL byte: not a text file; the loader names the problem
        row = next(csv.reader(first.splitlines()[:1]), [])
    except csv.Error:
        return False
    header = {h.strip().lower() for h in row}
    return "text" in header or "anchor" in header


def is_triplet_file(path: str | os.PathLike[str]) -> bool:
    """True for a text file whose columns include ``anchor,positive,negative``."""
    if not is_text_file(path) or not Path(path).is_file():
        return False
    try:
        columns, _ = read_text_rows(path)
    except (FileFormatError, InputError):
        return False  # loading it reports the problem
    return set(_TRIPLET) <= set(columns)


@dataclass
class TextTriplets:
    """Explicit (anchor, positive, negative) texts from a triplet file.

    Example:
        >>> t = TextTriplets(["a cat"], ["a kitten"], ["a car"], name="tiny")
        >>> len(t), t.subset([0]).anchors
        (1, ['a cat'])
    """

    anchors: list[str]
    positives: list[str]
    negatives: list[str]
    name: str = ""
    lines: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.anchors) == len(self.positives) == len(self.negatives):
            raise InputError("anchors, positives and negatives must have the same length")

    def __len__(self) -> int:
        return len(self.anchors)

    kind = "triplets"
    classes = ()  # no labels

    def summary(self) -> dict:
        """Counts for the run's config.json."""
        return {
            "name": self.name,
            "kind": self.kind,
            "items": len(self),
            "classes": 0,
            "input_shape": [],
        }

    def subset(self, indices) -> TextTriplets:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return TextTriplets(
            [self.anchors[i] for i in idx],
            [self.positives[i] for i in idx],
            [self.negatives[i] for i in idx],
            name=self.name,
            lines=[self.lines[i] for i in idx] if self.lines else [],
        )


def decode_text(path: Path, data: bytes) -> str:
    """The text of a file's bytes (UTF-8, with or without BOM); a clear error names the file,
    the line and the bytes that are not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        bad = data[e.start : e.start + 4]
        raise FileFormatError(
            f"{path}: line {line}: bytes {bad!r} are not UTF-8; save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def read_text_rows(path: str | os.PathLike[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """``(columns, [(line, row dict), ...])`` of a ``.csv``/``.tsv``/``.jsonl`` file.

    ``line`` is the 1-based line where the row starts. Column names are lower-cased and stripped.

    Example:
        >>> cols, rows = read_text_rows("data.csv")  # doctest: +SKIP
        >>> cols, rows[0]  # doctest: +SKIP
        (['text', 'label'], (2, {'text': 'a bond issued by a corporation', 'label': 'bond'}))
    """
    p = Path(path)
    if p.is_dir():
        raise FileFormatError(f"{p} is a folder, not a text data file (.csv/.tsv/.jsonl)")
    if not p.is_file():
        raise MissingFileError(f"text file not found: {p}")
    ext = p.suffix.lower()
    if ext not in TEXT_EXTENSIONS:
        raise FileFormatError(
            f"{p}: not a text data file (use {', '.join(TEXT_EXTENSIONS)} with columns "
            "text,label or anchor,positive,negative)"
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read {p}: {e}") from None
    text = decode_text(p, data)
    if ext == ".jsonl":
        return _read_jsonl(p, text)
    return _read_delimited(p, text, "\t" if ext == ".tsv" else ",")


def _read_jsonl(p: Path, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    rows: list[tuple[int, dict]] = []
    columns: list[str] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{p}: line {i}: not a JSON object: {e.msg}") from None
        if not isinstance(obj, dict):
            raise FileFormatError(
                f"{p}: line {i}: expected a JSON object, got {type(obj).__name__}"
            )
        row = {str(k).strip().lower(): v for k, v in obj.items()}
        for k in row:
            if k not in columns:
                columns.append(k)
        rows.append((i, row))
    return columns, rows


def _read_delimited(p: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, dict]]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise FileFormatError(f"{p}: empty file (expected a header row, e.g. text,label)") from None
    except csv.Error as e:
        raise FileFormatError(f"{p}: line 1: {e}") from None
    columns = [h.strip().lower() for h in header]
    rows: list[tuple[int, dict]] = []
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise FileFormatError(f"{p}: line {start}: {e}") from None
        if values and any(v.strip() for v in values):
            if len(values) != len(columns):
                raise FileFormatError(
                    f"{p}: line {start}: {len(values)} fields but the header has {len(columns)} "
                    f"({', '.join(columns)}); quote fields that contain '{delimiter}'"
                    if delimiter == ","
                    else f"{p}: line {start}: {len(values)} fields but the header has "
                    f"{len(columns)} ({', '.join(columns)})"
                )
            rows.append((start, dict(zip(columns, values, strict=True))))
        start = reader.line_num + 1
    return columns, rows


def _kind(p: Path, columns: list[str]) -> str:
    cols = set(columns)
    if set(_TRIPLET) <= cols:
        return "triplets"
    if "text" in cols and "label" in cols:
        return "labelled"
    if "text" in cols:
        raise InputError(
            f"{p}: no 'label' column (columns: {', '.join(columns) or 'none'}); a labelled text "
            "file needs text,label (or anchor,positive,negative for triplets)"
        )
    raise InputError(
        f"{p}: columns {', '.join(columns) or 'none'}: expected text,label or "
        "anchor,positive,negative"
    )


def _clean(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _report_skipped(p: Path, skipped: list[tuple[int, str]]) -> None:
    if skipped:
        first = ", ".join(f"line {n} ({why})" for n, why in skipped[:5])
        warnings.warn(f"{p}: skipped {len(skipped)} rows: {first}", stacklevel=3)


def load_text_file(path: str | os.PathLike[str], skip_bad: bool = False) -> Dataset | TextTriplets:
    """A labelled text file as a :class:`Dataset`, or a triplet file as :class:`TextTriplets`."""
    p = Path(path)
    columns, rows = read_text_rows(p)
    if _kind(p, columns) == "triplets":
        return load_text_triplets(p, skip_bad=skip_bad, _rows=(columns, rows))
    return load_text_dataset(p, skip_bad=skip_bad, _rows=(columns, rows))


def load_text_dataset(path: str | os.PathLike[str], skip_bad: bool = False, _rows=None) -> Dataset:
    """Load ``text,label`` rows as a :class:`Dataset` of kind ``"text"``.

    Texts are kept as written (stripped of surrounding whitespace); labels are strings and
    classes are numbered in natural sort order. Classes with a single text cannot give a positive
    pair; they are kept (as negatives and for retrieval) and counted in a warning.

    Example:
        >>> ds = load_text_dataset("../shared/data/wordnet/hyponym_glosses.csv")  # doctest: +SKIP
        >>> ds.kind, len(ds), ds.texts[0]  # doctest: +SKIP
        ('text', 25276, '...')
    """
    p = Path(path)
    columns, rows = _rows if _rows is not None else read_text_rows(p)
    if _kind(p, columns) != "labelled":
        raise InputError(f"{p}: expected text,label columns, got {', '.join(columns)}")
    texts, labels, lines = [], [], []
    skipped: list[tuple[int, str]] = []
    for line, row in rows:
        t = _clean(row.get("text")).strip()
        lab = _clean(row.get("label")).strip()
        why = "empty text" if not t else "empty label" if not lab else ""
        if why:
            if skip_bad:
                skipped.append((line, why))
                continue
            raise InputError(f"{p}: line {line}: {why} (fix the row, or pass --skip-bad)")
        texts.append(t)
        labels.append(lab)
        lines.append(line)
    _report_skipped(p, skipped)
    if not texts:
        raise InputError(f"{p}: no labelled texts")
    classes = sorted(set(labels), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[lab] for lab in labels], dtype=torch.long)
    counts = torch.bincount(y, minlength=len(classes))
    singles = int((counts == 1).sum())
    if singles == len(classes):
        raise InputError(
            f"{p}: every label has a single text, so no positive pair exists; a triplet loss "
            "needs at least 2 texts of some label"
        )
    if singles:
        warnings.warn(
            f"{p}: {singles} of {len(classes)} labels have a single text (no positive pair; "
            "they only serve as negatives)",
            stacklevel=2,
        )
    return Dataset(
        x=torch.arange(len(texts), dtype=torch.long),
        y=y,
        classes=classes,
        paths=None,
        kind="text",
        name=str(p),
        texts=texts,
        info={"source": str(p), "lines": lines, "skipped": len(skipped)},
    )


def load_text_triplets(
    path: str | os.PathLike[str], skip_bad: bool = False, _rows=None
) -> TextTriplets:
    """Load ``anchor,positive,negative`` rows (any empty field is an error, or skipped).

    Example:
        >>> t = load_text_triplets("triplets.jsonl")  # doctest: +SKIP
        >>> t.anchors[0], t.positives[0], t.negatives[0]  # doctest: +SKIP
    """
    p = Path(path)
    columns, rows = _rows if _rows is not None else read_text_rows(p)
    if _kind(p, columns) != "triplets":
        raise InputError(
            f"{p}: expected anchor,positive,negative columns, got {', '.join(columns)}"
        )
    out: dict[str, list[str]] = {c: [] for c in _TRIPLET}
    lines: list[int] = []
    skipped: list[tuple[int, str]] = []
    for line, row in rows:
        vals = {c: _clean(row.get(c)).strip() for c in _TRIPLET}
        empty = [c for c in _TRIPLET if not vals[c]]
        if empty:
            if skip_bad:
                skipped.append((line, f"empty {empty[0]}"))
                continue
            raise InputError(
                f"{p}: line {line}: empty {empty[0]} (fix the row, or pass --skip-bad)"
            )
        for c in _TRIPLET:
            out[c].append(vals[c])
        lines.append(line)
    _report_skipped(p, skipped)
    if not lines:
        raise InputError(f"{p}: no triplets")
    return TextTriplets(out["anchor"], out["positive"], out["negative"], name=str(p), lines=lines)
