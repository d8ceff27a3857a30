"""`python -m glip.device_check --out DIR`: every accelerator figure this project reports, in one run.

    python -m glip.device_check --out "$OUT"                                    # on a machine with a GPU
    python -m glip.device_check --out /tmp/dc --device cpu --preset toy --small   # the same steps, small

Steps, in this order; each is independent (one that fails is recorded with its one-line error and the
rest still run) and writes its own file as soon as it ends, so a run cut short by a time limit keeps what
it had measured; a step that would start after `--budget-s` is recorded as skipped:
  env               torch and CUDA versions, the device's name and memory
  parity            the parity fixture recomputed on the device (TF32 off), as `python -m glip parity`
  bench-P           `bench` at 800×1333 with the 10-name prompt, precision P (fp32, bf16): every stage
  profile-P         one fresh `predict` under torch.profiler: kernels by device time, kernel launches
  label-P-bN        labelling throughput of the preset (random weights, a released checkpoint's cost) at
                    precision P and batch N, on generated WebDataset shards of photo-sized JPEGs with
                    captions; also the read-only rate (the input pipeline's bound) and, once per
                    precision, `predict` one pair at a time
summary.json and summary.md: every figure, set against the goals (`predict` < 40 ms at 800×1333,
batched labelling ≥ 50 images/s at batch 8–32).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .datasets.writers import atomic_write_text
from .runtime import resolve_device

GOAL_PREDICT_S = 0.040
GOAL_IMAGES_PER_S = 50.0
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "glip-official-tiny"
CAPTIONS = [
    "a man riding a bicycle past a red car on a city street",
    "two dogs playing with a ball on the grass next to a wooden bench",
    "a cat sleeping on a chair beside a potted plant and a window",
    "a woman holding a cup of coffee at a table with a laptop",
    "a bus and a truck waiting at a traffic light in the rain",
    "a bottle of wine and two glasses on a kitchen counter",
    "children flying a kite on a beach near the sea",
    "a horse standing in a field in front of a barn",
]


def make_shards(out_dir: Path, n: int, size: tuple[int, int] = (480, 640), per_shard: int = 64, seed: int = 0) -> str:
    """`n` image–caption pairs as WebDataset shards: smooth random JPEGs of `size` (h, w) at quality 90,
    about the bytes and decode time of a web photo, with captions cycling through `CAPTIONS`.
    Returns the `webdataset:` spec of the folder."""
    from PIL import Image

    from .datasets.records import Record
    from .datasets.webdataset import write_webdataset

    rng = np.random.default_rng(seed)
    h, w = size

    def record(i: int) -> Record:
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        return Record(key=f"{i:06d}", file_name=f"{i:06d}.jpg", image=buf.getvalue(), caption=CAPTIONS[i % len(CAPTIONS)],
                      width=w, height=h)

    write_webdataset((record(i) for i in range(n)), out_dir, shard_size=per_shard)
    return f"webdataset:{out_dir}"


def step_env(dev: torch.device) -> dict:
    from .dyhead import _tv_deform_conv2d

    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(dev),
                cpu_threads=torch.get_num_threads(), torchvision_dcn=_tv_deform_conv2d is not None)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(cuda=torch.version.cuda, name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}")
    return info


def step_parity(dev: torch.device, fixture: Path, out: Path) -> dict:
    from .parity import run_parity

    rep = run_parity(fixture, device=str(dev))
    atomic_write_text(out / "parity.txt", rep.table() + "\n")
    worst = max(rep.rows, key=lambda r: r.max_abs) if rep.rows else None
    return dict(ok=rep.ok, stages=len(rep.rows), failed=[r.name for r in rep.rows if not r.ok],
                worst=worst.name if worst else None, worst_abs=worst.max_abs if worst else None)


def step_bench(dev: torch.device, model, precision: str, hw: tuple[int, int], runs: int, out: Path) -> dict:
    from .bench import format_result, run_bench

    res = run_bench(model.config.name, hw[0], hw[1], runs=runs, device=str(dev), precision=precision, model=model)
    atomic_write_text(out / f"bench-{precision}.json", json.dumps(res.to_json(), indent=1))
    atomic_write_text(out / f"bench-{precision}.txt", format_result(res) + "\n")
    rows = {r.key: dict(min_s=r.min_s, median_s=r.median_s, gflop=r.gflop, over_floor=r.over_floor) for r in res.rows}
    return dict(gemm_gflops=res.meta["gemm_gflops"], rows=rows,
                predict_goal_met=rows["predict"]["min_s"] < GOAL_PREDICT_S)


def step_profile(dev: torch.device, model, precision: str, hw: tuple[int, int], out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .bench import NAMES

    image = np.random.default_rng(0).integers(0, 255, (hw[0], hw[1], 3), dtype=np.uint8)
    kw = dict(min_size=min(hw), max_size=max(hw), precision=precision)
    model.predictor.predict(image, NAMES, **kw)  # warm-up
    model.predictor.clear_cache()
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        model.predictor.predict(image, NAMES, **kw)
        if cuda:
            torch.cuda.synchronize(dev)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    atomic_write_text(out / f"profile-{precision}.txt", prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    events = prof.events()
    kernels = [e for e in events if cuda and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    ops = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU
           and e.name.startswith("aten::")]
    return dict(kernel_launches=len(kernels), aten_ops=len(ops),
                device_time_ms=round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3, 2) if kernels else None)


def step_label(model, precision: str, batch: int, data: str, repeats: int, baseline: bool, out: Path) -> dict:
    from .datasets import open_dataset
    from .label import LabelSettings
    from .label_bench import run

    settings = LabelSettings(batch_size=batch, precision=precision).validate()
    records = list(open_dataset(data))
    modes = ("read only", "batch, background") + (("predict one by one",) if baseline else ())
    rows = run(model, records, settings, repeats, modes=modes)
    atomic_write_text(out / f"label-{precision}-b{batch}.json", json.dumps(rows, indent=1))
    by = {r["mode"]: r for r in rows}
    rate = by["batch, background"]["pairs_per_s"]
    return dict(pairs=len(records), images_per_s=rate, read_only_per_s=by["read only"]["pairs_per_s"],
                one_by_one_per_s=by.get("predict one by one", {}).get("pairs_per_s"),
                goal_met=rate >= GOAL_IMAGES_PER_S)


def run_check(out: Path, device: str = "cuda", preset: str = "glip-t", precisions=("fp32", "bf16"),
              batches=(8, 16, 32), hw=(800, 1333), runs: int = 10, pairs: int = 256, repeats: int = 2,
              fixture: Path = FIXTURE, budget_s: float = 420.0, only: tuple[str, ...] = ()) -> dict:
    """Run every step (or those whose names start with one of `only`), writing each one's files into
    `out` and the summary after each step."""
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    summary: dict = {"goals": {"predict_s": GOAL_PREDICT_S, "images_per_s": GOAL_IMAGES_PER_S}, "steps": {}}
    built: list = []

    def model():  # one model (random weights, seeded) for every step that needs one, built when first needed
        if not built:
            from .config import get_preset
            from .model import GLIP

            torch.manual_seed(0)
            built.append(GLIP(get_preset(preset)).eval().to(dev))
        return built[0]

    steps = [("env", lambda: step_env(dev)), ("parity", lambda: step_parity(dev, fixture, out))]
    steps += [(f"bench-{p}", lambda p=p: step_bench(dev, model(), p, hw, runs, out)) for p in precisions]
    steps += [(f"profile-{p}", lambda p=p: step_profile(dev, model(), p, hw, out)) for p in precisions]
    scratch = tempfile.TemporaryDirectory(prefix="glip-device-check-")  # the shards stay out of `out`
    data: list[str] = []

    def shards() -> dict:
        data.append(make_shards(Path(scratch.name), pairs))
        return dict(pairs=pairs)

    def label(p: str, b: int, baseline: bool) -> dict:
        if not data:
            raise RuntimeError("no shards to label (the shards step did not run)")
        return step_label(model(), p, b, data[0], repeats, baseline, out)

    steps.append(("shards", shards))
    steps += [(f"label-{p}-b{b}", lambda p=p, b=b, i=i: label(p, b, i == 0)) for p in precisions for i, b in enumerate(batches)]
    if only:
        wanted = lambda n: any(n.startswith(o) for o in only)  # noqa: E731
        steps = [(n, f) for n, f in steps if wanted(n) or (n == "shards" and any(wanted(m) for m, _ in steps if m.startswith("label-")))]
    for name, fn in steps:
        elapsed = time.perf_counter() - t0
        if elapsed > budget_s:
            summary["steps"][name] = dict(status="skipped", reason=f"time budget ({budget_s:.0f} s) spent")
        else:
            t = time.perf_counter()
            try:
                summary["steps"][name] = dict(status="ok", **fn())
            except Exception as e:  # noqa: BLE001 - one step's failure must not cost the others' figures
                summary["steps"][name] = dict(status="failed", error=f"{e.__class__.__name__}: {e}".splitlines()[0])
                atomic_write_text(out / f"{name}.error.txt", traceback.format_exc())
            summary["steps"][name]["seconds"] = round(time.perf_counter() - t, 1)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        _write_summary(out, summary)
    scratch.cleanup()
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "summary.md", format_summary(summary))


def format_summary(summary: dict) -> str:
    lines = ["| step | status | figures |", "|---|---|---|"]
    for name, s in summary["steps"].items():
        if s["status"] != "ok":
            figs = s.get("error") or s.get("reason", "")
        elif name.startswith("bench-"):
            r = s["rows"]
            figs = (f"predict {r['predict']['min_s'] * 1e3:.1f} ms (median {r['predict']['median_s'] * 1e3:.1f}), "
                    f"backbone {r['backbone']['min_s'] * 1e3:.1f} ms, cropped head {r['head_cropped']['min_s'] * 1e3:.1f} ms, "
                    f"new prompt {r['new_prompt']['min_s'] * 1e3:.1f} ms; goal < {GOAL_PREDICT_S * 1e3:.0f} ms: "
                    f"{'met' if s['predict_goal_met'] else 'not met'}")
        elif name.startswith("label-"):
            figs = (f"{s['images_per_s']:.1f} images/s batched, read only {s['read_only_per_s']:.1f}/s"
                    + (f", one by one {s['one_by_one_per_s']:.1f}/s" if s.get("one_by_one_per_s") else "")
                    + f"; goal ≥ {GOAL_IMAGES_PER_S:.0f}: {'met' if s['goal_met'] else 'not met'}")
        else:
            figs = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("status", "seconds", "rows"))
        lines.append(f"| {name} | {s['status']} ({s.get('seconds', 0)} s) | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from .cli_args import Parser, run_command

    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for every step's files and summary.{json,md}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="glip-t")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no step after this many seconds")
    ap.add_argument("--fixture", type=Path, default=FIXTURE, help="parity fixture folder")
    ap.add_argument("--only", default="", help="comma-separated step names or prefixes, e.g. bench,label-bf16")
    ap.add_argument("--small", action="store_true",
                    help="a smoke run: 160×224 input, 2 bench runs, 16 pairs, batch 4 and 8, one repeat")
    return run_command(_main, ap.parse_args(argv))


def _main(a) -> None:
    from .datasets.writers import check_writable

    out = check_writable(a.out)
    kw = dict(hw=(160, 224), runs=2, pairs=16, batches=(4, 8), repeats=1) if a.small else {}
    only = tuple(o.strip() for o in a.only.split(",") if o.strip())
    summary = run_check(out, a.device, a.preset, fixture=a.fixture, budget_s=a.budget_s, only=only, **kw)
    print(format_summary(summary), end="")


if __name__ == "__main__":
    raise SystemExit(main())
