"""Tests for glip.train.losses: ATSS, focal, GIoU, centerness, full loss."""
import math
import statistics

import pytest
import torch

from glip.boxes import BoxCoder, box_iou, grid_anchors
from glip.train.losses import (
    GLIPLossOutput,
    atss_assign,
    centerness_targets,
    giou_loss,
    glip_loss,
    token_sigmoid_focal_loss,
)

# Small 3-level pyramid for a 64x64 padded image.
SIZES = [(8, 8), (4, 4), (2, 2)]
STRIDES = (8, 16, 32)
ANCHOR_SIZES = (32, 64, 128)


def small_anchors(dtype=torch.float32):
    return grid_anchors(SIZES, STRIDES, ANCHOR_SIZES, dtype=dtype)


# ---------------------------------------------------------------- ATSS

def test_atss_gt_on_anchor_is_positive():
    levels = small_anchors()
    gt = levels[1][5:6].clone()                    # exactly the 6th anchor of level 1
    matched, iou = atss_assign(levels, gt)
    a = levels[0].shape[0] + 5
    assert matched[a].item() == 0
    assert iou[a].item() == pytest.approx(1.0)
    assert (matched >= -1).all() and (matched <= 0).all()


def test_atss_gt_without_anchor_centre_inside_has_no_positive():
    levels = small_anchors()
    # Level-0 centres sit at 3.5 + 8k; coarser levels at 7.5 + 16k and 15.5 + 32k.
    gt = torch.tensor([[4.0, 4.0, 7.0, 7.0]])
    matched, iou = atss_assign(levels, gt)
    assert (matched == -1).all()
    assert (iou == 0).all()


def test_atss_no_gt_all_negative():
    levels = small_anchors()
    n = sum(l.shape[0] for l in levels)
    for empty in (torch.zeros(0, 4), torch.zeros(0)):
        matched, iou = atss_assign(levels, empty)
        assert matched.shape == (n,) and (matched == -1).all()
        assert iou.shape == (n,) and (iou == 0).all()


def test_atss_levels_smaller_than_topk():
    levels = grid_anchors([(3, 3), (1, 2), (1, 1)], STRIDES, ANCHOR_SIZES)
    gt = torch.tensor([[2.0, 3.0, 20.0, 18.0], [0.0, 0.0, 23.0, 23.0]])
    matched, _ = atss_assign(levels, gt, topk=9)
    assert matched.shape == (9 + 2 + 1,)
    assert (matched >= 0).any()


def test_atss_anchor_shared_by_two_gts_goes_to_max_iou():
    levels = small_anchors()
    a = levels[0].shape[0] + 5
    exact = levels[1][5].clone()
    bigger = exact + torch.tensor([-6.0, -6.0, 6.0, 6.0])    # same centre, lower IoU
    # The anchor is positive for ``bigger`` on its own...
    alone, _ = atss_assign(levels, bigger[None])
    assert alone[a].item() == 0
    # ...but with both gts it goes to the one with the higher IoU, in either order.
    m, _ = atss_assign(levels, torch.stack([exact, bigger]))
    assert m[a].item() == 0
    m, _ = atss_assign(levels, torch.stack([bigger, exact]))
    assert m[a].item() == 1


def naive_atss(levels, gt, topk=9):
    """Loop-by-loop transcription of spec §4 in plain python floats."""
    anchors = torch.cat(levels).tolist()
    gts = gt.tolist()
    iou = box_iou(torch.tensor(anchors, dtype=torch.float64), gt.double()).tolist()
    ctr = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
    best = {}
    for g, box in enumerate(gts):
        gx, gy = ctr(box)
        cands, start = [], 0
        for level in levels:
            n = level.shape[0]
            idx = sorted(range(start, start + n),
                         key=lambda a: math.hypot(ctr(anchors[a])[0] - gx, ctr(anchors[a])[1] - gy))
            cands += idx[:topk]
            start += n
        vals = [iou[a][g] for a in cands]
        thr = statistics.mean(vals) + statistics.stdev(vals)
        for a in cands:
            cx, cy = ctr(anchors[a])
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            if iou[a][g] >= thr and inside and (a not in best or iou[a][g] > best[a][1]):
                best[a] = (g, iou[a][g])
    return [best[a][0] if a in best else -1 for a in range(len(anchors))]


