"""The in-memory :class:`Dataset` and seeded, reusable train/test splits."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "Dataset",
    "apply_split",
    "class_group",
    "concat_labelled",
    "natural_key",
    "split_dataset",
    "split_validation",
]


def natural_key(s: str) -> tuple:
    """Sort key that orders embedded numbers by value (``s2`` < ``s10``); ties (``s01``/``s1``)
    fall back to the plain string, so the order never depends on set iteration order."""
    return ([int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)], s)


@dataclass
class Dataset:
    """Samples, integer labels and class names.

    Example:
        >>> from tripletlab.data import load_dataset
        >>> ds = load_dataset("digits")
        >>> ds.kind, ds.input_shape, len(ds.classes)
        ('vector', (64,), 10)
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    paths: list[str] | None
    kind: str
    name: str
    predefined_split: dict[str, list[int]] | None = None
    info: dict = field(default_factory=dict)
    texts: list[str] | None = None  # kind "text": the strings (x holds their row numbers)

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise InputError(f"{self.x.shape[0]} samples but {self.y.shape[0]} labels")
        if self.paths is not None and len(self.paths) != self.x.shape[0]:
            raise InputError(f"{self.x.shape[0]} samples but {len(self.paths)} paths")
        if self.texts is not None and len(self.texts) != self.x.shape[0]:
            raise InputError(f"{self.x.shape[0]} samples but {len(self.texts)} texts")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def inputs(self, indices=None) -> torch.Tensor | list[str]:
        """What the model takes for the items at ``indices`` (all when None): the tensor rows,
        or for text data the strings.

        Example:
            >>> ds = Dataset(torch.arange(2), torch.tensor([0, 1]), ["a", "b"], None, "text",
            ...              "t", texts=["one", "two"])
            >>> ds.inputs([1])
            ['two']
        """
        if self.texts is not None:
            if indices is None:
                return list(self.texts)
            return [self.texts[int(i)] for i in indices]
        return self.x if indices is None else self.x[indices]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices) -> Dataset:
        """The items at ``indices`` (class ids and names unchanged). A predefined split is kept,
        renumbered to the new positions."""
        idx_np = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx_np) and (idx_np.min() < -len(self) or idx_np.max() >= len(self)):
            raise InputError(f"subset indices out of range for {len(self)} items")
        idx_np = np.where(idx_np < 0, idx_np + len(self), idx_np)
        idx = torch.from_numpy(idx_np)
        split = None
        if self.predefined_split:
            position = {int(old): new for new, old in enumerate(idx_np.tolist())}
            split = {
                part: [position[i] for i in members if i in position]
                for part, members in self.predefined_split.items()
            }
        return Dataset(
            x=self.x[idx],
            y=self.y[idx],
            classes=self.classes,
            paths=None if self.paths is None else [self.paths[i] for i in idx_np.tolist()],
            kind=self.kind,
            name=self.name,
            predefined_split=split,
            info=dict(self.info),
            texts=None if self.texts is None else [self.texts[i] for i in idx_np.tolist()],
        )

    def summary(self) -> dict:
        """Counts for reports: items, classes present, items per class (min/median/max)."""
        counts = torch.bincount(self.y, minlength=len(self.classes)) if len(self) else None
        present = counts[counts > 0] if counts is not None else torch.zeros(0)
        return {
            "name": self.name,
            "kind": self.kind,
            "items": len(self),
            "classes": int((present > 0).sum()) if len(present) else 0,
            "input_shape": list(self.input_shape),
            "per_class_min": int(present.min()) if len(present) else 0,
            "per_class_median": float(present.float().median()) if len(present) else 0.0,
            "per_class_max": int(present.max()) if len(present) else 0,
            # vector inputs: queries must be scaled alike (Inference warns when they are not)
            "value_range": (
                [float(self.x.min()), float(self.x.max())]
                if self.kind == "vector" and len(self)
                else None
            ),
        }


