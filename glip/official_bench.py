"""`python -m glip.official_bench GLIP_SRC`: the official GLIP-T forward and this project's `predict`, timed in
one process, interleaved: the only comparison of the two that means anything on a shared machine.

GLIP_SRC is a checkout of microsoft/GLIP (measured at 9dda955). Both models get random weights (timing does not
depend on them), one 800×1333 image and the 10-name prompt of `glip.bench`; the official model reads the prompt
padded to 256 tokens, as it always does. Its two CUDA-only ops get CPU stand-ins, this project's own: the
modulated deformable conv (`glip.dyhead.deform_conv2d`, after the official kernel's offset re-interpretation)
and NMS (`glip.boxes`), so the comparison measures everything else (the stand-in DCN multiplies with the
library this project's inference uses, `glip.gemm`; the official code's own products run on torch's defaults).
This project's predict is timed a second time with torch's BLAS for every product (`GLIP_CPU_GEMM=blas`).
The official code predates the torch, transformers and numpy installed here; `_install_shims` supplies what it imports that they no longer have
(and empty modules for the packages only its other backbones and datasets use). The shims change this process
only; run it as its own command, never from a library.
"""
from __future__ import annotations

import argparse
import collections.abc
import importlib.abc
import importlib.machinery
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import gemm
from .bench import NAMES, count_flops
from .boxes import batched_nms, nms
from .config import get_preset
from .dyhead import deform_conv2d, reinterpret
from .errors import GLIPError
from .model import GLIP
from .prompts import from_categories, get_tokenizer

CONFIG = "configs/pretrain/glip_Swin_T_O365_GoldG.yaml"  # GLIP-T's architecture (the (C) and full models share it)
ABSENT = ("cv2", "torchvision", "einops", "prettytable", "ftfy")  # imported by official files this forward never runs