def test_atss_matches_naive_reference_on_random_gts():
    gen = torch.Generator().manual_seed(0)
    levels = small_anchors(torch.float64)
    for _ in range(12):
        g = int(torch.randint(1, 6, (1,), generator=gen))
        xy = torch.rand(g, 2, generator=gen, dtype=torch.float64) * 50
        wh = 4 + torch.rand(g, 2, generator=gen, dtype=torch.float64) * 56
        gt = torch.cat([xy, (xy + wh).clamp(max=63)], dim=1)
        matched, iou = atss_assign(levels, gt)
        assert matched.tolist() == naive_atss(levels, gt)
        pos = matched >= 0
        full = box_iou(torch.cat(levels), gt)
        torch.testing.assert_close(iou[pos], full[pos.nonzero().squeeze(1), matched[pos]])


# ---------------------------------------------------------------- focal loss

def test_token_focal_loss_matches_formula_and_masks():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=gen) * 3
    targets = (torch.rand(2, 5, 6, generator=gen) > 0.7).float()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = token_sigmoid_focal_loss(logits, targets, mask, alpha=0.25, gamma=2.0)

    ref = 0.0
    for b in range(2):
        for n in range(5):
            for t in range(6):
                if not mask[b, t]:
                    continue
                x, y = logits[b, n, t].item(), targets[b, n, t].item()
                p = 1 / (1 + math.exp(-x))
                if y == 1:
                    ref += -0.25 * (1 - p) ** 2 * math.log(p)
                else:
                    ref += -0.75 * p ** 2 * math.log(1 - p)
    assert got.item() == pytest.approx(ref, rel=1e-5)

    # Masked tokens contribute nothing, whatever their logits/targets are.
    logits2, targets2 = logits.clone(), targets.clone()
    logits2[0, :, 4:] = 1e4
    targets2[0, :, 4:] = 1 - targets2[0, :, 4:]
    logits2.requires_grad_(True)
    got2 = token_sigmoid_focal_loss(logits2, targets2, mask)
    assert got2.item() == pytest.approx(got.item(), rel=1e-6)
    got2.backward()
    assert (logits2.grad[0, :, 4:] == 0).all()
    assert torch.isfinite(logits2.grad).all()


def test_token_focal_loss_without_mask_sums_everything():
    logits = torch.zeros(1, 2, 3)
    targets = torch.zeros(1, 2, 3)
    # p = 0.5 negatives: 0.75 * 0.25 * log 2 each, 6 pairs.
    assert token_sigmoid_focal_loss(logits, targets).item() == pytest.approx(6 * 0.75 * 0.25 * math.log(2))


# ---------------------------------------------------------------- GIoU, centerness

def test_giou_loss_values():
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 9.0, 7.0]])
    assert giou_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # inter 1, union 7, enclosing 9 -> GIoU 1/7 - 2/9.
    expected = 1 - (1 / 7 - 2 / 9)
    assert giou_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert giou_loss(pred, target, weight=torch.tensor([0.5])).item() == pytest.approx(0.5 * expected, rel=1e-5)
    # Inverted prediction: x2 lifted to x1 -> zero area, iou 0, enclosing [0,0,3,2] = 6.
    inverted = torch.tensor([[2.0, 0.0, 0.0, 2.0]])
    t2 = torch.tensor([[0.0, 0.0, 3.0, 2.0]])
    assert giou_loss(inverted, t2).item() == pytest.approx(1.0, rel=1e-5)


