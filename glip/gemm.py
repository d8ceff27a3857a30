"""The fp32 matrix products of CPU inference, and which library runs them.

torch's CPU `addmm` / `mm` call its BLAS (MKL in the x86 wheels). The same wheel carries oneDNN, whose JIT
kernels pick their instructions from what the CPU reports rather than from its vendor; on some x86 CPUs it
runs the same fp32 GEMM at about twice the BLAS rate (docs/performance.md, "Which library multiplies").
Inference's large products (every `Linear` of Swin, BERT and the head, the DCN's and the offset conv's GEMMs,
X-MHA's banded products) go through `linear`, which calls oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op torch's own
compiler emits for CPU linears) when `onednn_applies`: a CPU fp32 product with autograd and autocast off,
oneDNN built in, and the library not set to "blas". Both libraries multiply and sum in fp32; their sums run
in different orders, so values differ at fp32 rounding. Everything else (autograd, autocast, other devices)
is `F.linear`, unchanged.

`GLIP_CPU_GEMM=blas` (or `use("blas")`) keeps torch's BLAS for all of it, e.g. to compare the two; that is also
the default off x86-64, where oneDNN has not been measured.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

LIBRARIES = ("onednn", "blas")
ENV = "GLIP_CPU_GEMM"

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_PACK = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN_LINEAR is not None else None
# MKL's packed-weight GEMM (the op torch's frozen-graph linear uses): the BLAS library's way to pack a weight once
_MKL_LINEAR = getattr(torch.ops.mkl, "_mkl_linear", None) if torch.backends.mkl.is_available() else None
_MKL_PACK = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) if _MKL_LINEAR is not None else None


def _check(name: str) -> str:
    if name not in LIBRARIES:
        raise ConfigError(f"{ENV} must be one of {', '.join(LIBRARIES)}, not {name!r}")
    return name


# oneDNN by default on x86-64 only, where it was measured (docs/performance.md); elsewhere torch's own BLAS
_DEFAULT = "onednn" if platform.machine().lower() in ("x86_64", "amd64") else "blas"
_chosen = [os.environ.get(ENV, _DEFAULT).strip().lower() or _DEFAULT]


def library() -> str:
    """The library CPU fp32 inference multiplies with: "onednn" when chosen and built in, else "blas"."""
    return "onednn" if _check(_chosen[0]) == "onednn" and available("onednn") else "blas"


def available(name: str) -> bool:
    """Whether `name` can multiply here ("blas" always; "onednn" when built in)."""
    return _check(name) == "blas" or _ONEDNN_LINEAR is not None


@contextlib.contextmanager
def use(name: str):
    """Run the block's CPU fp32 inference products with `name` ("onednn" or "blas"); for this process."""
    saved = _chosen[0]
    _chosen[0] = _check(name)
    try:
        yield
    finally:
        _chosen[0] = saved


def _inference_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and x.shape[-1] > 0)  # oneDNN has no empty inner dimension


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs on oneDNN."""
    return _inference_fp32_cpu(x, weight) and library() == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weightᵀ + bias, as `F.linear` (x (…, K), weight (N, K))."""
    if onednn_applies(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU (exact, erf) of `linear`; on oneDNN as the GEMM's post-op, so the hidden layer is written once."""
    if onednn_applies(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none")
    return F.gelu(F.linear(x, weight, bias))


def baddbmm(bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """bias + x @ y per batch item, as `torch.baddbmm` (x (B, M, K), y (B, K, N), bias broadcast to (B, M, N));
    bias None: `torch.bmm`. On oneDNN one `linear` per batch item, with y's transpose as the weight."""
    if not onednn_applies(x, y):
        return torch.bmm(x, y) if bias is None else torch.baddbmm(bias, x, y)
    row = bias is not None and bias.dim() == 1  # one value per output column: linear's own bias
    out = [linear(x[b], y[b].transpose(0, 1), bias if row else None) for b in range(x.shape[0])]
    out = out[0][None] if len(out) == 1 else torch.stack(out)
    return out if row or bias is None else out.add_(bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint keys) whose inference product is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class PackedLinear:
    """A weight laid out once in its library's blocked format, for many products with it (a chunked GEMM).
    `rows`: the row count of most calls (the layout is tuned for it; any row count is correct). `weight`: the
    original (N, K), which MKL's packed GEMM also reads; None for oneDNN, which reads only its packed form."""
    weight: torch.Tensor | None
    packed: torch.Tensor
    rows: int
    library: str

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.library == "onednn":
            return _ONEDNN_LINEAR(x, self.packed, bias, "none", [], "")
        return _MKL_LINEAR(x, self.packed, self.weight, bias, self.rows)


def pack(weight: torch.Tensor, rows: int, like: torch.Tensor) -> PackedLinear | None:
    """`weight` (N, K) packed for CPU fp32 inference products with inputs like `like`, by the library in use;
    None where there is nothing to pack (autograd, autocast, another device or dtype, no such op)."""
    if not _inference_fp32_cpu(like, weight):
        return None
    if library() == "onednn" and _ONEDNN_PACK is not None:
        return PackedLinear(None, _ONEDNN_PACK(weight, rows), rows, "onednn")
    if library() == "blas" and _MKL_PACK is not None:
        return PackedLinear(weight, _MKL_PACK(weight, rows), rows, "blas")
    return None
