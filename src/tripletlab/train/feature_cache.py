"""A frozen backbone's features, computed once: the trainer then trains the head alone
(or, with frozen early stages, the later blocks and the head on the cached feature maps).

With ``freeze_stages="all"`` no backbone parameter or BatchNorm statistic changes, so the pooled
features of every training (and validation) image are fixed. :class:`FeatureCache` computes
them once, in eval mode (and those of the mirror images when training flips or ``tta="flip"``),
and hands PK batches of features to the head: a training step costs a linear layer instead of
a backbone forward and backward pass, so hundreds of steps take seconds. The head can start as
PCA whitening of the cached training features (``head_init="whiten"``,
:meth:`~tripletlab.models.backbones.BackboneEmbedding.init_whitening`). Validation embeds the
cached validation features with the current head; the final test evaluation runs the whole
model on the images, as ``embed``/``index``/``serve`` do.

With ``freeze_stages=n`` (a number) the first blocks never change either: when the training
augmentation is flips at most, the cache holds their output feature maps (``start`` =
:attr:`~tripletlab.models.backbones.BackboneEmbedding.prefix_blocks`; images and mirror images)
and each step runs only the later blocks and the head on them
(:meth:`FeatureCache.head_input`): fine-tuning MobileNetV2's last stage at 272x224 trains
416 instead of 30.6 images/s on 2 CPU threads (``benchmarks/bench_prefix_cache.py``). Same
batches, same model: tested against the image path.

Example:
    >>> from tripletlab.models.backbones import BackboneEmbedding
    >>> m = BackboneEmbedding([1, 64, 64], embedding_dim=8, freeze_stages="all", tta="flip")
    >>> cache = FeatureCache.from_tensors(m, torch.rand(6, 1, 64, 64), flip=True)
    >>> cache.batch([0, 5]).shape == (2, m.num_features)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "FeatureCache",
    "augmented_view_features",
    "backbone_features",
    "view_images",
    "view_seed",
]


class _Features(nn.Module):
    """``model.features`` of the images (or of their mirror images) as a module to embed with;
    with ``start`` > 0 the feature maps after the first ``start`` blocks instead."""

    def __init__(self, model: nn.Module, flip: bool, start: int = 0) -> None:
        super().__init__()
        self.model, self.flip, self.start = model, flip, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(-1) if self.flip else x
        return self.model.prefix(x, self.start) if self.start else self.model.features(x)


def backbone_features(model: nn.Module, flip: bool = False, start: int = 0) -> nn.Module:
    """``model.features`` (of the mirror images with ``flip``; the feature maps after the
    first ``start`` blocks with ``start`` > 0) as a module to embed with."""
    return _Features(model, flip, start)


class FeatureCache:
    """Cached pooled features of the training split (and validation split) of a frozen
    backbone; ``flip`` also caches those of the mirror images, drawn at random per item in
    training batches (seeded)."""

    def __init__(
        self,
        train: torch.Tensor,
        train_mirror: torch.Tensor | None,
        val: torch.Tensor | None = None,
        val_mirror: torch.Tensor | None = None,
        seed: int = 0,
        start: int = 0,
    ) -> None:
        self.train, self.train_mirror = train, train_mirror
        self.val, self.val_mirror = val, val_mirror
        self.start = int(start)
        self._gen = torch.Generator().manual_seed(seed)
        #: features of augmented views of the training images (V, N, D) (None: none)
        self.views: torch.Tensor | None = None

    @property
    def n_views(self) -> int:
        """Views of each training image drawn from: the image (or its mirror) and the
        augmented views cached (:meth:`add_views`)."""
        return 1 + (0 if self.views is None else len(self.views))

    def add_views(self, views: torch.Tensor) -> None:
        """Cache features of augmented views (V, N, D) of the training images (from
        :func:`augmented_view_features`); each training item then draws one of the
        ``1 + V`` views per batch (view 0 the image itself, mirrored as before)."""
        if views.dim() != 3 or views.shape[1:] != self.train.shape:
            raise InputError(
                f"views must be (V, {len(self.train)}, {self.train.shape[1]}), got "
                f"{tuple(views.shape)}"
            )
        self.views = views if len(views) else None

    @classmethod
    def from_tensors(
        cls, model: nn.Module, x: torch.Tensor, flip: bool = False, batch_size: int = 64
    ) -> FeatureCache:
        """The cache of in-memory images ``x`` (N, C, H, W) (training only)."""
        from ..inference.embed import embed

        f = embed(_Features(model, False), x, batch_size)
        fm = embed(_Features(model, True), x, batch_size) if flip else None
        return cls(f, fm)

    @classmethod
    def build(
        cls,
        embed_split,
        model: nn.Module,
        train,
        val,
        flip: bool,
        start: int = 0,
        seed: int = 0,
    ) -> FeatureCache:
        """Features of the training and validation splits ``train`` / ``val`` (None: none),
        computed by ``embed_split(part, model=...)`` (the trainer's way of embedding a split:
        streamed when its images are, with its device and autocast); with ``start`` > 0 the
        feature maps after ``model``'s first ``start`` (frozen) blocks."""
        parts = {}
        for name, part in (("train", train), ("val", val)):
            if part is None or len(part) == 0:
                parts[name] = (None, None)
                continue
            got = []
            for mirror in (False, True)[: 2 if flip else 1]:
                f = embed_split(part, model=_Features(model, mirror, start))[0]
                if len(f) != len(part):
                    raise InputError(
                        f"{len(part) - len(f)} unreadable {name} images: cached backbone "
                        "features need every image (remove them, or use --freeze-stages N "
                        "with a number instead of 'all')"
                    )
                got.append(f)
            parts[name] = (got[0], got[1] if flip else None)
        return cls(*parts["train"], *parts["val"], seed=seed, start=start)

    def fit_set(self, model: nn.Module | None = None, batch_size: int = 64) -> torch.Tensor:
        """Every training feature vector (mirror images included), for whitening; a cache of
        feature maps (``start`` > 0) runs them through the rest of ``model``'s backbone."""
        f = self.train if self.train_mirror is None else torch.cat([self.train, self.train_mirror])
        if not self.start:
            return f
        return self._pooled(model, f, next(model.parameters()).device, batch_size)

    def _pooled(self, model, maps: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
        """``model.features_after`` of cached feature maps, in eval mode, in batches."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = [
                    model.features_after(maps[i : i + batch_size].to(device), self.start).float()
                    for i in range(0, len(maps), batch_size)
                ]
        finally:
            model.train(was)
        return torch.cat(out).cpu()

    def head_input(self, model: nn.Module):
        """What a training step runs on a batch of cached values: the head, after the rest of
        the backbone for cached feature maps."""
        if not self.start:
            return model.head
        return lambda z: model.head(model.features_after(z, self.start))

    def batch(self, idx) -> torch.Tensor:
        """Features of training items ``idx``; each one of its mirror image with chance 1/2."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        f = self.train[idx]
        if self.train_mirror is not None:
            flip = torch.rand(len(idx), generator=self._gen) < 0.5
            f = torch.where(flip.view(-1, *[1] * (f.dim() - 1)), self.train_mirror[idx], f)
        if self.views is None:
            return f
        # one of the 1 + V views per item (0: the image itself, mirrored as above)
        v = torch.randint(0, 1 + len(self.views), (len(idx),), generator=self._gen)
        aug = self.views[(v - 1).clamp_min(0), idx]
        return torch.where((v > 0).view(-1, 1), aug, f)

    def val_embeddings(self, model: nn.Module, device: torch.device) -> torch.Tensor | None:
        """Embeddings of the cached validation features by ``model.head`` (None without)."""
        if self.val is None:
            return None
        return self._embed(model, self.val, self.val_mirror, device)

    def train_embeddings(self, model: nn.Module, idx, device: torch.device) -> torch.Tensor:
        """Eval-mode embeddings of training items ``idx`` from the cache, as the whole model
        gives them (e.g. for a hard-class refresh)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mirror = self.train_mirror[idx] if self.train_mirror is not None else None
        return self._embed(model, self.train[idx], mirror, device)

    def _embed(self, model, f, mirror, device) -> torch.Tensor:
        if self.start:
            f = self._pooled(model, f, device)
            mirror = self._pooled(model, mirror, device) if mirror is not None else None
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                mirror = mirror.to(device) if mirror is not None else None
                use_mirror = mirror if getattr(model, "tta", "none") == "flip" else None
                return model.head(f.to(device), use_mirror).float().cpu()
        finally:
            model.train(was)


# ---------------------------------------------------------------- augmented views


def view_seed(seed: int, view: int, index: int) -> int:
    """The per-sample augmentation seed of view ``view`` of training item ``index``
    (deterministic: the same run caches the same views).

    >>> view_seed(4, 1, 0) == view_seed(4, 1, 0) != view_seed(4, 2, 0)
    True
    """
    return ((int(seed) * 1_000_003 + int(view)) * 1_000_000_007 + int(index)) & 0x7FFF_FFFF_FFFF


def view_images(x: torch.Tensor, spec, seed: int, view: int, indices) -> torch.Tensor:
    """View ``view`` of the in-memory images ``x`` (N, C, H, W) of training items ``indices``:
    the per-sample executor of the augmentation ``spec``
    (:class:`~tripletlab.data.augment.AugmentSpec`) with :func:`view_seed` seeds."""
    aug = spec.per_sample()
    return aug.apply_batch(x, [view_seed(seed, view, int(i)) for i in indices])


class _ViewFiles(torch.utils.data.Dataset):
    """Streamed images of one view: item ``i`` is ``files[(i, seeds[i])]`` (augmented)."""

    def __init__(self, files, seeds: list[int]) -> None:
        self.files, self.seeds = files, seeds

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.files[(int(i), self.seeds[int(i)])]


def augmented_view_features(
    model: nn.Module,
    part,
    spec,
    views: int,
    seed: int,
    *,
    files=None,
    device: torch.device | str = "cpu",
    amp=None,
    batch_size: int = 64,
    workers: int | None = None,
) -> torch.Tensor:
    """``model.features`` of ``views`` augmented views of every image of the training split
    ``part`` (V, N, D), view ``v`` (1..V) of item ``i`` augmented with seed
    ``view_seed(seed, v, i)`` (:func:`view_images`); ``files``: the run's streamed
    :class:`~tripletlab.data.streaming.ImageFiles` (None: ``part.x`` in memory)."""
    from ..data.streaming import ImageFiles, image_batches
    from ..inference.embed import default_workers, embed

    feats = _Features(model, False)
    out = []
    for v in range(1, views + 1):
        if files is None:
            chunks = []
            for lo in range(0, len(part), 256):
                idx = range(lo, min(lo + 256, len(part)))
                xa = view_images(part.x[lo : lo + 256], spec, seed, v, idx)
                chunks.append(embed(feats, xa, batch_size, device, amp))
            out.append(torch.cat(chunks))
            continue
        vf = ImageFiles(
            part.paths or [],
            part.y.tolist(),
            files.image_size,
            files.channels,
            spec.per_sample(),
            fit=files.fit,  # the run's resize mode and preprocessing, as training reads them
            preprocess=files.preprocess,
        )
        data = _ViewFiles(vf, [view_seed(seed, v, i) for i in range(len(part))])
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            num_workers=default_workers() if workers is None else workers,
            collate_fn=image_batches,
        )
        was = model.training
        model.eval()
        got = []
        try:
            with torch.no_grad():
                for x, _, _, errors in loader:
                    if any(errors):
                        raise InputError(
                            f"unreadable training image ({next(e for e in errors if e)}): "
                            "cached views need every image"
                        )
                    got.append(embed(feats, x, batch_size, device, amp))
        finally:
            model.train(was)
        out.append(torch.cat(got))
    return torch.stack(out) if out else torch.zeros(0, len(part), 0)
