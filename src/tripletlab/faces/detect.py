"""Face detection with MTCNN's three-stage cascade (Zhang et al. 2016), plain torch.

Zhang, Zhang, Li and Qiao, "Joint Face Detection and Alignment using Multitask Cascaded
Convolutional Networks", IEEE SPL 2016. With ``m = 12 / min_face`` and the image's shorter side
``L``, the pyramid holds the scales ``s_k = m * factor**k`` while ``L * s_k >= 12``:

1. **P-Net** on every pyramid level: a cell ``(i, j)`` of the output map is the window
   ``[2j, 2j + 12) x [2i, 2i + 12)`` of the level, i.e. ``[2j / s, (2j + 12) / s)`` in the image;
   cells with face probability ``>= t1`` are kept, NMS at IoU 0.5 per level and 0.7 over all
   levels, then box regression ``x1' = x1 + dx1 * w`` (likewise ``y1, x2, y2``; ``w = x2 - x1``)
   and squaring to the longer side about the centre.
2. **R-Net** on 24x24 crops of those boxes: keep ``p >= t2``, NMS 0.7, regression, square.
3. **O-Net** on 48x48 crops: keep ``p >= t3``; landmarks ``x1 + w * u``, ``y1 + h * v`` from the
   box before regression; regression; NMS at 0.7 on intersection over the smaller box.

The defaults are those of the original code and facenet-pytorch: thresholds 0.6 / 0.7 / 0.7,
``min_face`` 20 px, ``factor`` 0.709, RGB input normalised as ``(x - 127.5) / 128``. Crops are
sampled bilinearly (``grid_sample``, zeros outside the image, as the original's padding) from
an octave of the image whose scale is close to the crop's, so large boxes are not aliased. An
image longer than ``max_side`` is first downscaled to it (so memory is bounded; faces smaller
than ``min_face`` in the downscaled image are then not found) and the results are mapped back.

Coordinates are continuous pixel coordinates: the image spans ``[0, W] x [0, H]`` and the
centre of pixel ``(row i, column j)`` is ``(j + 0.5, i + 0.5)``. Boxes are ``(x1, y1, x2, y2)``,
landmarks ``(5, 2)`` points ``(x, y)``: left eye, right eye, nose, left and right mouth corner
(left/right as seen in the image).

Example:
    >>> import torch
    >>> det = detect_faces(torch.zeros(3, 64, 64))  # doctest: +SKIP
    >>> len(det), tuple(det.boxes.shape), tuple(det.landmarks.shape)  # doctest: +SKIP
    (0, (0, 4), (0, 5, 2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .image import to_rgb_tensor
from .networks import load_mtcnn
from .nms import nms

__all__ = ["MTCNN", "Detections", "detect_faces"]


@dataclass
class Detections:
    """Faces found in one image: ``boxes`` (N, 4) ``(x1, y1, x2, y2)``, ``scores`` (N,) (O-Net's
    face probability), ``landmarks`` (N, 5, 2), in the coordinates of the input image, sorted by
    decreasing score; ``image_size`` = (H, W) of the input. A box may extend past the image
    border (a face cut by it): it is the face's extent, not clipped."""

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Detections:
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2), image_size)

    def areas(self) -> torch.Tensor:
        """Box areas (N,)."""
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])

    def largest(self) -> int | None:
        """Index of the largest box, or None when there is none."""
        return int(self.areas().argmax()) if len(self) else None


def _square(boxes: torch.Tensor) -> torch.Tensor:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes + offsets * torch.stack([w, h, w, h], dim=1)


class _Octaves:
    """The image (1, 3, H, W) in [0, 255] and its 2x, 4x, ... area-downscaled versions."""

    def __init__(self, x: torch.Tensor, smallest: int = 12) -> None:
        self.levels = [x]
        while min(self.levels[-1].shape[-2:]) >= 2 * smallest:
            self.levels.append(F.avg_pool2d(self.levels[-1], 2, ceil_mode=True))

    def crops(self, boxes: torch.Tensor, size: int, image: torch.Tensor | None = None):
        """(N, 3, size, size) bilinear crops of ``boxes`` (image coordinates), normalised;
        ``image`` (N,): which image of the batch each box is on (default: the first)."""
        out = torch.empty(boxes.shape[0], 3, size, size)
        if boxes.shape[0] == 0:
            return out
        if image is None:
            image = torch.zeros(boxes.shape[0], dtype=torch.long)
        side = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3).min(dim=1).values
        level = torch.floor(torch.log2(side / size)).clamp(0, len(self.levels) - 1).long()
        t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        for k, b_i in torch.unique(torch.stack([level, image], 1), dim=0).tolist():
            idx = ((level == k) & (image == b_i)).nonzero().flatten()
            img = self.levels[k][b_i : b_i + 1]
            b = boxes[idx] / 2.0**k
            h, w = img.shape[-2:]
            # one tall grid (1, n*size, size, 2) sampled from the single image: no batch copies
            gx = b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])  # (n, size) pixel x
            gy = b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])
            ux = (2 * gx / w - 1)[:, None, :].expand(-1, size, -1)
            uy = (2 * gy / h - 1)[:, :, None].expand(-1, -1, size)
            grid = torch.stack([ux, uy], dim=-1).reshape(1, -1, size, 2)
            s = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[idx] = s.reshape(3, -1, size, size).transpose(0, 1)
        return ((out - 127.5) / 128.0).contiguous(memory_format=torch.channels_last)


