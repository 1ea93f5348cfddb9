"""NMS against a brute-force reference; box overlaps on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from tripletlab.errors import InputError
from tripletlab.faces import box_overlap, nms


def _brute_overlap(a, b, mode):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    aa = (a[2] - a[0]) * (a[3] - a[1])
    ab = (b[2] - b[0]) * (b[3] - b[1])
    den = aa + ab - inter if mode == "union" else min(aa, ab)
    return inter / den if den > 0 else 0.0


def _brute_nms(boxes, scores, thr, mode):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(_brute_overlap(boxes[i], boxes[k], mode) <= thr for k in keep):
            keep.append(i)
    return keep


def _random_boxes(g, n):
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], 1).double()


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_brute_force(mode, thr):
    g = torch.Generator().manual_seed(int(thr * 10) + (mode == "min"))
    for n in (1, 2, 7, 60, 300):
        boxes = _random_boxes(g, n)
        scores = torch.rand(n, generator=g).double()
        if n > 5:
            scores[:3] = scores[3]  # ties: the lower index first
        got = nms(boxes, scores, thr, mode).tolist()
        assert got == _brute_nms(boxes.tolist(), scores.tolist(), thr, mode)


def test_nms_blocks_match_one_block():
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(g, 2300) / 4  # dense: many overlaps across the 2048-row blocks
    scores = torch.rand(2300, generator=g).double()
    got = nms(boxes, scores, 0.4).tolist()
    assert got == _brute_nms(boxes.tolist(), scores.tolist(), 0.4, "union")


def test_box_overlap_values():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 0, 3, 2], [0, 0, 1, 1], [5, 5, 6, 6], [1, 1, 1, 1]])
    assert box_overlap(a, b).tolist()[0] == pytest.approx([1 / 3, 0.25, 0.0, 0.0])
    assert box_overlap(a, b, "min").tolist()[0] == pytest.approx([0.5, 1.0, 0.0, 0.0])


def test_nms_empty_and_bad_input():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(InputError, match=r"\(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(InputError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(InputError, match="mode"):
        nms(torch.zeros(3, 4), torch.zeros(3), 0.5, mode="max")
