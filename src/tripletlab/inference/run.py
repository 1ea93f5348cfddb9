"""A trained run as an object: embed files, images, vectors and data sets; search; verify.

:class:`Inference` is what the CLI (``embed``, ``index``, ``search``, ``verify``, ``eval``), the
report and the HTTP server use, so that a Python user gets exactly what the command line does in
a few lines. Inputs are preprocessed the way training prepared them (image size, colour), and
distances come from the one blocked distance of :mod:`tripletlab.distances`, in the run's
evaluation distance (cosine for L2-normalised heads, else euclidean).

Example:
    >>> from tripletlab.inference import Inference  # doctest: +SKIP
    >>> inf = Inference.from_run("runs/att_faces")  # doctest: +SKIP
    >>> inf.verify(*inf.embed_files(["a.pgm", "b.pgm"])[:, None])  # doctest: +SKIP
    [{'distance': 0.21, 'same': True, 'threshold': 0.43}]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data import IMAGE_EXTENSIONS, Dataset, apply_split, load_image_files
from ..distances import rowwise_distance
from ..errors import InputError
from ..metrics.evaluate import EvalResult, eval_distance, evaluate_embeddings
from ..metrics.postprocess import PostProcess, parse_postprocess
from ..rundir.files import (
    load_dataset_for_run,
    load_run,
    model_fingerprint,
    preprocessing,
    read_json,
)
from ..validation import as_embeddings, as_matrix
from .embed import embed, embed_data

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from ..index.embedding_index import EmbeddingIndex

__all__ = [
    "FACE_TEMPLATES",
    "VECTOR_SUFFIXES",
    "Inference",
    "check_faces",
    "face_crop_size",
    "run_faces",
]

VECTOR_SUFFIXES = (".npy", ".npz", ".csv")


def warn_unlike_training(images, input_shape, fit: str) -> None:
    """One warning line when input images differ a lot from the model's input in aspect (the
    width/height ratio differs by more than 1.3x) or size (over 16x the pixels, or under a
    quarter): they are cropped/padded/stretched to fit, which may not be what the run saw.
    ``images``: file paths or (width, height) sizes."""
    import warnings

    from PIL import Image

    if len(input_shape) != 3:
        return
    h, w = int(input_shape[1]), int(input_shape[2])
    odd, example = 0, None
    images = list(images)[:64]  # a look at the first ones is enough
    for item in images:
        if isinstance(item, tuple):
            iw, ih = item
        else:
            try:
                with Image.open(item) as im:
                    iw, ih = im.size
            except (OSError, ValueError):
                continue
        aspect = (iw / max(ih, 1)) / (w / h)
        area = (iw * ih) / (w * h)
        if not (1 / 1.3 <= aspect <= 1.3) or not (0.25 <= area <= 16):
            odd += 1
            example = example or f"{iw}x{ih}"
    if odd:
        warnings.warn(
            f"{odd} of {len(images)} inputs looked at differ a lot from the model's {w}x{h} "
            f"input (e.g. "
            f"{example}, width x height); they are resized with '{fit}'. Results are reliable "
            "only for images framed like the training images",
            UserWarning,
            stacklevel=3,
        )


class Inference:
    """A trained model with the facts needed to use it: preprocessing, distance, threshold.

    Build it with :meth:`from_run`. Attributes: ``model`` (eval mode), ``config`` (the run's
    ``config.json``), ``run_dir``, ``distance`` (the evaluation distance), ``threshold`` (the
    verification threshold calibrated on the run's test split, or None), ``threshold_info``
    (``eval.json``'s verification block: how the threshold was chosen, its accuracy, EER,
    TAR@FAR ...; None without an evaluation), ``fingerprint`` (sha256 of the weights, which
    identifies the embedding space of an index) and ``postprocess`` (the retrieval
    post-processing every search and evaluation applies: the run's choice on its validation
    classes, ``eval.json["postprocess"]``, or none; change it with :meth:`use_postprocess`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: dict,
        run_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        evaluation: dict | None = None,
        fingerprint: str = "",
    ) -> None:
        from ..runtime.devices import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.run_dir = Path(run_dir)
        self.distance: str = eval_distance(config["model"])
        ev = evaluation or {}
        ver = ev.get("verification")
        self.threshold_info: dict | None = (
            {**ver, "split": ev.get("split", "test")} if isinstance(ver, dict) else None
        )
        t = ev.get("threshold")
        self.threshold: float | None = float(t) if isinstance(t, (int, float)) else None
        self.fingerprint = fingerprint
        post = ev.get("postprocess")
        #: how the run chose its post-processing (eval.json), or None for runs without one
        self.postprocess_info: dict | None = post if isinstance(post, dict) else None
        self.postprocess: PostProcess = parse_postprocess(
            (self.postprocess_info or {}).get("spec", "none")
        )
        prep = preprocessing(config)
        self.input_shape: list[int] = prep["input_shape"]
        self.image_size: list[int] | None = prep["image_size"]
        self.grayscale: bool | None = prep["grayscale"]
        self.fit: str = prep["fit"]  # how images reach the input size (crop | pad | stretch)
        self.equalize: str = prep["equalize"]  # the run's image preprocessing
        #: face detection + alignment before embedding images: None, "arcface" or "head" (the
        #: run's ``--faces``, config.json train.faces; change it with :meth:`use_faces`)
        self.faces: str | None = run_faces(config)
        self._detector = None
        self._face_cache: dict[tuple, Any] = {}
        self.faces_summary: dict | None = None
        #: the face-cache entries this object's :meth:`face_folder` calls removed (least
        #: recently used ones; see :mod:`tripletlab.rundir.cache`)
        self.faces_pruned: list[str] = []
        self._faces_held: list = []  # open lock files of the face-cache entries being read

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> Inference:
        """Load ``RUN_DIR`` (config, weights, and ``eval.json`` when present); ``device``
        auto | cpu | cuda | cuda:N."""
        model, cfg = load_run(run_dir)
        ev_path = Path(run_dir) / "eval.json"
        evaluation = read_json(ev_path, "evaluation") if ev_path.exists() else None
        return cls(
            model,
            cfg,
            run_dir,
            device=device,
            evaluation=evaluation,
            fingerprint=model_fingerprint(run_dir),
        )

    def use_postprocess(self, spec: str | PostProcess = "auto") -> PostProcess:
        """Set the retrieval post-processing: ``"auto"`` (the run's own choice, see
        ``postprocess_info``), ``"none"`` or a spec (``"dba:k=3"``; an unknown name or bad
        parameter is an :class:`~tripletlab.errors.InputError` naming it). Returns it."""
        if spec == "auto":
            self.postprocess = parse_postprocess((self.postprocess_info or {}).get("spec", "none"))
        else:
            self.postprocess = parse_postprocess(spec)
        return self.postprocess

    def postprocess_record(self) -> dict:
        """What the evaluation records of the post-processing in use: the run's record when it
        is the run's choice, else the spec given (``chosen_by: "user"``)."""
        info = self.postprocess_info or {}
        if info.get("spec", "none") == str(self.postprocess) and info:
            keep = ("method", "params", "spec", "chosen_by", "validation_gain",
                    "validation_gain_se", "best_candidate")  # fmt: skip
            return {k: info[k] for k in keep if k in info}
        p = self.postprocess
        return {"method": p.method, "params": dict(p.params), "spec": str(p), "chosen_by": "user"}

    def use_faces(self, template: str | None = "auto") -> str | None:
        """Detect and align the largest face of every image before embedding it: ``"arcface"``
        or ``"head"`` (the template, see :mod:`tripletlab.faces.align`), ``None``/``"none"``
        (the whole image), ``"auto"`` (the run's own, ``config.json`` train.faces). Returns the
        setting; an unknown template is an :class:`~tripletlab.errors.InputError`."""
        if template == "auto":
            self.faces = run_faces(self.config)
        else:
            self.faces = check_faces(template)
        return self.faces

    @property
    def face_size(self) -> int:
        """Side of the aligned face crop before the run's resizing (see :func:`face_crop_size`)."""
        return face_crop_size(self.image_size, (self.config.get("train") or {}).get("face_size"))

    def _face_detector(self):
        if self._detector is None:
            from ..faces import MTCNN

            self._detector = MTCNN()
        return self._detector

    def detect_face(self, image, name: str = "the image"):
        """The largest face of ``image`` (a path or PIL image) aligned with the current
        template (:attr:`faces`): an :class:`~tripletlab.faces.AlignedFace`, or an
        :class:`~tripletlab.errors.InputError` "no face found in NAME". Detections of files are
        cached in memory per (path, modification time, size, template)."""
        from ..faces import detect_and_align

        template = self.faces or "arcface"
        key = None
        if isinstance(image, (str, Path)):
            p = Path(image)
            st = p.stat()
            key = (str(p.resolve()), st.st_mtime_ns, st.st_size, template, self.face_size)
            name = str(image)
        if key is not None and key in self._face_cache:
            face = self._face_cache[key]
        else:
            found = detect_and_align(
                image, template=template, size=self.face_size, faces="largest",
                detector=self._face_detector(),
            )  # fmt: skip
            face = found[0] if found else None
            if key is not None:
                self._face_cache[key] = face
        if face is None:
            raise InputError(f"no face found in {name}")
        return face

    def _face_arrays(self, items: Sequence, names: Sequence[str]) -> torch.Tensor:
        """Aligned crops of ``items`` (paths or PIL images) through the run's preprocessing."""
        from PIL import Image as PILImage

        from ..data.loaders import image_to_array

        mode = "L" if self.input_shape[0] == 1 else "RGB"
        size = (self.input_shape[1], self.input_shape[2])
        arrays = []
        for item, name in zip(items, names, strict=True):
            crop = self.detect_face(item, name).crop
            im = PILImage.fromarray(crop.permute(1, 2, 0).contiguous().numpy(), "RGB")
            arrays.append(image_to_array(im, mode, size, self.fit))
        return torch.from_numpy(np.stack(arrays)).float().div_(255.0)

    def face_folder(self, folder: str | Path) -> tuple[Path, dict[str, str], dict]:
        """``folder`` (an image folder) aligned once with the current template (:attr:`faces`,
        :func:`~tripletlab.faces.align_folder`, largest face): ``(aligned folder, {crop path:
        source path}, summary)``. The crops are cached in ``RUN_DIR/faces_cache/<key>`` (a temp
        directory when the run directory is read-only), the key being the folder, the template,
        the crop size and every file's (name, mtime, size), so a changed folder is aligned
        again. The summary's ``no_face`` counts the images left out.

        The cache keeps the :func:`~tripletlab.rundir.cache.cache_keep` (8) most recently used
        entries (:mod:`tripletlab.rundir.cache`): after a new one the others are removed (added
        to :attr:`faces_pruned`), except entries another process is reading or writing. This
        object holds the returned entry (no pruner removes it) until the data is read
        (:meth:`load_data`, :meth:`embed_source`) or :meth:`release_faces`."""
        import hashlib
        import os
        import tempfile

        from ..data.image_sources import scan_images
        from ..faces import MANIFEST_NAME, align_folder
        from ..rundir.cache import cache_keep, cached_folder

        src = Path(folder)
        template = self.faces or "arcface"
        paths, _ = scan_images(src, unlabelled=True)
        h = hashlib.sha256(f"{src.resolve()}|{template}|{self.face_size}".encode())
        for p in paths:
            st = os.stat(p)
            h.update(f"|{os.path.relpath(p, src)}:{st.st_mtime_ns}:{st.st_size}".encode())
        key = h.hexdigest()[:16]
        cache = self.run_dir / "faces_cache"
        train = self.config.get("train") or {}
        own = self.run_dir / "faces"  # the run's training folder, aligned by train --faces
        if (
            train.get("faces") == template
            and isinstance(train.get("data"), str)
            and Path(train["data"]).resolve() == src.resolve()
            and (own / ".summary.json").is_file()
            and json.loads((own / ".summary.json").read_text(encoding="utf-8")).get("size")
            == self.face_size
        ):
            out = own
            summary = json.loads((own / ".summary.json").read_text(encoding="utf-8"))
        else:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                probe = cache / f".write_probe-{os.getpid()}"
                probe.touch()
                probe.unlink()
            except OSError:
                cache = Path(tempfile.gettempdir()) / "tripletlab_faces"

            def build(tmp: Path) -> dict:
                s = align_folder(
                    src, tmp, template=template, size=self.face_size, overwrite=True,
                    detector=self._face_detector(),
                )  # fmt: skip
                return {**s, "out": str(cache / key), "manifest": str(cache / key / MANIFEST_NAME)}

            out, summary, held, removed = cached_folder(cache, key, build, keep=cache_keep())
            if held is not None:
                self._faces_held.append(held)
            self.faces_pruned += [str(cache / k) for k in removed]
        back: dict[str, str] = {}
        for line in (out / MANIFEST_NAME).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("status") == "ok":
                back[str((out / row["crop"]).resolve())] = str(src / row["source"])
        #: the summary of the last folder aligned (``images``, ``with_face``, ``no_face`` ...)
        self.faces_summary = summary
        return out, back, summary

    def release_faces(self) -> None:
        """Let go of the face-cache entries :meth:`face_folder` holds (they may be pruned)."""
        while self._faces_held:
            self._faces_held.pop().close()

    def _own_source(self) -> tuple[dict, Any]:
        """The config to read the run's own test split with, and a path mapper (or None): a
        run trained with ``--faces`` is read from its aligned training folder, so the saved
        split indices refer to the same items."""
        train = self.config.get("train") or {}
        faces, data = run_faces(self.config), train.get("data")
        if faces is None or not isinstance(data, str) or not Path(data).is_dir():
            return self.config, None
        saved, self.faces = self.faces, faces
        try:
            out, back, _ = self.face_folder(data)
        finally:
            self.faces = saved
        cfg = {**self.config, "train": {**train, "data": str(out)}}
        return cfg, (lambda ps: [back.get(str(Path(p).resolve()), p) for p in ps])

    def _faces_data(self, data: str | None):
        """``data`` with faces on: an image folder is replaced by its aligned crops, and a
        function mapping the crops' paths back to the source files; else ``data`` as is."""
        if self.faces is None or not self.takes_images or data is None or not Path(data).is_dir():
            return data, None
        out, back, _ = self.face_folder(data)
        return str(out), (lambda ps: [back.get(str(Path(p).resolve()), p) for p in ps])

    @property
    def takes_images(self) -> bool:
        """True for image models (input C x H x W), False for vector and text models."""
        return len(self.input_shape) == 3

    @property
    def takes_texts(self) -> bool:
        """True for text models (``tripletlab train`` on a text file)."""
        return self.config.get("model", {}).get("name") == "text"

    # ------------------------------------------------------------------ data sets
    def load_data(self, data: str | None = None, skip_bad: bool = False) -> Dataset:
        """``data`` loaded with the run's preprocessing (a folder is used whole), or the run's
        own test split when ``data`` is None. With :attr:`faces` set, a folder ``data`` is
        aligned first (:meth:`face_folder`; images without a face are left out) and the
        dataset's paths are the source files."""
        try:
            if data is not None:
                aligned, back = self._faces_data(data)
                ds = load_dataset_for_run(self.config, aligned, skip_bad)
                if back is not None and ds.paths is not None:
                    ds.paths = back(ds.paths)
                return ds
            split = read_json(self.run_dir / "split.json", "split")
            if split.get("by") == "triplets":
                raise InputError(
                    f"{self.run_dir} was trained on a triplet file, which has no labelled test "
                    "split; give a labelled text file (text,label) with --data"
                )
            cfg, back = self._own_source()
            train_data = cfg.get("train", {}).get("data", "digits")
            ds = load_dataset_for_run(cfg, train_data, skip_bad)
            split = read_json(self.run_dir / "split.json", "split")
            test = apply_split(ds, split["test"])[1]
            if back is not None and test.paths is not None:
                test.paths = back(test.paths)
            return test
        finally:
            self.release_faces()  # read: the cache entry may go

    def embed_source(
        self,
        data: str | None = None,
        *,
        skip_bad: bool = False,
        workers: int | None = None,
        batch_size: int = 256,
        progress: bool = False,
        shard: tuple[int, int] | None = None,
        unlabelled: bool = False,
    ) -> tuple[np.ndarray, torch.Tensor, list[str] | None, list[str]]:
        """``(embeddings, labels, paths, classes)`` of ``data`` (or of the run's test split):
        image folders and CSV/JSONL manifests are streamed from disk in batches with
        ``workers`` decoding processes, so memory does not grow with the number of images;
        other data (digits, idx, vectors) is loaded whole. ``shard=(rank, world_size)``: only
        that rank's contiguous share (see :mod:`tripletlab.inference.shard`). ``unlabelled``:
        a plain photo folder is accepted, each image labelled by its path (embed, index).
        With :attr:`faces` set, a folder is aligned first (see :meth:`load_data`)."""
        try:
            aligned, back = self._faces_data(data)
            cfg = self.config
            if data is None:
                cfg, back = self._own_source()
            emb, labels, paths, classes = embed_data(
                self.model,
                cfg,
                aligned,
                self.run_dir,
                skip_bad=skip_bad,
                device=self.device,
                workers=workers,
                batch_size=batch_size,
                progress=progress,
                shard=shard,
                unlabelled=unlabelled,
            )
        finally:
            self.release_faces()
        if back is not None and paths is not None:
            paths = back(paths)
        return emb.numpy(), labels, paths, classes

    def evaluate_embeddings(
        self,
        emb: np.ndarray,
        labels: torch.Tensor,
        distance: str | None = None,
        seed: int = 0,
        groups=None,
    ) -> EvalResult:
        """Retrieval, verification and few-shot metrics of embeddings with their labels
        (verification at the run's calibrated threshold when the distance is the run's;
        ``groups``: the retrieval's evaluation groups, see
        :func:`~tripletlab.metrics.evaluate.evaluate_embeddings`)."""
        dist = distance or self.distance
        cal = self.calibration() if dist == self.distance else None
        return {
            "distance": dist,
            **evaluate_embeddings(
                torch.from_numpy(emb), labels, dist, seed=seed, calibration=cal,
                postprocess=self.postprocess_record(), groups=groups,
            ),
        }  # fmt: skip

    def training_items(
        self, dataset: Dataset | None, data: str | None, paths: list[str] | None = None
    ) -> int:
        """How many items (of ``dataset``, or the files ``paths``, loaded from ``data``) belong
        to the run's training split (validation included): same resolved file path for image
        folders, same rows of the same data otherwise. 0 for the run's own test split
        (``data`` None)."""
        if data is None:
            return 0
        spec = self.config.get("train", {}).get("data", "digits")
        several = isinstance(spec, (list, tuple))
        train_data = str(spec)
        split_path = self.run_dir / "split.json"
        if not split_path.exists():
            return 0
        test_info = read_json(split_path, "split")["test"]
        paths = paths if paths is not None else (dataset.paths if dataset is not None else None)
        if paths is not None and test_info.get("by") == "class":
            classes = test_info.get("train_classes", [])
            if several:  # classes are "<source name>/<class>": each under its own folder
                from ..data.open import source_name, source_of

                roots = {source_name(str(d)): Path(d).resolve() for d in spec}
                train_dirs = [
                    roots[source_of(c)] / c.split("/", 1)[1]
                    for c in classes
                    if "/" in c and source_of(c) in roots
                ]
            else:
                root = Path(train_data).resolve()
                train_dirs = [root / c for c in classes]

            def in_training(p: str) -> bool:
                rp = Path(p).resolve()
                return any(rp.is_relative_to(d) for d in train_dirs)

            return sum(in_training(p) for p in paths)
        if several:  # rows of several sources: no same-rows test (image folders: above)
            return 0
        same_source = data == train_data or (
            Path(data).exists() and Path(data).resolve() == Path(train_data).resolve()
        )
        if dataset is None or not same_source:
            return 0
        try:
            return len(apply_split(dataset, test_info)[0])
        except InputError:
            return 0

    @property
    def threshold_source(self) -> str | None:
        """Where the calibrated threshold came from (``"validation"`` for runs trained with a
        validation split), None without a threshold."""
        if self.threshold is None:
            return None
        return (self.threshold_info or {}).get("threshold_source", "test split (in-sample)")

    def calibration(self) -> dict | None:
        """The run's verification threshold as an ``evaluate_embeddings`` calibration (with
        where it came from), or None without one."""
        if self.threshold is None:
            return None
        info = self.threshold_info or {}
        return {
            "threshold": self.threshold,
            "source": self.threshold_source,
            **{k: v for k, v in info.items() if k.startswith("validation_")},
            # how it was chosen (runs before issue #24: best accuracy, no key)
            **({"rule": info["threshold_rule"]} if "threshold_rule" in info else {}),
            **({"target_far": info["target_far"]} if "target_far" in info else {}),
        }

    def evaluate(
        self,
        dataset: Dataset,
        distance: str | None = None,
        seed: int = 0,
        data: str | None = None,
        groups=None,
    ) -> EvalResult:
        """Retrieval, verification and few-shot metrics of ``dataset`` (see
        :func:`~.metrics.evaluate.evaluate_embeddings`); verification accuracy/TAR/FAR at the
        run's calibrated threshold when the distance is the run's. ``data``: where ``dataset``
        was loaded from, to count items that were in the training split
        (``training_items`` in the result). ``groups``: one per item, see
        :meth:`evaluate_embeddings`."""
        out = self.evaluate_embeddings(
            self.embed_dataset(dataset), dataset.y, distance, seed, groups=groups
        )
        leak = self.training_items(dataset, data)
        if leak:
            out["training_items"] = leak
        return out

    # ------------------------------------------------------------------ embedding
    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the run's model saw them in training (``--equalize``)."""
        if self.takes_images and x.dim() == 4:
            from ..data.augment import preprocess

            return preprocess(x, self.equalize)
        return x

    def _embed_tensor(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        return embed(self.model, self._prepared(x), batch_size, self.device).numpy()

    def embed_dataset(self, dataset: Dataset, batch_size: int = 256) -> np.ndarray:
        """Embeddings (N, D) float32 of every item of a :class:`~tripletlab.data.Dataset`."""
        if list(dataset.input_shape) != self.input_shape:
            raise InputError(
                f"data has input shape {list(dataset.input_shape)} but the model expects "
                f"{self.input_shape}"
            )
        if self.takes_texts:
            if dataset.texts is None:
                raise InputError(
                    "this model embeds texts; give a .csv/.tsv/.jsonl file with text,label columns"
                )
            return embed(self.model, dataset.inputs(), batch_size, self.device).numpy()
        return self._embed_tensor(dataset.x, batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embeddings (N, D) of strings, tokenised as in training (a text model only).

        Example:
            >>> inf.embed_texts(["a bond issued by a corporation"]).shape  # doctest: +SKIP
            (1, 384)
        """
        if not self.takes_texts:
            raise InputError("this model does not take texts")
        texts = [str(t) for t in texts]
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise InputError(f"empty text at position {empty[0]} (of {len(texts)})")
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return embed(self.model, texts, batch_size, self.device).numpy()

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of raw input vectors (N, D_in) for a vector model (one row: (D_in,)).

        The vectors must be scaled as the training data was; a warning says so when their
        values lie far outside the training range (``config.json``: data.train.value_range).
        """
        if self.takes_texts:
            raise InputError("this model takes texts, not vectors")
        if self.takes_images:
            raise InputError(f"this model takes images of shape {self.input_shape}, not vectors")
        a = as_matrix(np.atleast_2d(np.asarray(x)), None, "vectors")
        if list(a.shape[1:]) != self.input_shape:
            raise InputError(
                f"vectors of shape {list(a.shape[1:])}, model expects {self.input_shape}"
            )
        self._check_scale(a, "query vectors")
        return self._embed_tensor(torch.from_numpy(a))

    def _check_scale(self, a: np.ndarray, what: str) -> None:
        """Warn when vectors lie far outside the range the model was trained on."""
        import warnings

        rng = (self.config.get("data", {}).get("train") or {}).get("value_range")
        if not (isinstance(rng, list) and len(rng) == 2) or a.size == 0:
            return
        lo, hi = float(rng[0]), float(rng[1])
        span = max(hi - lo, 1e-12)
        qlo, qhi = float(a.min()), float(a.max())
        if qlo < lo - span or qhi > hi + span:
            warnings.warn(
                f"{what} range over [{qlo:.3g}, {qhi:.3g}] but the model was trained on values "
                f"in [{lo:.3g}, {hi:.3g}]: scale them as the training data was (same units and "
                "normalisation), or the neighbours will be meaningless",
                UserWarning,
                stacklevel=3,
            )

    def _check_images_model(self) -> None:
        if self.takes_texts:
            raise InputError("this model takes texts: give query strings or a text file")
        if not self.takes_images:
            raise InputError("this model takes vectors: give one .npy/.npz/.csv file of queries")

    def embed_files(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Embeddings of image files, read, converted and resized exactly as training did; with
        :attr:`faces` set, of the largest face of each (detected, aligned, then preprocessed as
        training did; "no face found in FILE" is an InputError)."""
        self._check_images_model()
        for q in paths:
            if not Path(q).is_file():
                raise InputError(f"query not found: {q}")
            if Path(q).suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"{q} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        if self.faces is not None:
            if not paths:
                return np.zeros((0, self.embedding_dim), dtype=np.float32)
            return self._embed_tensor(self._face_arrays(list(paths), [str(p) for p in paths]))
        x, _ = load_image_files(
            [str(p) for p in paths],
            image_size=tuple(self.input_shape[1:]),
            grayscale=self.input_shape[0] == 1,
            fit=self.fit,
        )
        warn_unlike_training([str(p) for p in paths], self.input_shape, self.fit)
        return self._embed_tensor(x)

    def face_crops(self, images: Sequence[Image]) -> list[tuple[Image, Any]]:
        """The largest face of each PIL image, aligned (:attr:`faces`): ``[(crop as a PIL RGB
        image, AlignedFace), ...]``; "no face found in ..." is an InputError. The crops are
        what :meth:`embed_images` with ``detect=False`` embeds (the server detects first)."""
        from PIL import Image as PILImage

        n = len(images)
        out = []
        for i, im in enumerate(images):
            face = self.detect_face(im, "the image" if n == 1 else f"image {i + 1} of {n}")
            crop = PILImage.fromarray(face.crop.permute(1, 2, 0).contiguous().numpy(), "RGB")
            out.append((crop, face))
        return out

    def face_crops_all(self, image: Image) -> list[tuple[Image, Any]]:
        """Every face of one PIL image, aligned (:attr:`faces`), the largest first, then by
        decreasing score: ``[(crop, AlignedFace), ...]``; none: "no face found in the image"."""
        from PIL import Image as PILImage

        from ..faces import detect_and_align

        found = detect_and_align(
            image, template=self.faces or "arcface", size=self.face_size, faces="all",
            detector=self._face_detector(),
        )  # fmt: skip
        if not found:
            raise InputError("no face found in the image")
        area = [float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])) for f in found]
        first = int(np.argmax(area))
        found = [found[first]] + [f for i, f in enumerate(found) if i != first]
        return [
            (PILImage.fromarray(f.crop.permute(1, 2, 0).contiguous().numpy(), "RGB"), f)
            for f in found
        ]

    def embed_images(self, images: Sequence[Image], detect: bool = True) -> np.ndarray:
        """Embeddings of PIL images (e.g. uploads), preprocessed exactly as training did (with
        :attr:`faces` set: of the largest face of each, see :meth:`embed_files`; ``detect``
        False: the images are taken as aligned crops already, see :meth:`face_crops`)."""
        from ..data.loaders import image_to_array

        self._check_images_model()
        if not images:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        if self.faces is not None and detect:
            n = len(images)
            names = ["the image" if n == 1 else f"image {i + 1} of {n}" for i in range(n)]
            return self._embed_tensor(self._face_arrays(list(images), names))
        mode = "L" if self.input_shape[0] == 1 else "RGB"
        size = (self.input_shape[1], self.input_shape[2])
        warn_unlike_training([im.size for im in images], self.input_shape, self.fit)
        arrays = [image_to_array(im, mode, size, self.fit) for im in images]
        x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
        return self._embed_tensor(x)

    def embed_inputs(self, inputs: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """What ``tripletlab search`` / ``verify`` accept: image files, or one ``.npy`` /
        ``.npz`` / ``.csv`` file of raw vectors. Returns ``(embeddings, names)``, one name per
        row (the file name, or ``FILE[i]`` for the rows of a vector file). For a text model:
        the query strings themselves, or one ``.txt`` (a text per line) / ``.csv`` / ``.tsv`` /
        ``.jsonl`` file (its ``text`` column); the names are the texts."""
        if self.takes_texts:
            texts = list(inputs)
            if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in _TEXT_SUFFIXES:
                if Path(inputs[0]).is_file():
                    texts = _read_texts(Path(inputs[0]))
            return self.embed_texts(texts), texts
        if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in VECTOR_SUFFIXES:
            p = Path(inputs[0])
            x = _read_vectors(p)
            if list(x.shape[1:]) != self.input_shape:
                raise InputError(
                    f"{p}: vectors of shape {list(x.shape[1:])}, model expects {self.input_shape}"
                )
            self._check_scale(x, f"{p}: query vectors")
            return self._embed_tensor(torch.from_numpy(x)), [f"{p}[{i}]" for i in range(len(x))]
        return self.embed_files(list(inputs)), [str(q) for q in inputs]

    @property
    def embedding_dim(self) -> int:
        """Dimension of the embeddings."""
        m = self.config["model"]
        return int(m.get("output_dim") or m.get("embedding_dim") or 0)

    # ------------------------------------------------------------------ comparing
    def distance_between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise distances ``d(a_i, b_i)`` (N,) in the run's distance (float64)."""
        ta = as_embeddings(np.atleast_2d(np.asarray(a)), "embeddings a").double()
        tb = as_embeddings(np.atleast_2d(np.asarray(b)), "embeddings b").double()
        if ta.shape != tb.shape:
            raise InputError(
                f"pairs need equal shapes, got {tuple(ta.shape)} and {tuple(tb.shape)}"
            )
        return rowwise_distance(ta, tb, self.distance).numpy()

    def verify(
        self, a: np.ndarray, b: np.ndarray, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """Same / different for each row pair: ``{"distance", "same", "threshold"}``; ``same``
        is ``distance <= threshold`` (the calibrated one unless given), None without any."""
        t = self.threshold if threshold is None else float(threshold)
        return [
            {
                "distance": float(d),
                "same": (bool(d <= t) if t is not None else None),
                "threshold": t,
            }
            for d in self.distance_between(a, b)
        ]

    # ------------------------------------------------------------------ index
    def build_index(self, dataset: Dataset, kind: str = "flat") -> EmbeddingIndex:
        """An :class:`~tripletlab.index.EmbeddingIndex` of ``dataset`` (labels, paths, classes)."""
        emb = self.embed_dataset(dataset)
        # text items are shown by their text
        paths = dataset.texts if dataset.texts is not None else dataset.paths
        return self.index_embeddings(
            emb, dataset.y, paths, dataset.classes, kind, files=dataset.texts is None
        )

    def index_embeddings(
        self,
        emb: np.ndarray,
        labels,
        paths: list[str] | None,
        classes: list[str],
        kind="flat",
        files: bool = True,
    ) -> EmbeddingIndex:
        """An :class:`~tripletlab.index.EmbeddingIndex` of embeddings already computed (e.g.
        by :meth:`embed_source`); approximate kinds record their measured recall@10."""
        from ..index.embedding_index import EmbeddingIndex, search_quality

        index = EmbeddingIndex(
            emb.shape[1],
            metric=self.distance,
            kind=kind,
            ivf_nlist=max(1, min(256 if kind == "ivf" else 4096, len(emb) // 39)),
            postprocess=self.postprocess,
        )
        index.add(emb, labels=np.asarray(labels), paths=paths)
        index.classes = classes
        index.faces = self.faces  # the manifest records it; load_index checks it
        if kind != "flat":  # approximate: measure what it costs in recall (kept in the manifest)
            index.quality = search_quality(index, emb, n_queries=1000, k=10)
        if files and paths is not None and any(not Path(p).is_absolute() for p in paths):
            index.root = str(Path.cwd())  # relative paths are relative to this directory
        return index

    def load_index(self, directory: str | Path) -> EmbeddingIndex:
        """Load an index saved by ``tripletlab index``, checking it was built with this model
        and with this post-processing (``postprocess``)."""
        from ..index.embedding_index import EmbeddingIndex

        index = EmbeddingIndex.load(directory, expected_fingerprint=self.fingerprint)
        check_index_postprocess(index, self.postprocess, directory)
        check_index_faces(index, self.faces, directory)
        return index

    def search(
        self, index: EmbeddingIndex, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed items of each query embedding: ``(distances, ids)``."""
        q = np.atleast_2d(np.asarray(queries))
        if q.shape[1] != index.dim:
            raise InputError(f"model embeddings have dimension {q.shape[1]}, index {index.dim}")
        return index.search(q, k)

    @staticmethod
    def describe_neighbours(
        index: EmbeddingIndex, distances: np.ndarray, ids: np.ndarray
    ) -> list[list[dict[str, Any]]]:
        """Per query, its hits as ``{"rank", "id", "distance", "label", "path"}`` (the label is
        the class name where the index stores class names)."""
        classes = index.classes or []
        out = []
        for qi in range(ids.shape[0]):
            labels, paths = index.labels_of(ids[qi]), index.paths_of(ids[qi])
            hits = []
            for j in range(ids.shape[1]):
                lab = int(labels[j])
                hits.append(
                    {
                        "rank": j + 1,
                        "id": int(ids[qi, j]),
                        "distance": float(distances[qi, j]),
                        "label": classes[lab] if 0 <= lab < len(classes) else lab,
                        "path": paths[j],
                    }
                )
            out.append(hits)
        return out


FACE_TEMPLATES = ("arcface", "head")


def check_faces(template: str | None) -> str | None:
    """``template`` checked: None (also ``"none"``), ``"arcface"`` or ``"head"``; anything
    else is an :class:`~tripletlab.errors.InputError` naming the choices.

    Example:
        >>> check_faces("none") is None, check_faces("head")
        (True, 'head')
    """
    if template is None or template == "none":
        return None
    if template not in FACE_TEMPLATES:
        raise InputError(
            f"--faces must be one of {', '.join(FACE_TEMPLATES)} or none, got {template!r}"
        )
    return str(template)


def run_faces(config: dict) -> str | None:
    """The face template a run was trained with (``config.json`` train.faces), or None."""
    return check_faces((config.get("train") or {}).get("faces"))


def face_crop_size(image_size: Sequence[int] | None, face_size: int | None = None) -> int:
    """Side of the aligned face crop: the run's ``face_size`` when set (``--face-size``), else
    112 (the ArcFace template's own size) or the longer side of the run's image size when
    that is larger, so no detail is lost before resizing. Training (``--faces``) and
    inference use the same rule.

    Example:
        >>> face_crop_size([112, 92]), face_crop_size([224, 224]), face_crop_size(None)
        (112, 224, 112)
        >>> face_crop_size([136, 112], face_size=48)
        48
    """
    if face_size:
        return int(face_size)
    return max(112, *(int(v) for v in image_size)) if image_size else 112


def check_index_faces(index: EmbeddingIndex, expected: str | None, where: Any) -> None:
    """An InputError when ``index`` holds embeddings of face crops aligned otherwise than the
    queries will be (``--faces``): whole images against aligned faces match nothing."""
    if index.faces != expected:
        built = f"--faces {index.faces}" if index.faces else "whole images (no --faces)"
        now = f"--faces {expected}" if expected else "whole images (no --faces)"
        raise InputError(
            f"the index in {where} was built from {built}, but the queries are embedded from "
            f"{now}: rebuild it with `tripletlab index`, or pass --faces "
            f"{index.faces or 'none'}"
        )


def check_index_postprocess(index: EmbeddingIndex, expected: PostProcess, where: Any) -> None:
    """An InputError when ``index`` was built for another post-processing than ``expected``
    (a DBA index holds augmented vectors: searching it as a plain one is silently wrong)."""
    if index.postprocess != expected:
        raise InputError(
            f"the index in {where} was built with post-processing {str(index.postprocess)!r}, "
            f"but this run uses {str(expected)!r}: rebuild it with `tripletlab index` (which "
            f"uses the run's), or search with --postprocess {str(index.postprocess)}"
        )


_TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


def _read_texts(p: Path) -> list[str]:
    """Query texts from a file: ``.txt`` one per non-empty line, else the ``text`` column."""
    from ..data.text import decode_text, read_text_rows

    if p.suffix.lower() == ".txt":
        return [t.strip() for t in decode_text(p, p.read_bytes()).splitlines() if t.strip()]
    columns, rows = read_text_rows(p)
    if "text" not in columns:
        raise InputError(f"{p}: no 'text' column (columns: {', '.join(columns)})")
    return [str(r.get("text") or "").strip() for _, r in rows]


def _read_vectors(p: Path) -> np.ndarray:
    """Raw input vectors from ``.npy`` (rows as stored) or ``.npz``/``.csv`` (a vector file)."""
    if p.suffix.lower() == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {p}: {e}") from None
        return np.atleast_2d(x).astype(np.float32)
    from ..data.loaders import load_vector_file

    return load_vector_file(p).x.numpy()
