"""A frozen backbone's features, computed once: the trainer then trains the head alone.

With ``freeze_stages="all"`` no backbone parameter or BatchNorm statistic changes, so the pooled
features of every training (and validation) image are fixed. :class:`FeatureCache` computes
them once, in eval mode (and those of the mirror images when training flips or ``tta="flip"``),
and hands PK batches of features to the head: a training step costs a linear layer instead of
a backbone forward and backward pass, so hundreds of steps take seconds. The head can start as
PCA whitening of the cached training features (``head_init="whiten"``,
:meth:`~tripletlab.models.backbones.BackboneEmbedding.init_whitening`). Validation embeds the
cached validation features with the current head; the final test evaluation runs the whole
model on the images, as ``embed``/``index``/``serve`` do.

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

from .errors import InputError

__all__ = ["FeatureCache"]


class _Features(nn.Module):
    """``model.features`` of the images (or of their mirror images) as a module to embed with."""

    def __init__(self, model: nn.Module, flip: bool) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.flip(-1) if self.flip else x)


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
    ) -> None:
        self.train, self.train_mirror = train, train_mirror
        self.val, self.val_mirror = val, val_mirror
        self._gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_tensors(
        cls, model: nn.Module, x: torch.Tensor, flip: bool = False, batch_size: int = 64
    ) -> FeatureCache:
        """The cache of in-memory images ``x`` (N, C, H, W) (training only)."""
        from .evaluate import embed

        f = embed(_Features(model, False), x, batch_size)
        fm = embed(_Features(model, True), x, batch_size) if flip else None
        return cls(f, fm)

    @classmethod
    def build(cls, trainer, flip: bool) -> FeatureCache:
        """Features of a trainer's training and validation splits (streamed when its images
        are), computed with its device and autocast setting."""
        parts = {}
        for name, part in (("train", trainer.train_set), ("val", trainer.val_set)):
            if part is None or len(part) == 0:
                parts[name] = (None, None)
                continue
            got = []
            for mirror in (False, True)[: 2 if flip else 1]:
                f = trainer.embed_split(part, model=_Features(trainer.model, mirror))[0]
                if len(f) != len(part):
                    raise InputError(
                        f"{len(part) - len(f)} unreadable {name} images: cached backbone "
                        "features need every image (remove them, or use --freeze-stages N "
                        "with a number instead of 'all')"
                    )
                got.append(f)
            parts[name] = (got[0], got[1] if flip else None)
        return cls(*parts["train"], *parts["val"], seed=trainer.cfg.seed + 4)

    def fit_set(self) -> torch.Tensor:
        """Every cached training feature vector (mirror images included), for whitening."""
        if self.train_mirror is None:
            return self.train
        return torch.cat([self.train, self.train_mirror])

    def batch(self, idx) -> torch.Tensor:
        """Features of training items ``idx``; each one of its mirror image with chance 1/2."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        f = self.train[idx]
        if self.train_mirror is None:
            return f
        flip = torch.rand(len(idx), generator=self._gen) < 0.5
        return torch.where(flip[:, None], self.train_mirror[idx], f)

    def val_embeddings(self, model: nn.Module, device: torch.device) -> torch.Tensor | None:
        """Embeddings of the cached validation features by ``model.head`` (None without)."""
        if self.val is None:
            return None
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                mirror = self.val_mirror.to(device) if self.val_mirror is not None else None
                use_mirror = mirror if getattr(model, "tta", "none") == "flip" else None
                return model.head(self.val.to(device), use_mirror).float().cpu()
        finally:
            model.train(was)
