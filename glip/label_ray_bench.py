"""Throughput of `glip label` on the local engine vs the Ray engine, same corpus, same machine, one run.

    python -m glip.label_ray_bench --pairs 96 --shard-size 12 --repeats 3

Writes a WebDataset corpus of the synthetic world's web pairs, then labels it `--repeats` times with each
engine setting in turn (interleaved, so drifting load on a shared machine hits each setting alike):
the local engine with `--threads` torch threads, Ray with 1 actor × `--threads` threads and with
`--threads` actors × 1 thread, and the local engine with 1 thread (one worker's rate alone). Pairs/s is timed from the first shard handed out to the last one
recorded (the model already loaded, as the local engine's own figure); Ray's start-up (joining or
starting Ray, then starting the actors and loading their models) is reported apart, and so is the
per-shard cost: the median gap between two shards on one worker (its result back to the driver, the
next shard out). Every output is compared byte for byte with the local engine's first one.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def make_corpus(folder: Path, pairs: int, shard_size: int, seed: int = 0) -> str:
    from glip.datasets import open_dataset
    from glip.datasets.webdataset import write_webdataset

    paths = write_webdataset(open_dataset(f"world:web:{seed}:{pairs}"), folder, shard_size=shard_size)
    return f"webdataset:{folder}/{{00000..{len(paths) - 1:05d}}}.tar"


def _odvg(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.jsonl"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glip.label_ray_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-teacher")
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="cores to use: local threads = actors × threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the raw figures here")
    a = p.parse_args(argv)

    import ray
    import torch

    from glip.label import label
    from glip.label_ray import RayConfig, label_ray
    from glip.model import GLIP

    work = Path(tempfile.mkdtemp(prefix="glip-label-bench-"))
    corpus = make_corpus(work / "corpus", a.pairs, a.shard_size)
    n = a.threads
    settings = dict(batch_size=a.batch_size)

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=n, include_dashboard=False, logging_level="warning",
             _node_ip_address="127.0.0.1")
    init_s = time.perf_counter() - t0

    torch.set_num_threads(n)
    model = GLIP.from_pretrained(a.model, device="cpu")
    engines = {f"local {n} threads": n, f"ray 1 actor x {n} threads": RayConfig(actors=1, threads_per_actor=n)}
    if n > 1:
        engines[f"ray {n} actors x 1 thread"] = RayConfig(actors=n, threads_per_actor=1)
        engines["local 1 thread"] = 1  # one worker's rate alone: what n single-thread actors can at best multiply
    engines[f"ray 1 actor x {n} threads, 1 shard in flight"] = RayConfig(actors=1, threads_per_actor=n,
                                                                         shards_per_actor=1)
    rows: dict[str, list[dict]] = {k: [] for k in engines}
    reference = None
    for rep in range(a.repeats):
        for name, cfg in engines.items():
            out = work / f"out-{rep}-{len(rows[name])}-{name.replace(' ', '_')}"
            if isinstance(cfg, int):
                torch.set_num_threads(cfg)
                model.predictor.clear_cache()  # a repeat would hit the predictor's caches (Ray's actors start fresh)
                s = label(model, corpus, out, model_name=a.model, progress=False, **settings)
            else:
                s = label_ray(a.model, corpus, out, config=cfg, model_name=a.model, progress=False, **settings)
            t = s["this_run"]
            row = {"pairs_per_s": t["pairs_per_s"], "seconds": t["seconds"]}
            if isinstance(cfg, RayConfig):
                row.update(startup_s=t["startup_s"], model_load_s=t["model_load_s"],
                           shard_gap_s=t["shard_gap_s"], busy=t["busy"])
            files = _odvg(out)
            reference = reference or files
            row["identical"] = files == reference
            rows[name].append(row)
            print(f"[{rep}] {name:44s} {json.dumps(row)}", flush=True)

    base = statistics.median(r["pairs_per_s"] for r in rows[next(iter(rows))])
    print(f"\n{a.pairs} pairs in {-(-a.pairs // a.shard_size)} shards of {a.shard_size}, batch {a.batch_size}, "
          f"{a.model}, {a.repeats} repeats (min / median); ray.init {init_s:.1f} s")
    print(f"{'engine':44s} {'pairs/s':>15s} {'vs local':>9s} {'start-up s':>14s} {'shard gap s':>16s} identical")
    for name, rs in rows.items():
        pps = [r["pairs_per_s"] for r in rs]
        line = f"{name:44s} {min(pps):6.2f} / {statistics.median(pps):6.2f} {statistics.median(pps) / base:9.2f}"
        if "startup_s" in rs[0]:
            su = [r["startup_s"] for r in rs]
            ov = [r["shard_gap_s"] for r in rs if r["shard_gap_s"] is not None]
            line += f" {min(su):5.1f} / {statistics.median(su):5.1f}"
            line += f" {min(ov):7.3f} / {statistics.median(ov):6.3f}" if ov else f" {'-':>16s}"
        else:
            line += f" {'-':>14s} {'-':>16s}"
        print(line + f" {all(r['identical'] for r in rs)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "ray_init_s": init_s, "rows": rows}, indent=1))
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
