"""`python -m glip bench`: where the time goes, stage by stage, against what the machine can do.

Random weights (timing does not depend on them), a synthetic image (800×1333 by default), a
10-name prompt. For every stage: min / median seconds over `runs` repetitions, the FLOPs it
executes (counted by `torch.utils.flop_counter`, matrix products and convolutions), and its floor:
those FLOPs at the dense GEMM rate of this machine, measured in the same process (a 2048³
matmul, best of a few; on the CPU in fp32 the faster of torch's BLAS and oneDNN, whichever one
inference uses, see `glip.gemm`). time ÷ floor says how far a stage is from its compute bound. Compare
versions within one run or by `--compare` against a JSON written on the same machine, never
across machines.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils import flop_counter

from . import gemm
from .config import get_preset
from .model import GLIP
from .postprocess import atss_postprocess
from .predictor import _autocast
from .prompts import from_categories, positive_map, tokenize

NAMES = ["person", "bicycle", "car", "dog", "cat", "traffic light", "chair", "cup", "bottle", "potted plant"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    key: str              # stable id (what --compare matches on)
    name: str
    min_s: float
    median_s: float
    gflop: float          # as executed, counted
    floor_s: float        # gflop at the measured GEMM rate

    @property
    def over_floor(self) -> float:
        return self.min_s / self.floor_s if self.floor_s > 0 else float("nan")


@dataclass
class BenchResult:
    meta: dict
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": [dict(asdict(r), over_floor=r.over_floor) for r in self.rows]}

    @classmethod
    def from_json(cls, d: dict) -> "BenchResult":
        fields = {f for f in Row.__dataclass_fields__}
        return cls(d["meta"], [Row(**{k: v for k, v in r.items() if k in fields}) for r in d["rows"]])


# The CPU flash-attention kernel (Swin's window attention) has no formula in torch's FLOP counter.
_SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _SDPA_CPU is not None and _SDPA_CPU not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_SDPA_CPU)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# The linears `glip.gemm` calls instead of addmm in fp32 CPU inference: input (…, K) times a weight (N, K)ᵀ
# (MKL's packed GEMM receives the packed and the original weight; oneDNN's a dense or a packed weight, (N, K) either way).
if gemm._MKL_LINEAR is not None and gemm._MKL_LINEAR not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(gemm._MKL_LINEAR)
    def _mkl_linear_flop(input_shape, packed_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]

if gemm._ONEDNN_LINEAR is not None and gemm._ONEDNN_LINEAR not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(gemm._ONEDNN_LINEAR)
    def _onednn_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matrix products, convolutions, attention), as executed."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, tries: int = 5,
              library: str | None = None) -> float:
    """Dense matmul FLOP/s of this machine now (n³, best of `tries`). On the CPU in fp32, `library` ("blas" or
    "onednn", see `glip.gemm`) picks who multiplies; by default the one inference uses."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = _sync(device)
    with gemm.use(library or gemm.library()), torch.no_grad():
        gemm.linear(a, b)
        best = float("inf")
        for _ in range(tries):
            sync()
            t = time.perf_counter()
            gemm.linear(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def gemm_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """`gemm_rate` of every library that multiplies on this device and dtype (one entry off the CPU's fp32)."""
    if device.type != "cpu" or dtype != torch.float32:
        return {"default": gemm_rate(device, dtype)}
    return {lib: gemm_rate(device, dtype, library=lib) for lib in gemm.LIBRARIES if gemm.available(lib)}


def _sync(dev: torch.device):
    return (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)


def _time(fn, runs: int, sync) -> tuple[float, float]:
    ts = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def run_bench(preset: str = "glip-t", height: int = 800, width: int = 1333, runs: int = 3, device: str | None = None,
              precision: str = "fp32", model: GLIP | None = None, sizes: tuple[int, ...] = ()) -> BenchResult:
    """Every stage timed (min / median of `runs`), counted and set against the measured GEMM rate.
    `sizes`: extra rows, `predict` with the shorter side resized to each size (the app's input sizes)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    label = preset if model is None else model.config.name
    model = (model or GLIP(get_preset(preset))).eval().to(dev)
    cfg = model.config
    sync = _sync(dev)
    dtype = DTYPES.get(precision, torch.float32)
    rates = gemm_rates(dev, dtype)
    rate = max(rates.values())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    prompt = from_categories(NAMES)
    enc = tokenize(prompt.caption, max_len=cfg.max_query_len)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    pmap = positive_map(prompt, max_len=cfg.max_query_len)
    pred = model.predictor
    entry = pred.prepare_image(image, min_size=min(height, width), max_size=max(height, width))
    x = entry.tensor[None].to(dev)
    x = torch.nn.functional.pad(x, (0, -x.shape[-1] % 32, 0, -x.shape[-2] % 32))
    staged: list[tuple[str, str, object]] = []  # (key, name, fn)
    with torch.no_grad(), _autocast(dev, precision):
        feats = model.encode_image(x)
        text = model.encode_text(ids, mask)
        n = int(mask.sum())
        text_c = model.encode_text(ids[:, :n], mask[:, :n])
        head = model.ground(feats, text)
        anchors = model.anchors(feats)
    staged += [
        ("backbone", "backbone (Swin + FPN)", lambda: model.encode_image(x)),
        ("language", f"language (BERT, {ids.shape[1]} tokens)", lambda: model.encode_text(ids, mask)),
        ("head_full", f"head (DyHead + S_ground, {ids.shape[1]} tokens)", lambda: model.ground(feats, text)),
        ("head_cropped", f"head, text cropped to the prompt ({n} tokens)", lambda: model.ground(feats, text_c)),
        ("post", "post-processing (ATSS + NMS)",
         lambda: atss_postprocess([t[0] for t in head.token_logits], [t[0] for t in head.bbox_reg],
                                  [t[0] for t in head.centerness], anchors, pmap, entry.hw, model.box_coder)),
    ]
    rows = []
    for key, name, fn in staged:
        def call(fn=fn):
            with torch.no_grad(), _autocast(dev, precision):
                fn()
        rows.append(_row(key, name, call, runs, sync, rate))

    kw = dict(min_size=min(height, width), max_size=max(height, width), precision=precision)

    def fresh():
        pred.clear_cache()
        pred.predict(image, NAMES, **kw)

    def new_prompt():
        pred.clear_cache(image=False)  # keep the image features
        pred.predict(image, NAMES[::-1], **kw)

    image2 = image[::-1].copy()

    def new_image():
        pred.clear_cache(text=False)  # keep the text features
        pred.predict(image2, NAMES, **kw)

    def rethreshold():
        pred.predict(image, NAMES, threshold=0.3, **kw)

    rows.append(_row("predict", "predict, nothing cached", fresh, runs, sync, rate))
    pred.predict(image, NAMES, **kw)
    rows.append(_row("new_prompt", "predict, same image / new prompt", new_prompt, runs, sync, rate))
    rows.append(_row("new_image", "predict, same prompt / new image", new_image, runs, sync, rate))
    pred.predict(image, NAMES, **kw)
    rows.append(_row("rethreshold", "predict, re-threshold (cached head)", rethreshold, runs, sync, rate))
    for s in sizes:
        size_kw = dict(kw, min_size=s, max_size=round(s * max(height, width) / min(height, width)))

        def at_size(size_kw=size_kw):
            pred.clear_cache()
            pred.predict(image, NAMES, **size_kw)
        h, w = pred.prepare_image(image, size_kw["min_size"], size_kw["max_size"]).hw
        rows.append(_row(f"predict_{s}", f"predict at {h}×{w}, nothing cached", at_size, runs, sync, rate))
    again = gemm_rates(dev, dtype)  # the floor: the best library's rate, at the better of both ends of the run
    rates = {k: max(v, again[k]) for k, v in rates.items()}
    rate = max(rates.values())
    for r in rows:
        r.floor_s = r.gflop * 1e9 / rate
    meta = dict(preset=label, height=height, width=width, runs=runs,
                device=str(dev), threads=torch.get_num_threads(), precision=precision, torch=torch.__version__,
                gemm_gflops=rate / 1e9, gemm_gflops_by_library={k: v / 1e9 for k, v in rates.items()},
                gemm_library="default" if "default" in rates else gemm.library(),
                tokens=int(ids.shape[1]), prompt_tokens=n)
    return BenchResult(meta, rows)


def _row(key, name, fn, runs, sync, rate) -> Row:
    flops = count_flops(fn)  # also the warm-up (first-call allocations, kernel selection)
    mn, md = _time(fn, runs, sync)
    return Row(key, name, mn, md, flops / 1e9, flops / rate)


def fresh_peak_rss_mb(preset: str = "glip-t", height: int = 800, width: int = 1333, precision: str = "fp32") -> dict:
    """Peak resident memory, in MB, of a fresh process that loads the model from an official-layout .pth (random
    weights, written to a temporary folder first: what a user's process does with a released checkpoint), then
    predicts once to warm up and once more with nothing cached: {"load": after the load, "predict": at the end}.
    Each is the process's own high-water mark (VmHWM), not ru_maxrss, which Linux carries over from the parent
    at fork + exec, so a large parent (this benchmark) would be measured."""
    with tempfile.TemporaryDirectory(prefix="glip-bench-") as tmp:
        path = Path(tmp) / f"{preset}.pth"
        torch.manual_seed(0)
        model = GLIP(get_preset(preset))
        torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
        del model
        code = (
            "import numpy as np\n"
            "from glip import GLIP\n"
            "from glip.bench import NAMES\n"
            "from glip.runtime import peak_rss_mb\n"
            f"m = GLIP.from_pretrained({str(path)!r}, config={preset!r}, device='cpu')\n"
            "load = peak_rss_mb()\n"
            f"img = np.random.default_rng(0).integers(0, 255, ({height}, {width}, 3), dtype=np.uint8)\n"
            f"kw = dict(min_size={min(height, width)}, max_size={max(height, width)}, precision={precision!r})\n"
            "m.predict(img, NAMES, **kw); m.predictor.clear_cache(); m.predict(img, NAMES, **kw)\n"
            "print(load, peak_rss_mb())\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    load, predict = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return {"load": load, "predict": predict}


def format_result(res: BenchResult, title: str | None = None) -> str:
    m = res.meta
    title = title or (f"{m['preset']} {m['height']}x{m['width']} on {m['device']} ({m['threads']} threads), "
                      f"{m['precision']}, {m['runs']} runs; dense GEMM {m['gemm_gflops']:.0f} GFLOP/s{_libraries(m)}")
    out = [title, f"{'stage':44s} {'min s':>8s} {'median s':>8s} {'GFLOP':>8s} {'floor s':>8s} {'÷ floor':>7s}"]
    out += [f"{r.name:44s} {r.min_s:8.3f} {r.median_s:8.3f} {r.gflop:8.1f} {r.floor_s:8.3f} {_ratio(r):>7s}"
            for r in res.rows]
    if "peak_rss_mb" in m:
        load = f"load from a .pth {m['load_peak_rss_mb']:.0f} MB, then " if "load_peak_rss_mb" in m else ""
        out.append(f"peak RSS of a fresh process: {load}warm-up + 1 predict {m['peak_rss_mb']:.0f} MB")
    return "\n".join(out)


def format_compare(new: BenchResult, ref: BenchResult) -> str:
    """Speed-up of `new` over `ref` per stage (ref time ÷ new time), FLOPs ratio, and the change of time ÷ floor
    (which discounts a change of the machine's GEMM rate between the two runs)."""
    by_key = {r.key: r for r in ref.rows}
    out = [f"against {ref.meta.get('preset')} {ref.meta.get('height')}x{ref.meta.get('width')} "
           f"(GEMM {ref.meta.get('gemm_gflops', float('nan')):.0f} GFLOP/s then, {new.meta['gemm_gflops']:.0f} now)",
           f"{'stage':44s} {'ref s':>8s} {'new s':>8s} {'speed-up':>8s} {'FLOP new/ref':>12s} {'÷floor ref→new':>15s}"]
    for r in new.rows:
        o = by_key.get(r.key)
        if o is None:
            continue
        flop = f"{r.gflop / o.gflop:12.2f}" if o.gflop else f"{'-':>12s}"
        out.append(f"{r.name:44s} {o.min_s:8.3f} {r.min_s:8.3f} {speedup(o, r):7.2f}x {flop} {_ratio(o):>7s} → {_ratio(r):>5s}")
    return "\n".join(out)


def _libraries(meta: dict) -> str:
    """" (inference on oneDNN; blas 180, onednn 410 GFLOP/s)" when the run measured more than one library."""
    rates = meta.get("gemm_gflops_by_library") or {}
    if len(rates) < 2:
        return ""
    each = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
    return f" (inference on {meta.get('gemm_library')}; {each} GFLOP/s)"


def _ratio(r: Row) -> str:
    return f"{r.over_floor:.2f}" if r.floor_s >= 1e-3 else "-"  # no floor to speak of (post-processing)


def speedup(ref: Row, new: Row) -> float:
    return ref.min_s / new.min_s if new.min_s > 0 else float("nan")


def load_result(path) -> BenchResult:
    with open(path) as f:
        return BenchResult.from_json(json.load(f))