class MTCNN:
    """The MTCNN detector (see the module): ``MTCNN().detect(image) -> Detections``.

    ``min_face``: smallest face side in pixels (of the possibly downscaled image); ``thresholds``:
    P-/R-/O-Net face probabilities; ``factor``: pyramid step; ``nms_thresholds``: P-Net per level,
    P-Net over levels, R-Net, O-Net (the last on intersection over the smaller box);
    ``max_side``: longer side images are first downscaled to; ``batch``: crops per R-/O-Net
    forward (memory bound); ``weights_dir``: another folder with the three weight files.

    Example:
        >>> import torch
        >>> det = MTCNN(min_face=40).detect(torch.rand(3, 120, 160))  # doctest: +SKIP
    """

    def __init__(
        self,
        min_face: float = 20.0,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        nms_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7),
        max_side: int = 1600,
        batch: int = 512,
        weights_dir=None,
    ) -> None:
        if not (math.isfinite(min_face) and min_face >= 12):
            raise InputError(f"min_face must be a number >= 12 pixels, got {min_face}")
        if not (0 < factor < 1):
            raise InputError(f"factor must be in (0, 1), got {factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise InputError(f"thresholds must be three probabilities, got {thresholds}")
        if max_side < 12:
            raise InputError(f"max_side must be >= 12, got {max_side}")
        self.min_face = float(min_face)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.nms_thresholds = tuple(float(t) for t in nms_thresholds)
        self.max_side = int(max_side)
        self.batch = int(batch)
        self.pnet, self.rnet, self.onet = load_mtcnn(weights_dir)

    # ------------------------------------------------------------------------------ stages

    def scales(self, h: int, w: int) -> list[float]:
        """The pyramid's scales for an (h, w) image (empty when it is smaller than a face)."""
        m = 12.0 / self.min_face
        shorter = min(h, w) * m
        out = []
        while shorter >= 12:
            out.append(m * self.factor ** len(out))
            shorter *= self.factor
        return out

    def _stage1(self, octaves: _Octaves) -> list[torch.Tensor]:
        """P-Net over the pyramid of a batch of same-size images: boxes (n_b, 4) per image."""
        x = octaves.levels[0]
        n_img, (h, w) = x.shape[0], x.shape[-2:]
        found: list[list[torch.Tensor]] = [[] for _ in range(n_img)]
        for s in self.scales(h, w):
            hs, ws = math.ceil(h * s), math.ceil(w * s)
            # resize from the smallest octave still at least as large (cheap, antialiased)
            k = max(0, min(len(octaves.levels) - 1, math.floor(-math.log2(s))))
            src = octaves.levels[k]
            level = (
                src
                if src.shape[-2:] == (hs, ws)
                else F.interpolate(
                    src, size=(hs, ws), mode="bilinear", antialias=True, align_corners=False
                )
            )
            level = ((level - 127.5) / 128.0).contiguous(memory_format=torch.channels_last)
            prob, reg = self.pnet(level)
            for i in range(n_img):
                p = prob[i, 1]
                ii, jj = (p >= self.thresholds[0]).nonzero(as_tuple=True)
                if ii.numel() == 0:
                    continue
                b = torch.stack([2.0 * jj, 2.0 * ii, 2.0 * jj + 12, 2.0 * ii + 12], dim=1) / s
                score = p[ii, jj]
                off = reg[i][:, ii, jj].T
                keep = nms(b, score, self.nms_thresholds[0])
                found[i].append(torch.cat([b[keep], score[keep, None], off[keep]], dim=1))
        out = []
        for parts in found:
            if not parts:
                out.append(torch.zeros(0, 4))
                continue
            allb = torch.cat(parts)
            allb = allb[nms(allb[:, :4], allb[:, 4], self.nms_thresholds[1])]
            out.append(_square(_regress(allb[:, :4], allb[:, 5:9])))
        return out

    def _run(self, net, crops: torch.Tensor) -> list[torch.Tensor]:
        outs = [net(crops[i : i + self.batch]) for i in range(0, crops.shape[0], self.batch)]
        return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]

    def _prepare(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(x (1, 3, h, w) in [0, 255], downscaled to max_side; the input's (H, W))``."""
        from PIL import Image

        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image: shrink it first
            size = (image.height, image.width)
            r = min(1.0, self.max_side / max(size)) if min(size) > 0 else 1.0
            if r < 1.0:
                image = image.resize(
                    (max(1, round(image.width * r)), max(1, round(image.height * r))),
                    Image.BILINEAR,
                    reducing_gap=2.0,
                )
            return to_rgb_tensor(image)[None], size
        x = to_rgb_tensor(image)[None]
        size = (int(x.shape[-2]), int(x.shape[-1]))
        r = min(1.0, self.max_side / max(size)) if min(size) > 0 else 1.0
        if r < 1.0:
            x = F.interpolate(
                x, size=(max(1, round(size[0] * r)), max(1, round(size[1] * r))), mode="area"
            )
        return x, size

    @torch.no_grad()
    def detect(self, image) -> Detections:
        """Faces in ``image`` (PIL image, array, tensor or path; see :mod:`.image`); an empty
        :class:`Detections` when there is none or the image is smaller than 12 pixels."""
        return self.detect_batch([image])[0]

    @torch.no_grad()
    def detect_batch(self, images, images_per_batch: int = 16) -> list[Detections]:
        """:meth:`detect` on each of ``images``: images of one (downscaled) size go through
        P-Net together (``images_per_batch`` at a time), and every image's crops through R-Net
        and O-Net together; the same results as one at a time.

        Example:
            >>> dets = MTCNN().detect_batch(["a.jpg", "b.jpg"])  # doctest: +SKIP
        """
        prepared = [self._prepare(im) for im in images]
        out: list[Detections | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (x, size) in enumerate(prepared):
            if min(x.shape[-2:]) < 12:
                out[i] = Detections.empty(size)
            else:
                groups.setdefault((int(x.shape[-2]), int(x.shape[-1])), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), max(1, images_per_batch)):
                chunk = idx[start : start + max(1, images_per_batch)]
                x = torch.cat([prepared[i][0] for i in chunk])
                dets = self._detect_stacked(x, [prepared[i][1] for i in chunk])
                for i, d in zip(chunk, dets, strict=True):
                    out[i] = d
        return out  # type: ignore[return-value]

    def _detect_stacked(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Detections]:
        n = x.shape[0]
        oct_ = _Octaves(x)
        boxes = self._stage1(oct_)
        # stage 2: every image's crops in one R-Net pass
        boxes, score, reg = self._stage(self.rnet, oct_, boxes, 24)
        boxes = [
            _square(_regress(b[k], r[k]))
            for b, sc, r in zip(boxes, score, reg, strict=True)
            for k in [nms(b, sc, self.nms_thresholds[2])]
        ]
        # stage 3
        boxes, score, reg, pts = self._stage(self.onet, oct_, boxes, 48)
        out = []
        for i in range(n):
            b, sc, r, p = boxes[i], score[i], reg[i], pts[i]
            if b.shape[0] == 0:
                out.append(Detections.empty(sizes[i]))
                continue
            w = (b[:, 2] - b[:, 0])[:, None]
            h = (b[:, 3] - b[:, 1])[:, None]
            landmarks = torch.stack([b[:, 0:1] + w * p[:, 0:5], b[:, 1:2] + h * p[:, 5:10]], 2)
            b = _regress(b, r)
            k = nms(b, sc, self.nms_thresholds[3], mode="min")
            # from the downscaled image back to the input's coordinates
            scale = torch.tensor([x.shape[-1] / sizes[i][1], x.shape[-2] / sizes[i][0]])
            b, landmarks, sc = b[k] / scale.repeat(2), landmarks[k] / scale, sc[k]
            ok = torch.isfinite(b).all(1) & torch.isfinite(landmarks).flatten(1).all(1)
            out.append(Detections(b[ok].float(), sc[ok].float(), landmarks[ok].float(), sizes[i]))
        return out

    def _stage(self, net, oct_: _Octaves, boxes: list[torch.Tensor], size: int):
        """R-Net or O-Net on the crops of every image's boxes; per image the boxes, scores and
        the other outputs that pass the stage's threshold."""
        threshold = self.thresholds[1] if size == 24 else self.thresholds[2]
        counts = [b.shape[0] for b in boxes]
        n_out = 2 if size == 24 else 3
        if sum(counts) == 0:
            empty = [torch.zeros(0, 4) for _ in boxes]
            extra = [[torch.zeros(0, 4) for _ in boxes]] + (
                [[torch.zeros(0, 10) for _ in boxes]] if n_out == 3 else []
            )
            return (empty, [torch.zeros(0) for _ in boxes], *extra)
        allb = torch.cat(boxes)
        which = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts))
        outs = self._run(net, oct_.crops(allb, size, which))
        prob, rest = outs[0][:, 1], outs[1:]
        keep = prob >= threshold
        res_b, res_s, res_rest = [], [], [[] for _ in rest]
        for i in range(len(boxes)):
            m = keep & (which == i)
            res_b.append(allb[m])
            res_s.append(prob[m])
            for j, o in enumerate(rest):
                res_rest[j].append(o[m])
        return (res_b, res_s, *res_rest)


_DEFAULT: dict[tuple, MTCNN] = {}


def detect_faces(image, min_face: float = 20.0, **kwargs) -> Detections:
    """:meth:`MTCNN.detect` with a detector built once per set of options.

    Example:
        >>> det = detect_faces("group.jpg")  # doctest: +SKIP
        >>> det.boxes, det.scores, det.landmarks  # doctest: +SKIP
    """
    key = (min_face, tuple(sorted(kwargs.items())))
    if key not in _DEFAULT:
        _DEFAULT[key] = MTCNN(min_face=min_face, **kwargs)
    return _DEFAULT[key].detect(image)