def split_dataset(
    ds: Dataset,
    *,
    by: str = "class",
    test_fraction: float = 0.25,
    seed: int = 0,
    test_classes: list[str] | None = None,
    class_order: str = "random",
    by_source: bool = False,
) -> tuple[Dataset, Dataset, dict]:
    """Split into (train, test, split_info).

    * ``by="class"`` (open-set, the metric-learning protocol): whole classes are held out — the
      ``test_classes`` named, or a ``test_fraction`` of the classes: a seeded random choice
      (``class_order="random"``) or the last ones in natural sort order (``"sorted"``: with
      AT&T's ``s1``..``s40`` and 0.25, the test classes are ``s31``..``s40``).
    * ``by="sample"``: a seeded, per-class stratified ``test_fraction`` of each class's items.
    * ``by="predefined"``: the data set's own split (e.g. MNIST-style train/t10k files).

    ``by_source`` (classes of several sources, ``source/<class>``): a ``test_fraction`` of
    each source's classes (at least one of each), chosen within the source as above.

    ``split_info`` is JSON-serialisable; :func:`apply_split` reproduces the split from it.
    """
    if not 0.0 < test_fraction < 1.0 and not test_classes and by != "predefined":
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if class_order not in ("random", "sorted"):
        raise InputError(f"class_order must be 'random' or 'sorted', got {class_order!r}")
    info: dict = {"by": by, "seed": int(seed), "test_fraction": float(test_fraction)}
    if by == "class":
        present = sorted({ds.classes[i] for i in ds.y.unique().tolist()}, key=natural_key)
        if test_classes:  # None or [] -> test_fraction decides
            # an entry names a class, or a folder of classes ("Latin" = "Latin/character01", ...)
            def matches(c: str, t: str) -> bool:
                return c == t or c.startswith(t.rstrip("/") + "/")

            unknown = sorted(t for t in test_classes if not any(matches(c, t) for c in present))
            if unknown:
                raise InputError(f"test classes not in the data: {unknown[:5]}")
            test_set = [c for c in present if any(matches(c, t) for t in test_classes)]
            if len(test_set) == len(present):
                raise InputError("every class is a test class: nothing left to train on")
        else:
            strata = [present]
            if by_source:  # each source's own share
                sources = sorted({c.split("/", 1)[0] for c in present}, key=natural_key)
                strata = [[c for c in present if c.split("/", 1)[0] == s] for s in sources]
                info["by_source"] = True
            rng = np.random.default_rng(seed)
            test_set = []
            for classes in strata:
                n_test = max(1, round(len(classes) * test_fraction))
                if n_test >= len(classes):
                    raise InputError(
                        f"cannot hold out {n_test} of {len(classes)} classes and still train"
                        + (f" (source {classes[0].split('/', 1)[0]})" if by_source else "")
                    )
                if class_order == "sorted":
                    test_set += classes[-n_test:]
                else:
                    test_set += rng.choice(classes, size=n_test, replace=False).tolist()
            info["class_order"] = class_order
        test_set = sorted(test_set, key=natural_key)
        info["test_classes"] = test_set
        info["train_classes"] = [c for c in present if c not in set(test_set)]
    elif by == "sample":
        rng = np.random.default_rng(seed)
        test_idx = []
        y = ds.y.numpy()
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            n_test = int(round(len(idx) * test_fraction))
            if len(idx) >= 2:
                n_test = min(max(n_test, 1), len(idx) - 1)
            else:
                n_test = 0
            test_idx += rng.choice(idx, size=n_test, replace=False).tolist()
        info["test_indices"] = sorted(int(i) for i in test_idx)
        info["n_items"] = len(ds)
    elif by == "predefined":
        if not ds.predefined_split or "test" not in ds.predefined_split:
            raise InputError(f"data set {ds.name!r} has no predefined train/test split")
        info["n_items"] = len(ds)
    else:
        raise InputError(f"unknown split {by!r}; choose 'class', 'sample' or 'predefined'")
    train, test = apply_split(ds, info)
    return train, test, info


