"""DyConv's CPU inference path: GroupNorm, scale attention, the branch mean and DyReLU folded into per-channel
affines of the DCN outputs, accumulated chunk by chunk; and the DCN weight kept in GEMM form between calls."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glip.dyhead as dyhead
from glip import gemm
from glip.dyhead import DyConv, ModulatedDeformConv, _merge_moments, _moments, group_norm_affine


def _dyconv(C: int, groups: int, dtype, seed: int) -> DyConv:
    torch.manual_seed(seed)
    m = DyConv(C, groups).to(dtype).eval()
    with torch.no_grad():  # every parameter away from its init (zero offsets, unit norms hide mistakes)
        for p in m.parameters():
            p.normal_(0, 0.4)
    return m


def _pyramid(B: int, C: int, H: int, W: int, levels: int, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(levels):
        feats.append(torch.randn(B, C, H, W, generator=g, dtype=dtype) * 2 + 1.5)  # a mean far from 0
        H, W = (H + 1) // 2, (W + 1) // 2
    return feats


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), H=st.integers(1, 13), W=st.integers(1, 13),
       levels=st.integers(1, 4), chunk=st.sampled_from([9 * 5, 9 * 64, 8192]), seed=st.integers(0, 2**16))
def test_folded_inference_equals_the_map_by_map_forward(B, groups, H, W, levels, chunk, seed):
    """Every branch normed, attended and summed as a map (autograd's order), against the folded path with the
    statistics merged over chunks (one chunk, several, a short last one); float64, so only the order differs."""
    C = 4 * groups
    m = _dyconv(C, groups, torch.float64, seed)
    feats = _pyramid(B, C, H, W, levels, torch.float64, seed)
    old = dyhead.CHUNK_ROWS
    dyhead.CHUNK_ROWS = chunk
    try:
        with torch.no_grad():
            ref = m._forward_maps([f.clone() for f in feats])
            ours = m(feats)
    finally:
        dyhead.CHUNK_ROWS = old
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


def test_folded_path_is_what_cpu_inference_runs_and_matches_autograd_in_fp32():
    m = _dyconv(16, 4, torch.float32, 1)
    feats = _pyramid(2, 16, 12, 15, 3, torch.float32, 2)
    seen = []
    folded = DyConv._forward_folded
    DyConv._forward_folded = lambda self, f: seen.append(len(f)) or folded(self, f)
    try:
        with torch.no_grad():
            inf = m(feats)
        grad = m(feats)  # autograd: the map-by-map forward
    finally:
        DyConv._forward_folded = folded
    assert seen == [3] + [3, 3]  # the batch, then each image alone
    for a, b in zip(inf, grad):
        torch.testing.assert_close(a, b.detach(), atol=3e-5, rtol=1e-5)


def test_folded_inputs_are_left_alone():
    m = _dyconv(8, 2, torch.float64, 3)
    feats = _pyramid(1, 8, 9, 7, 3, torch.float64, 4)
    before = [f.clone() for f in feats]
    with torch.no_grad():
        m(feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, before))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 60), cuts=st.lists(st.integers(1, 59), max_size=4), groups=st.sampled_from([1, 2, 3]),
       offset=st.floats(-1e3, 1e3), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_group_norm_from_merged_chunk_moments_equals_group_norm(rows, cuts, groups, offset, affine, seed):
    """Channel moments of chunks merged, then turned into GroupNorm's per-channel affine: torch's GroupNorm,
    also for a mean a thousand times the spread (where a sum of squares would cancel)."""
    g = torch.Generator().manual_seed(seed)
    C = 2 * groups
    y = torch.randn(rows, C, generator=g, dtype=torch.float64) * torch.rand(C, generator=g, dtype=torch.float64) + offset
    bounds = sorted({0, rows, *[c for c in cuts if c < rows]})
    pieces = [y[s:e] for s, e in zip(bounds, bounds[1:])]
    var, mean = _merge_moments([_moments(p.clone()) for p in pieces], [len(p) for p in pieces])
    torch.testing.assert_close(mean, y.mean(0))
    torch.testing.assert_close(var, y.var(0, correction=0))
    norm = torch.nn.GroupNorm(groups, C, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
    scale, shift = group_norm_affine(norm, mean, var)
    with torch.no_grad():
        ref = norm(y.t()[None, :, :, None])[0, :, :, 0].t()
    torch.testing.assert_close(y * scale + shift, ref, atol=1e-8, rtol=1e-7)


# --- the DCN weight in GEMM form, kept between calls ----------------------------------------------------------------
def _dcn_inputs(conv: ModulatedDeformConv, H: int, W: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    C = conv.weight.shape[1]
    x = torch.randn(1, C, H, W, generator=g)
    om = torch.randn(1, 27, H, W, generator=g)
    return x, om[:, :18], om[:, 18:].sigmoid()


@pytest.mark.parametrize("library", gemm.LIBRARIES)
def test_dcn_weight_is_prepared_once_and_follows_every_change_of_the_weight(monkeypatch, library):
    """Inference keeps the weight in GEMM form (packed, for a call of many chunks) between calls; an in-place
    update (an optimizer step), a load, a dtype change each make the next call use the new weight."""
    if not gemm.available(library):
        pytest.skip(f"torch built without {library}")
    monkeypatch.setattr(dyhead, "CHUNK_ROWS", 9 * 8)
    monkeypatch.setattr(dyhead, "PACK_MIN_CHUNKS", 2)
    torch.manual_seed(0)
    conv = ModulatedDeformConv(6, 5)
    x, offset, mask = _dcn_inputs(conv, 7, 6, 1)

    def fresh():  # what the conv computes with its current weight, nothing kept
        return dyhead.deform_conv2d(x.to(conv.weight.dtype), offset.to(conv.weight.dtype),
                                    mask.to(conv.weight.dtype), conv.weight, conv.bias, use_torchvision=False)

    with gemm.use(library), torch.no_grad():
        a = conv(x, offset, mask)
        first = conv._gemm
        assert first is not None
        b = conv(x, offset, mask)
        assert conv._gemm is first and torch.equal(a, b)  # kept, not formed again
        torch.testing.assert_close(a, fresh())
        conv.weight.add_(0.5)  # an optimizer step
        c = conv(x, offset, mask)
        assert conv._gemm is not first and not torch.allclose(c, a)
        torch.testing.assert_close(c, fresh())
        state = {k: v + 1 for k, v in conv.state_dict().items()}
        conv.load_state_dict(state)
        torch.testing.assert_close(conv(x, offset, mask), fresh())
        conv.double()
        torch.testing.assert_close(conv(x.double(), offset.double(), mask.double()), fresh())
    out = conv(x.double(), offset.double(), mask.double())  # autograd: nothing kept, gradients flow
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_dcn_weight_of_an_inference_tensor_is_not_kept():
    with torch.inference_mode():
        conv = ModulatedDeformConv(4, 3)
        x, offset, mask = _dcn_inputs(conv, 5, 5, 2)
        out = conv(x, offset, mask)
    assert conv._gemm is None
    with torch.no_grad():
        ref = dyhead.deform_conv2d(x, offset, mask, conv.weight, conv.bias, use_torchvision=False)
    torch.testing.assert_close(out, ref)
