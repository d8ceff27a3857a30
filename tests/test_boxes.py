"""Tests for glip.boxes: anchors vs the official fixture, coder, IoU, NMS."""
import math

import torch
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

import glip.boxes as boxes_mod
from glip.boxes import (
    BBOX_XFORM_CLIP,
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    cell_anchor,
    clip_boxes,
    generalized_box_iou,
    grid_anchors,
    nms,
)

FIXTURE = FIXTURES / "glip-official-tiny" / "io.pt"

# ---------------------------------------------------------------- anchors


def test_cell_anchor_official_values():
    expected = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143],
                [-224, -224, 287, 287], [-448, -448, 575, 575]]
    for size, exp in zip((64, 128, 256, 512, 1024), expected):
        assert cell_anchor(size).tolist() == [exp]


def test_grid_anchors_layout_row_major():
    (a,) = grid_anchors([(2, 3)], strides=(8,), anchor_sizes=(64,))
    assert a.shape == (6, 4)
    # y outer, x inner: second anchor moves in x, fourth starts the next row.
    assert a[1].tolist() == [-20, -28, 43, 35]
    assert a[3].tolist() == [-28, -20, 35, 43]


def test_grid_anchors_match_official_fixture():
    ref = torch.load(FIXTURE, weights_only=True)
    sizes = [(24, 44), (12, 22), (6, 11), (3, 6), (2, 3)]
    ours = grid_anchors(sizes)
    for lvl, a in enumerate(ours):
        expected = ref[f"anchors.p{lvl + 3}"]
        assert a.dtype == expected.dtype
        assert torch.equal(a, expected), f"level p{lvl + 3}"


# ---------------------------------------------------------------- box coder

finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def boxes_st(draw, n_min=1, n_max=8, lo=-200.0, hi=800.0, wmin=1.0, wmax=400.0):
    n = draw(st.integers(n_min, n_max))
    rows = []
    for _ in range(n):
        x1 = draw(st.floats(lo, hi, **finite))
        y1 = draw(st.floats(lo, hi, **finite))
        w = draw(st.floats(wmin, wmax, **finite))
        h = draw(st.floats(wmin, wmax, **finite))
        rows.append([x1, y1, x1 + w - 1, y1 + h - 1])  # +1 widths w, h
    return torch.tensor(rows, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_encode_decode_round_trip(data):
    gt = data.draw(boxes_st())
    anchors = data.draw(boxes_st(n_min=len(gt), n_max=len(gt), wmin=16.0))
    coder = BoxCoder()
    deltas = coder.encode(gt, anchors)
    # Stay inside the dw/dh clamp, else decode deliberately differs.
    if (deltas[:, 2:] / 5.0 > BBOX_XFORM_CLIP).any():
        return
    back = coder.decode(deltas, anchors)
    torch.testing.assert_close(back, gt, rtol=1e-9, atol=1e-7)


def test_decode_zero_deltas_is_identity_and_plus_one():
    anchors = torch.tensor([[-28.0, -28.0, 35.0, 35.0], [10.0, 20.0, 19.0, 39.0]])
    coder = BoxCoder()
    assert torch.equal(coder.decode(torch.zeros(2, 4), anchors), anchors)
    # dw = 5*log 2 doubles the +1 width: 10 -> 20, centre 14.5 kept.
    d = torch.tensor([[0.0, 0.0, 5 * math.log(2.0), 0.0]])
    out = coder.decode(d, anchors[1:])
    torch.testing.assert_close(out, torch.tensor([[5.0, 20.0, 24.0, 39.0]]))


def test_decode_shift_uses_weights():
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20
    out = BoxCoder().decode(torch.tensor([[10.0, -10.0, 0.0, 0.0]]), anchor)
    torch.testing.assert_close(out, anchor + torch.tensor([[10.0, -20.0, 10.0, -20.0]]))


def test_decode_clamps_dw_dh():
    anchor = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # +1 width 16
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchor)
    assert torch.isfinite(out).all()
    # Clamp log(1000/16) -> the width becomes exactly 1000 (+1 convention).
    torch.testing.assert_close(out[0, 2] - out[0, 0] + 1, torch.tensor(1000.0))
    torch.testing.assert_close(out[0, 3] - out[0, 1] + 1, torch.tensor(1000.0))
    # Negative dw is not clamped.
    small = BoxCoder().decode(torch.tensor([[0.0, 0.0, -5 * math.log(4.0), 0.0]]), anchor)
    torch.testing.assert_close(small[0, 2] - small[0, 0] + 1, torch.tensor(4.0))


def test_decode_grad_flows():
    d = torch.zeros(3, 4, requires_grad=True)
    anchors = grid_anchors([(1, 3)], strides=(8,), anchor_sizes=(64,))[0]
    BoxCoder().decode(d, anchors).sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


# ---------------------------------------------------------------- IoU, area, clip

def test_box_area_and_iou_plus_one_golden():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])     # 10 x 10 = 100 pixels
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0],    # overlap 5x5 = 25
                      [10.0, 0.0, 19.0, 9.0],    # touching: no shared pixel
                      [9.0, 9.0, 9.0, 9.0],      # single pixel inside a
                      [0.0, 0.0, 9.0, 9.0]])     # identical
    assert box_area(a).tolist() == [100.0]
    assert box_area(a, plus_one=False).tolist() == [81.0]
    iou = box_iou(a, b)
    assert iou.shape == (1, 4)
    torch.testing.assert_close(iou[0], torch.tensor([25 / 175, 0.0, 1 / 100, 1.0]))
    # Without +1 the first pair is 16 / (81 + 81 - 16).
    torch.testing.assert_close(box_iou(a, b[:1], plus_one=False)[0, 0], torch.tensor(16 / 146))