class _Absent(types.ModuleType):
    """An importable stand-in for a package that is not installed: any attribute is another stand-in (a
    capitalised one a class, so that official modules can subclass it at import time)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return type(name, (), {"__init__": lambda self, *a, **k: None})
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Absent("call")


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] in self.roots else None

    def create_module(self, spec):
        m = _Absent(spec.name)
        m.__path__, m.__spec__ = [], spec
        return m

    def exec_module(self, module):
        pass


class _DropPath(torch.nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x  # evaluation only


def _modulated_deform_conv(input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                           deformable_groups=1):
    if groups != 1 or deformable_groups != 1:
        raise NotImplementedError("groups / deformable groups")
    k = weight.shape[-1]
    Ho = (input.shape[-2] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (input.shape[-1] + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return deform_conv2d(input, reinterpret(offset, Ho, Wo), reinterpret(mask, Ho, Wo), weight, bias, stride, padding,
                         dilation, use_torchvision=False)


def _install_shims(src: Path) -> None:
    import transformers
    import transformers.modeling_utils as mu

    sys.path.insert(0, str(src))
    sys.meta_path.insert(0, _AbsentFinder(ABSENT))
    np.float, np.int = float, int  # numpy aliases removed in 1.24
    six = types.ModuleType("torch._six")  # removed from torch 2
    six.string_classes, six.int_classes, six.container_abcs, six.inf = str, int, collections.abc, math.inf
    six.PY3 = six.PY37 = True
    sys.modules["torch._six"] = torch._six = six
    if not hasattr(mu, "apply_chunking_to_forward"):  # moved out of modeling_utils in transformers 5
        def apply_chunking_to_forward(forward_fn, chunk_size, chunk_dim, *inputs):
            if chunk_size:
                raise NotImplementedError("chunked feed-forward")
            return forward_fn(*inputs)
        mu.apply_chunking_to_forward = apply_chunking_to_forward
    for name in ("find_pruneable_heads_and_indices", "prune_linear_layer"):  # only used to prune heads
        if not hasattr(mu, name):
            setattr(mu, name, None)
    layers = types.ModuleType("timm.models.layers")  # timm needs torchvision; the official code uses 3 helpers
    layers.DropPath, layers.trunc_normal_ = _DropPath, torch.nn.init.trunc_normal_
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                        "timm.models.layers": layers})
    # no model hub: bert-base-uncased's architecture with random weights, and its vocabulary (shipped here)
    transformers.BertConfig.from_pretrained = classmethod(lambda cls, *a, **k: transformers.BertConfig())
    transformers.BertModel.from_pretrained = classmethod(
        lambda cls, name, add_pooling_layer=True, config=None, **k: cls(config, add_pooling_layer=add_pooling_layer))
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: get_tokenizer())
    type(get_tokenizer()).batch_encode_plus = lambda self, texts, **kw: self(texts, **kw)  # removed in transformers 5
    ext = types.ModuleType("maskrcnn_benchmark._C")  # the compiled extension: CPU stand-ins
    ext.nms = lambda boxes, scores, thr: nms(boxes, scores, thr)
    ext.ml_nms = lambda boxes, scores, labels, thr: batched_nms(boxes, scores, labels, thr)
    ext.soft_nms = None
    sys.modules["maskrcnn_benchmark._C"] = ext
    import maskrcnn_benchmark
    maskrcnn_benchmark._C = ext
    import maskrcnn_benchmark.layers.deform_conv as dc
    dc.modulated_deform_conv = _modulated_deform_conv
    import maskrcnn_benchmark.modeling.rpn.vldyhead as vld  # transformers 4's mask helper, gone from 5's base class
    vld.BertEncoderLayer.get_extended_attention_mask = (
        lambda self, mask, shape, device=None: (1.0 - mask[:, None, None, :].float()) * -10000.0)


def build_official(src: Path):
    if not (src / "maskrcnn_benchmark").is_dir() or not (src / CONFIG).is_file():
        raise GLIPError(f"{src} is not a microsoft/GLIP checkout (no maskrcnn_benchmark/ or {CONFIG})")
    try:
        import yacs  # noqa: F401  (the official config system; not a dependency of this project)
    except ImportError:
        raise GLIPError("the official code needs yacs: pip install yacs") from None
    _install_shims(src)
    from maskrcnn_benchmark.config import cfg
    from maskrcnn_benchmark.modeling.detector import build_detection_model

    cfg.merge_from_file(str(src / CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.DYHEAD.USE_CHECKPOINT", False,
                         "MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT", False, "MODEL.BACKBONE.USE_CHECKPOINT", False])
    cfg.freeze()
    model = build_detection_model(cfg)
    model.eval()  # (its train() override returns None, so not chained)
    return model


def run(src: Path, runs: int = 3, flops: bool = False) -> dict:
    torch.manual_seed(0)
    official = build_official(src)
    from maskrcnn_benchmark.structures.image_list import to_image_list

    ours = GLIP(get_preset("glip-t")).eval()
    image = np.random.default_rng(0).integers(0, 255, (800, 1333, 3), dtype=np.uint8)
    caption = from_categories(NAMES).caption
    x = ours.predictor.prepare_image(image, min_size=800, max_size=1333).tensor[None]
    x = F.pad(x, (0, -x.shape[-1] % 32, 0, -x.shape[-2] % 32))  # the official size divisibility

    def run_official():
        with torch.no_grad():
            official(to_image_list(x), captions=[caption], positive_map={})

    def run_ours():
        ours.predictor.clear_cache()
        ours.predictor.predict(image, NAMES, min_size=800, max_size=1333)

    def run_ours_blas():  # the same with torch's BLAS for every product (`glip.gemm`)
        with gemm.use("blas"):
            run_ours()

    out = dict(threads=torch.get_num_threads(), runs=runs, input=list(x.shape), gemm_library=gemm.library())
    if flops:
        out.update(official_gflop=count_flops(run_official) / 1e9, ours_gflop=count_flops(run_ours) / 1e9)
    timed = {"official": run_official, "ours": run_ours}
    if gemm.library() != "blas":
        timed["ours_blas"] = run_ours_blas
    for fn in timed.values():  # warm-up
        fn()
    times = {k: [] for k in timed}
    for _ in range(runs):
        for k, fn in timed.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        out.update({f"{k}_s": ts, f"{k}_min_s": min(ts), f"{k}_median_s": statistics.median(ts)})
    out["speedup"] = min(times["official"]) / min(times["ours"])
    if "ours_blas" in times:
        out["speedup_blas"] = min(times["official"]) / min(times["ours_blas"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glip.official_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a microsoft/GLIP checkout")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flops", action="store_true", help="also count both forwards' FLOPs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    try:
        res = run(args.src, args.runs, args.flops)
    except GLIPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
        return 0
    if args.flops:
        print(f"FLOPs: official {res['official_gflop']:.1f} GFLOP, this project {res['ours_gflop']:.1f} GFLOP")
    print(f"official forward: min {res['official_min_s']:.2f} s, median {res['official_median_s']:.2f} s; "
          f"this project's predict: min {res['ours_min_s']:.2f} s, median {res['ours_median_s']:.2f} s; "
          f"official / this (min): {res['speedup']:.2f}x ({res['threads']} threads, {args.runs} interleaved runs, "
          f"products on {res['gemm_library']})")
    if "speedup_blas" in res:
        print(f"this project's predict with torch's BLAS for every product (GLIP_CPU_GEMM=blas): "
              f"min {res['ours_blas_min_s']:.2f} s, median {res['ours_blas_median_s']:.2f} s; "
              f"official / this (min): {res['speedup_blas']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
