"""glip.gemm: the CPU fp32 inference products on oneDNN or torch's BLAS give F.linear's values at fp32 rounding,
autograd / autocast / other dtypes keep F.linear, and the FLOP counter sees every path."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from glip import gemm
from glip.bench import count_flops
from glip.errors import ConfigError

LIBS = [pytest.param(lib, marks=pytest.mark.skipif(not gemm.available(lib), reason=f"{lib} not built in"))
        for lib in gemm.LIBRARIES]


@pytest.mark.parametrize("library", LIBS)
@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3), k=st.integers(1, 70), n=st.integers(1, 40),
       bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear_is_f_linear_at_fp32_rounding(library, lead, k, n, bias, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * k if strided else k, generator=g)
    x = x[..., ::2] if strided else x  # a non-contiguous input (a view with a stride)
    w, b = torch.randn(n, k, generator=g), (torch.randn(n, generator=g) if bias else None)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    with gemm.use(library), torch.no_grad():
        assert gemm.onednn_applies(x, w) == (library == "onednn")
        out = gemm.linear(x, w, b)
        packed = gemm.pack(w, 8, like=x)
        out_packed = packed(x, b) if packed is not None else out
    assert out.shape == ref.shape and out.dtype == torch.float32
    tol = dict(atol=1e-5 * (k ** 0.5), rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(out_packed.double(), ref, **tol)


@pytest.mark.parametrize("library", LIBS)
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 40), bias=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 8.0]), seed=st.integers(0, 2 ** 16))
def test_linear_gelu_is_exact_gelu_of_linear(library, rows, k, n, bias, scale, seed):
    """oneDNN's GELU post-op is the exact (erf) GELU, not the tanh one: float64 reference, fp32 rounding,
    across the range where the two differ (scale 1) and the saturated tails."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g) * scale, torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    ref = F.gelu(F.linear(x.double(), w.double(), None if b is None else b.double()))
    with gemm.use(library), torch.no_grad():
        out = gemm.linear_gelu(x, w, b)
    torch.testing.assert_close(out.double(), ref, atol=2e-5 * scale * (k ** 0.5), rtol=1e-5)
    tanh = F.gelu(F.linear(x.double(), w.double(), None if b is None else b.double()), approximate="tanh")
    if scale == 1.0 and rows * n >= 64:  # the test can tell the two GELUs apart
        assert (tanh - ref).abs().max() > 1e-4


def test_autograd_autocast_and_other_dtypes_keep_f_linear():
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    with gemm.use("onednn"):
        assert not gemm.onednn_applies(x, w)  # autograd on
        with torch.no_grad():
            assert not gemm.onednn_applies(x.double(), w.double())
            assert gemm.pack(w.double(), 4, like=x.double()) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not gemm.onednn_applies(x, w)
                assert gemm.pack(w, 4, like=x) is None
                assert gemm.linear(x, w, b).dtype == torch.bfloat16  # autocast's own linear
    with gemm.use("blas"), torch.no_grad():
        assert not gemm.onednn_applies(x, w)


@pytest.mark.parametrize("library", LIBS)
def test_empty_products(library):
    """No rows gives no rows; an empty inner dimension (which oneDNN cannot multiply) gives the bias."""
    w, b = torch.randn(4, 5), torch.randn(4)
    with gemm.use(library), torch.no_grad():
        assert gemm.linear(torch.randn(0, 5), w, b).shape == (0, 4)
        assert gemm.linear(torch.randn(2, 0, 5), w, b).shape == (2, 0, 4)
        assert torch.equal(gemm.linear(torch.randn(3, 0), torch.randn(4, 0), b), b.expand(3, 4))
        assert torch.equal(gemm.baddbmm(None, torch.randn(1, 3, 0), torch.randn(1, 0, 2)), torch.zeros(1, 3, 2))


def test_linear_module_trains_and_keeps_nn_linear_keys():
    torch.manual_seed(0)
    ours, ref = gemm.Linear(5, 3), torch.nn.Linear(5, 3)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) and isinstance(ours, torch.nn.Linear)
    x = torch.randn(2, 5, requires_grad=True)
    ours(x).square().sum().backward()
    gx, x.grad = x.grad.clone(), None
    ref(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("library", LIBS)
def test_every_gemm_path_is_counted(library):
    x, w, b = torch.randn(7, 3, 16), torch.randn(8, 16), torch.randn(8)
    with gemm.use(library), torch.no_grad():
        assert count_flops(lambda: gemm.linear(x, w, b)) == 2 * 21 * 16 * 8
        assert count_flops(lambda: gemm.linear_gelu(x, w, b)) == 2 * 21 * 16 * 8
        packed = gemm.pack(w, 21, like=x)
        if packed is not None:
            assert count_flops(lambda: packed(x.view(21, 16), b)) == 2 * 21 * 16 * 8


def test_use_refuses_an_unknown_library():
    with pytest.raises(ConfigError, match="GLIP_CPU_GEMM must be one of onednn, blas, not 'mkl'"):
        with gemm.use("mkl"):
            pass


def test_environment_chooses_the_library_and_a_bad_name_is_one_line():
    code = "from glip import gemm; print(gemm.library())"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, GLIP_CPU_GEMM="blas"), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "blas"
    bad = subprocess.run([sys.executable, "-m", "glip", "predict", "--image", "x.jpg", "--prompt", "cat"],
                         env=dict(env, GLIP_CPU_GEMM="fast"), capture_output=True, text=True)
    assert bad.returncode != 0 and "GLIP_CPU_GEMM must be one of onednn, blas, not 'fast'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("library", LIBS)
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), m=st.integers(1, 30), k=st.integers(1, 40), n=st.integers(1, 30),
       bias=st.sampled_from(["none", "row", "column", "full"]), transposed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_baddbmm_is_torch_baddbmm_at_fp32_rounding(library, b, m, k, n, bias, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, k, generator=g)
    y = torch.randn(b, n, k, generator=g).transpose(1, 2) if transposed else torch.randn(b, k, n, generator=g)
    shape = {"none": None, "row": (n,), "column": (b, m, 1), "full": (b, m, n)}[bias]
    c = None if shape is None else torch.randn(*shape, generator=g)
    ref = torch.bmm(x.double(), y.double()) + (0 if c is None else c.double())
    with gemm.use(library), torch.no_grad():
        out = gemm.baddbmm(c, x, y)
    assert out.shape == (b, m, n)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * (k ** 0.5), rtol=1e-5)