def class_group(name: str, depth: int = 0) -> str:
    """The group of a class: its first ``depth`` folder levels (``depth=0``: the class itself).

    Example:
        >>> class_group("Greek/character03", 1), class_group("Greek/character03", 0)
        ('Greek', 'Greek/character03')
    """
    parts = name.split("/")
    return name if depth <= 0 or depth >= len(parts) else "/".join(parts[:depth])


#: the fewest validation class groups a fraction is rounded up to (when the training split has
#: at least 4x as many)
MIN_VAL_GROUPS = 5


def split_validation(
    train: Dataset,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    group_depth: int = 0,
    folds: int = 1,
    fold: int = 0,
    by_source: bool = False,
) -> tuple[Dataset, Dataset, dict]:
    """Hold out whole classes of the training split for validation (open-set, like the test):
    ``(train, val, info)``.

    Classes are grouped by their first ``group_depth`` folder levels (``1`` on Omniglot: whole
    alphabets; ``0``: each class is its own group). With ``folds`` = K > 1 the groups are dealt,
    in a seeded order, into K folds and fold ``fold`` is the validation split (k-fold model
    selection, as in Musgrave et al. 2020); otherwise a seeded ``fraction`` of the groups (at
    least one, and at least :data:`MIN_VAL_GROUPS` when there are 4x as many). ``info`` is a
    class split that :func:`apply_split` reproduces.

    ``by_source``: the classes of several sources (``source/<class>``, see
    :func:`tripletlab.data.open.scan_sources`): groups are formed within each source
    (``group_depth`` counts folder levels below the source's name) and drawn per source, so
    every source has validation classes (and every fold some of each source).

    Example:
        >>> import torch
        >>> ds = Dataset(torch.zeros(8, 2), torch.arange(4).repeat(2), ["a/1", "a/2", "b/1", "b/2"],
        ...              None, "vector", "toy")
        >>> _, val, info = split_validation(ds, group_depth=1, folds=2, fold=0)
        >>> len(info["val_groups"]), len(val), info["test_classes"][0][0] == info["val_groups"][0]
        (1, 4, True)
    """
    if not isinstance(folds, int) or folds < 1:
        raise InputError(f"val_folds must be an integer >= 1, got {folds!r}")
    if not 0 <= fold < folds:
        raise InputError(f"val_fold must be in [0, {folds - 1}], got {fold}")
    if group_depth < 0:
        raise InputError(f"val_group_depth must be >= 0, got {group_depth}")
    present = sorted({train.classes[i] for i in train.y.unique().tolist()}, key=natural_key)

    def group_of(c: str) -> str:
        if not by_source or "/" not in c:
            return class_group(c, group_depth)
        src, rest = c.split("/", 1)
        return f"{src}/{class_group(rest, group_depth)}"

    groups = sorted({group_of(c) for c in present}, key=natural_key)
    strata = sorted({g.split("/", 1)[0] for g in groups}) if by_source else [""]
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    if not folds > 1 and not 0.0 < fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {fraction}")
    val_groups = []
    for stratum in strata:  # one stratum (all groups), or one per source
        own = [g for g in order if not by_source or g.split("/", 1)[0] == stratum]
        if folds > 1:
            if len(own) < folds:
                what = "classes" if group_depth == 0 else f"class groups at depth {group_depth}"
                where = f" of source {stratum}" if by_source else ""
                raise InputError(
                    f"cannot make {folds} validation folds from {len(own)} {what}{where}; use "
                    f"--val-folds <= {len(own)} or a smaller --val-group-depth"
                )
            val_groups += own[fold::folds]
        else:
            # at least MIN_VAL_GROUPS (up to a quarter of the groups): with 2-3 validation
            # classes the selection metric saturates at once (AT&T: MAP@R 1.0 from step 6)
            n = max(1, round(len(own) * fraction), min(MIN_VAL_GROUPS, len(own) // 4))
            val_groups += own[:n]
    if len(val_groups) >= len(groups):
        raise InputError(
            f"validation would take all {len(groups)} class groups; nothing left to train on"
        )
    chosen = set(val_groups)
    val_classes = [c for c in present if group_of(c) in chosen]
    info = {
        "by": "class",
        "seed": int(seed),
        "test_fraction": float(fraction),
        "group_depth": int(group_depth),
        "folds": int(folds),
        "fold": int(fold),
        "val_groups": sorted(val_groups, key=natural_key),
        **({"by_source": True} if by_source else {}),
        "test_classes": val_classes,  # the key apply_split reads: the held-out classes
        "train_classes": [c for c in present if c not in set(val_classes)],
    }
    rest, val = apply_split(train, info)
    return rest, val, info


def apply_split(ds: Dataset, info: dict) -> tuple[Dataset, Dataset]:
    """Rebuild (train, test) from a saved ``split_info``."""
    by = info.get("by")
    if by == "class":
        test_names = set(info["test_classes"])
        name_of = np.asarray(ds.classes, dtype=object)[ds.y.numpy()]
        is_test = np.array([n in test_names for n in name_of], dtype=bool)
    elif by in ("sample", "predefined"):
        if info.get("n_items") not in (None, len(ds)):
            raise InputError(
                f"the split was made for {info['n_items']} items but the data has {len(ds)}"
            )
        is_test = np.zeros(len(ds), dtype=bool)
        if by == "sample":
            is_test[np.asarray(info["test_indices"], dtype=np.int64)] = True
        else:
            if not ds.predefined_split:
                raise InputError(f"data set {ds.name!r} has no predefined split")
            is_test[np.asarray(ds.predefined_split["test"], dtype=np.int64)] = True
    else:
        raise InputError(f"split info has unknown kind {by!r}")
    train = ds.subset(np.flatnonzero(~is_test))
    test = ds.subset(np.flatnonzero(is_test))
    if len(test):
        counts = torch.bincount(test.y)
        small = int(((counts > 0) & (counts < 2)).sum())
        if small:
            warnings.warn(
                f"{small} test classes have a single item (no positive pair to retrieve)",
                stacklevel=2,
            )
    return train, test


def concat_labelled(parts: list[Dataset], name: str | None = None) -> Dataset:
    """One data set of ``parts`` with disjoint label spaces: the class lists are joined in
    order and each part's labels shifted past the classes before it (``paths`` kept when every
    part has them; ``info`` of the first part).

    Example:
        >>> a = Dataset(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"], None, "vector", "A")
        >>> b = Dataset(torch.ones(1, 3), torch.tensor([0]), ["c"], None, "vector", "B")
        >>> ab = concat_labelled([a, b])
        >>> ab.classes, ab.y.tolist(), ab.name
        (['a', 'b', 'c'], [0, 1, 2], 'A+B')
    """
    parts = [p for p in parts if p is not None]
    if not parts:
        raise InputError("nothing to join")
    classes: list[str] = []
    ys, xs = [], []
    for p in parts:
        ys.append(p.y + len(classes))
        xs.append(p.x)
        classes += list(p.classes)
    if len(set(classes)) != len(classes):
        raise InputError("the data sets to join share class names")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise InputError(f"the data sets to join have different input shapes: {sorted(shapes)}")
    paths = None
    if all(p.paths is not None for p in parts):
        paths = [q for p in parts for q in p.paths]
    return Dataset(
        x=torch.cat(xs),
        y=torch.cat(ys),
        classes=classes,
        paths=paths,
        kind=parts[0].kind,
        name=name or "+".join(p.name for p in parts),
        info=dict(parts[0].info),
    )