def test_clip_boxes():
    b = torch.tensor([[-5.0, -3.0, 120.0, 50.0], [10.0, 90.0, 20.0, 200.0]])
    out = clip_boxes(b, h=80, w=100)
    assert out.tolist() == [[0.0, 0.0, 99.0, 50.0], [10.0, 79.0, 20.0, 79.0]]


def test_generalized_box_iou_golden():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    g = generalized_box_iou(a, b)
    # identical -> 1; disjoint unit boxes: iou 0, enclosing 3, union 2 -> -1/3;
    # overlap 1, union 7, enclosing 9 -> 1/7 - 2/9.
    torch.testing.assert_close(g, torch.tensor([1.0, -1 / 3, 1 / 7 - 2 / 9]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- NMS vs naive reference

def _iou_py(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0.0) * max(ih, 0.0)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def naive_nms(boxes, scores, labels, thr):
    """Textbook greedy NMS in plain python, stable on score ties."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(labels[i] != labels[k] or _iou_py(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
    return kept


@st.composite
def nms_case(draw, max_n=40, max_labels=1):
    n = draw(st.integers(0, max_n))
    # Integer coordinates on a small canvas give duplicates, exact-threshold
    # IoUs and nested boxes; few distinct scores give ties.
    coord = st.integers(0, 30)
    boxes = []
    for _ in range(n):
        x1, y1 = draw(coord), draw(coord)
        boxes.append([x1, y1, x1 + draw(st.integers(0, 15)), y1 + draw(st.integers(0, 15))])
    if n and draw(st.booleans()):  # explicit duplicates
        boxes += [list(boxes[0]) for _ in range(draw(st.integers(1, 3)))]
        n = len(boxes)
    scores = [draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.3, 0.7, 1.0])) for _ in range(n)]
    labels = [draw(st.integers(0, max_labels - 1)) for _ in range(n)]
    thr = draw(st.sampled_from([0.0, 0.3, 0.5, 0.6, 0.9, 1.0]))
    return boxes, scores, labels, thr


def _t(boxes, scores, labels):
    return (torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(scores, dtype=torch.float64),
            torch.tensor(labels, dtype=torch.long))


# (max boxes for the matrix path, max sweeps): matrix path, per-box loop,
# and matrix path giving up after one sweep then falling back to the loop.
NMS_PATHS = [(4096, 32), (0, 32), (4096, 1)]


def _on_all_paths(fn):
    old = boxes_mod.MATRIX_NMS_MAX_BOXES, boxes_mod.MATRIX_NMS_MAX_SWEEPS
    try:
        out = []
        for boxes_mod.MATRIX_NMS_MAX_BOXES, boxes_mod.MATRIX_NMS_MAX_SWEEPS in NMS_PATHS:
            out.append(fn())
        return out
    finally:
        boxes_mod.MATRIX_NMS_MAX_BOXES, boxes_mod.MATRIX_NMS_MAX_SWEEPS = old


@settings(max_examples=150, deadline=None)
@given(nms_case())
def test_nms_matches_naive(case):
    boxes, scores, labels, thr = case
    b, s, _ = _t(boxes, scores, labels)
    expected = naive_nms(boxes, scores, [0] * len(scores), thr)
    for keep in _on_all_paths(lambda: nms(b, s, thr)):
        assert keep.dtype == torch.long
        assert keep.tolist() == expected


@settings(max_examples=150, deadline=None)
@given(nms_case(max_labels=6))
def test_batched_nms_matches_naive(case):
    boxes, scores, labels, thr = case
    b, s, lab = _t(boxes, scores, labels)
    expected = naive_nms(boxes, scores, labels, thr)
    for keep in _on_all_paths(lambda: batched_nms(b, s, lab, thr)):
        assert keep.dtype == torch.long
        assert keep.tolist() == expected
        assert (s[keep][1:] <= s[keep][:-1]).all()  # descending score


def test_nms_large_random_paths_agree():
    gen = torch.Generator().manual_seed(0)
    n = 600
    xy = torch.rand(n, 2, generator=gen) * 300
    b = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 80], dim=1)
    s = torch.rand(n, generator=gen)
    lab = torch.randint(0, 5, (n,), generator=gen)
    for fn in (lambda: nms(b, s, 0.5), lambda: batched_nms(b, s, lab, 0.6)):
        a, loop, fallback = _on_all_paths(fn)
        assert torch.equal(a, loop) and torch.equal(a, fallback)


def test_nms_edge_cases():
    empty = torch.zeros(0, 4)
    assert nms(empty, torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    one = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    assert nms(one, torch.tensor([0.3]), 0.5).tolist() == [0]
    # Duplicate boxes with tied scores: the lower index survives.
    dup = one.repeat(3, 1)
    assert nms(dup, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]
    # Same boxes, different labels: nothing is suppressed.
    assert batched_nms(dup, torch.tensor([0.2, 0.5, 0.4]), torch.tensor([0, 1, 2]), 0.5).tolist() == [1, 2, 0]


def test_nms_threshold_is_strict_and_plus_one():
    # +1 IoU of these two is exactly 0.5 (inter 50, union 100): kept at thr 0.5.
    b = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 4.0]])
    assert box_iou(b[:1], b[1:]).item() == 0.5
    s = torch.tensor([0.9, 0.8])
    assert nms(b, s, 0.5).tolist() == [0, 1]
    assert nms(b, s, 0.49).tolist() == [0]
    # Without +1 the IoU is 36/81 < 0.49, so the box survives.
    assert nms(b, s, 0.49, plus_one=False).tolist() == [0, 1]
