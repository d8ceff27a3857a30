"""X-MHA: the re-associated evaluation order equals the direct (official) one — both directions, the
captured attention probabilities, padding masks, the ±50000 clamp, gradients — and `auto` picks the
order by multiply-add count, keeping the direct order (and its dropout masks) for training with dropout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glip.config import CLAMP
from glip.fusion import BiMultiHeadAttention
from glip.parity import run_parity


def make_attn(C, D, E, H, seed=0, dtype=torch.float64, std=None, dropout=0.1):
    torch.manual_seed(seed)
    attn = BiMultiHeadAttention(C, D, E, H, dropout=dropout).to(dtype).eval()
    with torch.no_grad():  # non-zero biases: the bias terms of the re-association must be exercised
        for p in attn.parameters():
            p.normal_(0, std if std is not None else p.shape[-1] ** -0.5)
    return attn


def inputs(B, N, T, C, D, n_valid, seed=1, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, C, generator=g, dtype=dtype) * scale
    l = torch.randn(B, T, D, generator=g, dtype=dtype)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(n_valid):
        mask[b, :n] = 1
    return v, l, mask


def both(attn, v, l, mask, grad=False):
    out = {}
    for path in ("direct", "reassociated"):
        attn.path = path
        with torch.set_grad_enabled(grad):
            out[path] = attn(v, l, mask, keep_attention=True)
    attn.path = "auto"
    return out["direct"], out["reassociated"]


def assert_same(a, b, atol, rtol=0.0):
    (dv_a, dl_a, (pv_a, pl_a)), (dv_b, dl_b, (pv_b, pl_b)) = a, b
    assert pv_a.shape == pv_b.shape and pl_a.shape == pl_b.shape
    torch.testing.assert_close(pv_b, pv_a, atol=atol, rtol=rtol)
    torch.testing.assert_close(pl_b, pl_a, atol=atol, rtol=rtol)
    torch.testing.assert_close(dv_b, dv_a, atol=atol, rtol=rtol)
    torch.testing.assert_close(dl_b, dl_a, atol=atol, rtol=rtol)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 40), T=st.sampled_from([1, 2, 5, 22, 37]),
       dims=st.sampled_from([(16, 12, 32, 4), (8, 6, 64, 8), (64, 32, 128, 2), (5, 7, 12, 3)]),
       data=st.data())
def test_reassociated_equals_direct_float64(B, N, T, dims, data):
    """Exact algebra: in float64 the two orders agree to rounding (1e-12), outputs and probabilities."""
    C, D, E, H = dims
    n_valid = [data.draw(st.integers(1, T)) for _ in range(B)]
    attn = make_attn(C, D, E, H, seed=data.draw(st.integers(0, 1000)))
    v, l, mask = inputs(B, N, T, C, D, n_valid, seed=data.draw(st.integers(0, 1000)))
    direct, reassoc = both(attn, v, l, mask)
    assert_same(direct, reassoc, atol=1e-12)
    pv = reassoc[2][0]
    for b, n in enumerate(n_valid):  # padded tokens receive exactly zero image→text attention
        assert not pv[b, :, :, n:].any()


@pytest.mark.parametrize("T", [1, 5, 22, 256])
def test_reassociated_equals_direct_float32_glip_widths(T):
    """GLIP-T's widths (C 256, text 768, 2048 = 8 heads × 256), batch 2 with different padding."""
    attn = make_attn(256, 768, 2048, 8, dtype=torch.float32)
    v, l, mask = inputs(2, 300, T, 256, 768, [max(1, T // 3), T], dtype=torch.float32)
    direct, reassoc = both(attn, v, l, mask)
    p_tol = 2e-6 if T < 256 else 1e-5
    torch.testing.assert_close(reassoc[2][0], direct[2][0], atol=p_tol, rtol=0)
    torch.testing.assert_close(reassoc[2][1], direct[2][1], atol=p_tol, rtol=0)
    torch.testing.assert_close(reassoc[0], direct[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reassoc[1], direct[1], atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 60), T=st.sampled_from([1, 3, 7]), band=st.integers(1, 64),
       scale=st.sampled_from([0.1, 1.0, 30.0]), data=st.data())
def test_banded_inference_equals_the_whole_pyramid_orders(B, N, T, band, scale, data):
    """CPU inference without captured attention runs the re-associated order in bands of positions, with
    the text→image softmax accumulated online (running max, rescaled sums). Same outputs as the direct and
    the whole-pyramid re-associated orders (float64), with padding, one or many bands, and logits whose
    max grows from band to band (large scale) so that the rescaling is exercised."""
    import glip.fusion as fusion

    C, D, E, H = 16, 12, 32, 4
    attn = make_attn(C, D, E, H, seed=data.draw(st.integers(0, 1000)))
    n_valid = [data.draw(st.integers(1, T)) for _ in range(B)]
    v, l, mask = inputs(B, N, T, C, D, n_valid, seed=data.draw(st.integers(0, 1000)), scale=scale)
    v = v * torch.linspace(0.5, 2.0, N, dtype=v.dtype)[None, :, None]  # later positions reach larger logits
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusion, "LOGIT_BAND_BYTES", band * 8 * B * H * T)  # `band` positions per band
        banded = attn(v, l, mask)
        captured = attn(v, l, mask, keep_attention=True)
        whole = attn._forward_reassociated(v, l, mask, keep_attention=True)
        attn.path = "direct"
        direct = attn(v, l, mask, keep_attention=True)
    assert banded[2] is None
    assert torch.equal(captured[0], banded[0]) and torch.equal(captured[1], banded[1])  # capturing changes nothing
    for ref in (whole, direct):
        torch.testing.assert_close(banded[0], ref[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(banded[1], ref[1], atol=1e-10, rtol=1e-10)
        for got, want in zip(captured[2], ref[2]):  # the maps, in the layout FusionAttention documents
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_clamp_applies_to_the_logits_in_both_orders():
    """Logits far beyond ±50000 are cut to the same values: the probabilities of the clamped logits match."""
    attn = make_attn(16, 12, 32, 4, std=3.0)
    v, l, mask = inputs(2, 30, 6, 16, 12, [3, 6], scale=400.0)
    with torch.no_grad():  # per-head logits of the direct order: many lie beyond the clamp
        A = attn._heads(attn.v_proj(v) * attn.scale) @ attn._heads(attn.l_proj(l)).transpose(-1, -2)
    assert float((A.abs() > CLAMP).double().mean()) > 0.1 and float(A.abs().max()) > 3 * CLAMP
    direct, reassoc = both(attn, v, l, mask)
    assert_same(direct, reassoc, atol=1e-9, rtol=1e-9)


def test_gradients_equal_in_training_without_dropout():
    """Training with dropout 0 (or at eval with autograd on): the re-associated order is used and its
    gradients with respect to the inputs and every weight equal the direct order's."""
    attn = make_attn(8, 6, 64, 8, dropout=0.0).train()
    assert attn.reassociates(50, 5)
    v, l, mask = inputs(2, 50, 5, 8, 6, [2, 5])
    grads = []
    for path in ("direct", "reassociated"):
        attn.path = path
        vv, ll = v.clone().requires_grad_(), l.clone().requires_grad_()
        dv, dl, _ = attn(vv, ll, mask)
        attn.zero_grad()
        ((dv * torch.linspace(-1, 1, dv.shape[-1], dtype=dv.dtype)).sum() + (dl ** 2).sum()).backward()
        grads.append([vv.grad, ll.grad] + [p.grad.clone() for p in attn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-9)


def test_inplace_inference_equals_autograd_forward():
    """Inference fills and normalises in place: the autograd forward's values exactly. (CPU inference runs the
    re-associated order in bands, test above, so its whole-pyramid form is called directly here.)"""
    attn = make_attn(16, 12, 32, 4)
    v, l, mask = inputs(2, 20, 5, 16, 12, [2, 5])
    for path in ("direct", "reassociated"):
        attn.path = path
        fwd = attn._forward_direct if path == "direct" else attn._forward_reassociated
        with torch.no_grad():
            a = fwd(v, l, mask, True)
        b = fwd(v, l, mask, True)
        assert_same(a, tuple(x.detach() if isinstance(x, torch.Tensor) else tuple(y.detach() for y in x) for x in b), 0.0)


def test_auto_path_by_shape_and_mode():
    glip_t = BiMultiHeadAttention(256, 768, 2048, 8).eval()
    for T in (1, 22, 256):  # C == head width: re-associating saves the three N × 2048 projections at any T
        assert glip_t.reassociates(22400, T)
        assert glip_t.macs(22400, T, True) < glip_t.macs(22400, T, False)
    toy = BiMultiHeadAttention(64, 384, 256, 8).eval()  # head width 32 < C: re-associating pays only for T < 64
    assert toy.reassociates(1000, 22) and not toy.reassociates(1000, 128)
    glip_t.train()  # dropout 0.1: the direct order, whose masks training runs were drawn with
    assert not glip_t.reassociates(22400, 22)
    glip_t.dropout = 0.0
    assert glip_t.reassociates(22400, 22)
    glip_t.path = "direct"
    assert not glip_t.reassociates(22400, 22)


def test_training_with_dropout_keeps_the_direct_random_stream():
    attn = make_attn(16, 12, 32, 4).train()
    v, l, mask = inputs(2, 20, 5, 16, 12, [2, 5])
    outs = []
    for path in ("auto", "direct"):
        attn.path = path
        torch.manual_seed(7)
        outs.append(attn(v, l, mask))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("path", ["direct", "reassociated"])
def test_parity_with_official_fixture_in_each_order(tiny_fixture, path, monkeypatch):
    monkeypatch.setattr(BiMultiHeadAttention, "path", path)
    rep = run_parity(tiny_fixture)
    assert rep.ok, rep.table()
    assert {"fuse0.attn_v", "fuse0.attn_l", "fuse0.visual.p3", "tower.p3"} <= {r.name for r in rep.rows}


def test_banded_only_for_full_precision_cpu_inference():
    """The online sums would round in bf16 at every band: autocast, autograd and training with dropout
    take the whole-pyramid orders."""
    attn = make_attn(16, 12, 32, 4, dtype=torch.float32)
    v = torch.randn(1, 30, 16)
    with torch.no_grad():
        assert attn._banded(v) and attn._banded(v.double())
        assert not attn._banded(v.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not attn._banded(v)
    assert not attn._banded(v)  # autograd on
    attn.train()
    with torch.no_grad():
        assert not attn._banded(v)  # dropout 0.1 in training


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("band", [1, 7, 1000])
def test_fused_block_in_bands_equals_the_autograd_block(enabled, band, monkeypatch):
    """CPU inference runs the whole fusion block (input norm, attention, residual) a band at a time, level by
    level, straight into fresh channels-last maps; autograd runs it over the concatenated pyramid. Same maps,
    same text, same attention (float64, batch 2 with different padding, fusion on and off)."""
    import glip.fusion as fusion
    from glip.fusion import VLFuse

    torch.manual_seed(3)
    block = VLFuse(16, 12, 32, 4, init_gamma=0.7).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    block.enabled = enabled
    shapes = [(6, 5), (3, 3), (1, 2)]
    visual = [torch.randn(2, 16, h, w, dtype=torch.float64) for h, w in shapes]
    visual[1] = visual[1].contiguous(memory_format=torch.channels_last)  # either layout in
    hidden = torch.randn(2, 5, 12, dtype=torch.float64)
    masks = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    monkeypatch.setattr(fusion, "LOGIT_BAND_BYTES", band * 8 * 2 * 4 * 5)
    with torch.no_grad():
        assert block.b_attn.attn.uses_bands(visual[0], 41, 5)
        got = block([x.clone() for x in visual], hidden, masks, keep_attention=True)
        plain = block([x.clone() for x in visual], hidden, masks)
    want = block(visual, hidden, masks, keep_attention=True)
    for g, p, w in zip(got[0], plain[0], want[0]):
        assert g.shape == w.shape and g.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g, w.detach(), atol=1e-10, rtol=1e-10)
        assert torch.equal(g, p)  # capturing the maps changes nothing
    torch.testing.assert_close(got[1], want[1].detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[2].image_to_text, want[2].image_to_text.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(got[2].text_to_image, want[2].text_to_image.detach(), atol=1e-12, rtol=0)
    assert got[2].level_shapes == want[2].level_shapes == shapes