def test_centerness_targets():
    gt = torch.tensor([[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
    anchors = torch.tensor([[6.0, 1.0, 14.0, 9.0],    # centre (10, 5): box centre
                            [0.0, 0.0, 10.0, 6.0]])   # centre (5, 3)
    c = centerness_targets(anchors, gt)
    assert c[0].item() == pytest.approx(1.0)
    assert c[1].item() == pytest.approx(math.sqrt(5 / 15 * 3 / 7))


# ---------------------------------------------------------------- full loss

def _setup(batch=2, tokens=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    anchors = small_anchors()
    targets = []
    for _ in range(batch):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]])
        boxes = boxes + torch.rand(2, 4, generator=gen) * 3
        pmap = torch.zeros(2, tokens)
        pmap[0, 1:3] = 1
        pmap[1, 4] = 1
        targets.append({"boxes": boxes, "positive_map": pmap})
    text_mask = torch.ones(batch, tokens, dtype=torch.long)
    text_mask[:, -2:] = 0
    logits = [torch.zeros(batch, h * w, tokens) for h, w in SIZES]
    reg = [torch.randn(batch, 4, h, w, generator=gen) * 0.5 for h, w in SIZES]
    ctr = [torch.zeros(batch, 1, h, w) for h, w in SIZES]
    return logits, reg, ctr, anchors, targets, text_mask


def test_glip_loss_shapes_and_components():
    logits, reg, ctr, anchors, targets, mask = _setup()
    out = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder())
    assert isinstance(out, GLIPLossOutput)
    assert out.num_pos > 0
    for t in (out.total, out.token, out.reg, out.centerness):
        assert t.dim() == 0 and torch.isfinite(t)
    torch.testing.assert_close(out.total, out.token + out.reg + out.centerness)
    assert set(out.as_dict()) == {"loss", "loss_token", "loss_reg", "loss_centerness", "num_pos"}


def test_glip_loss_flattens_maps_row_major():
    """Gradients reach exactly the (y, x) cells of the ATSS positives."""
    logits, reg, ctr, anchors, targets, mask = _setup(batch=1)
    reg = [r.requires_grad_(True) for r in reg]
    out = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder())
    out.reg.backward()
    matched, _ = atss_assign(anchors, targets[0]["boxes"])
    grad_pos = torch.cat([(r.grad[0].abs().sum(0) > 0).reshape(-1) for r in reg])
    assert torch.equal(grad_pos, matched >= 0)


def test_glip_loss_without_gts():
    logits, reg, ctr, anchors, targets, mask = _setup()
    for t in targets:
        t["boxes"] = torch.zeros(0, 4)
        t["positive_map"] = torch.zeros(0, logits[0].shape[-1])
    reg = [r.requires_grad_(True) for r in reg]
    out = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder())
    assert out.num_pos == 0
    assert out.reg.item() == 0 and out.centerness.item() == 0
    # All-negative focal loss at p = 0.5, normalised by max(num_pos, 1) = 1.
    n_valid = sum(l.shape[1] for l in logits) * int(mask.sum())
    assert out.token.item() == pytest.approx(n_valid * 0.75 * 0.25 * math.log(2), rel=1e-5)
    out.total.backward()
    assert all(r.grad is not None for r in reg)


def test_glip_loss_rejects_mismatched_anchors():
    logits, reg, ctr, anchors, targets, mask = _setup()
    with pytest.raises(ValueError):
        glip_loss(logits, reg, ctr, anchors[:2], targets, mask, BoxCoder())


def test_glip_loss_decreases_under_optimisation():
    torch.manual_seed(0)
    logits, reg, ctr, anchors, targets, mask = _setup()
    params = [torch.nn.Parameter(t.clone()) for t in logits + reg + ctr]
    n = len(logits)
    opt = torch.optim.Adam(params, lr=0.05)
    coder = BoxCoder()

    def loss():
        return glip_loss(params[:n], params[n:2 * n], params[2 * n:], anchors, targets, mask, coder)

    start = loss()
    for _ in range(300):
        opt.zero_grad()
        out = loss()
        out.total.backward()
        opt.step()
    end = loss()
    assert end.total.item() < 0.5 * start.total.item()
    assert end.token.item() < 0.5 * start.token.item()
    assert end.reg.item() < 0.5 * start.reg.item()


def test_token_softmax_loss_ignores_a_shared_shift_and_padding():
    """The property that makes it useful: adding the same value to every valid token (the "objectness"
    direction the focal loss rewards) changes nothing; padded tokens never count."""
    from glip.train.losses import token_softmax_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen)
    targets = torch.zeros(5, 7)
    targets[:, 1] = 1
    targets[:3, 2] = 1
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[:, -2:] = 0
    base = token_softmax_loss(logits, targets, mask)
    torch.testing.assert_close(token_softmax_loss(logits + torch.randn(5, 1, generator=gen) * 5, targets, mask), base)
    padded = logits.clone()
    padded[:, -2:] = 1e4
    torch.testing.assert_close(token_softmax_loss(padded, targets, mask), base)
    # by hand: cross-entropy against the normalised positive tokens, mean over anchors
    logp = torch.log_softmax(logits[:, :5], -1)
    want = torch.cat([-(logp[:3, 1] + logp[:3, 2]) / 2, -logp[3:, 1]]).mean()
    torch.testing.assert_close(base, want)


def test_glip_loss_adds_the_contrastive_term_only_when_asked():
    logits, reg, ctr, anchors, targets, mask = _setup()
    logits = [l + torch.randn_like(l) for l in logits]
    plain = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder())
    both = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder(), contrastive_weight=0.5)
    assert plain.contrastive is None and "loss_contrastive" not in plain.as_dict()
    assert both.contrastive is not None and both.contrastive > 0
    torch.testing.assert_close(both.total, plain.total + both.contrastive)


def test_masked_tokens_get_no_gradient_from_any_term():
    """A token with text_mask 0 (padding, or a pseudo-label phrase screened out) is neither a negative for the
    focal term nor a competitor in the token softmax: its logits get exactly zero gradient."""
    logits, reg, ctr, anchors, targets, mask = _setup()
    mask = mask.clone()
    masked = int(mask[0].nonzero()[-1])  # a valid token of image 0
    mask[0, masked] = 0
    logits = [l.clone().requires_grad_(True) for l in logits]
    out = glip_loss(logits, reg, ctr, anchors, targets, mask, BoxCoder(), contrastive_weight=1.0)
    out.total.backward()
    for l in logits:
        assert torch.all(l.grad[0, :, masked] == 0)
        assert l.grad[0].abs().sum() > 0


def test_normalizer_makes_split_batches_exact():
    """Two "ranks" holding halves of a batch (one of them with an image without any box), each normalising by the
    mean of both ranks' counts: the average of their gradients is the whole batch's gradient (every term,
    contrastive included), and the average of their losses is the whole batch's loss."""
    logits, reg, ctr, anchors, targets, mask = _setup(batch=4, seed=3)
    targets[3] = {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 8)}
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(l.shape, generator=gen) for l in logits]
    ctr = [torch.randn(c.shape, generator=gen) for c in ctr]

    def run(idx, normalizer=None, record=None):
        ls = [l[idx].clone().requires_grad_(True) for l in logits]
        rs = [r[idx].clone().requires_grad_(True) for r in reg]
        cs = [c[idx].clone().requires_grad_(True) for c in ctr]

        def norm(stats):
            if record is not None:
                record.append(stats.clone())
            return normalizer(stats) if normalizer else stats

        out = glip_loss(ls, rs, cs, anchors, [targets[i] for i in idx], mask[idx], BoxCoder(),
                        contrastive_weight=0.7, normalizer=norm)
        out.total.backward()
        return out, [t.grad for t in ls + rs + cs]

    whole, g_whole = run([0, 1, 2, 3])
    halves = ([0, 1], [2, 3])
    stats = []
    for h in halves:
        run(h, record=stats)
    mean = (stats[0] + stats[1]) / 2
    parts = [run(h, normalizer=lambda s: mean) for h in halves]
    assert float(stats[1][0]) < float(stats[0][0])  # the second half has fewer positives: the normalisers differ
    got = (parts[0][0].total + parts[1][0].total) / 2
    torch.testing.assert_close(got, whole.total, rtol=1e-5, atol=1e-6)
    for j, g in enumerate(g_whole):
        avg = torch.cat([parts[0][1][j], parts[1][1][j]]) / 2
        torch.testing.assert_close(avg, g, rtol=1e-5, atol=1e-7)
