"""Training throughput: one process against torchrun data-parallel ranks at the same global batch.

    python -m glip.train.bench --config teacher --steps 50 --out runs/bench      # toy teacher, this machine

Runs `python -m glip train` as subprocesses (1 process x T threads, 1 process x 1 thread, N gloo ranks x 1
thread; no data workers, no checkpoints or evaluations inside the timed steps) and reports, per variant, the
median and min seconds per step after `--warmup` steps, steps/s, the ratio to the single process and each
process's peak resident memory. Times come from the runs' own logs (`elapsed_s` per step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run_variant(name: str, launcher: list[str], args: list[str], out: Path, threads: int, env: dict) -> dict:
    run = out / name
    cmd = launcher + ["-m", "glip", "train", *args, "--out", str(run), "--no-progress", "--set", f"num_threads={threads}",
                      "--set", "num_workers=0", "--set", "eval_every=0", "--set", "ckpt_every=100000"]
    r = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return {"summary": json.loads((run / "summary.json").read_text()),
            "elapsed": [json.loads(line)["elapsed_s"] for line in (run / "log.jsonl").read_text().splitlines()
                        if '"elapsed_s"' in line]}


def step_stats(elapsed: list[float], warmup: int) -> dict:
    dt = [b - a for a, b in zip(elapsed[warmup:], elapsed[warmup + 1:])]
    med = statistics.median(dt)
    return {"median_s": round(med, 4), "min_s": round(min(dt), 4), "steps_per_s": round(1 / med, 3), "steps": len(dt)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glip.train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="teacher")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the single-process baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to every run")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    common = ["--config", a.config, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--device", "cpu",
              "--set", "max_minutes=1e9"] + [x for s in a.set for x in ("--set", s)]
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.ranks)]
    variants = [(f"1 process x {a.threads} threads", py, a.threads), ("1 process x 1 thread", py, 1),
                (f"{a.ranks} gloo ranks x 1 thread", torchrun, 1)]
    rows = []
    for i, (name, launcher, threads) in enumerate(variants):
        r = run_variant(f"v{i}", launcher, common, out, threads, env)
        s = step_stats(r["elapsed"], a.warmup)
        rows.append({"variant": name, **s, "peak_rss_mb_per_process": r["summary"]["peak_rss_mb"]})
    base = rows[0]["median_s"]
    for r in rows:
        r["speed_vs_first"] = round(base / r["median_s"], 3)
    report = {"config": a.config, "global_batch": a.batch_size, "steps": a.steps, "warmup": a.warmup,
              "cpus": os.cpu_count(), "rows": rows}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"{a.config}, global batch {a.batch_size}, {a.steps} steps ({a.warmup} warm-up), {os.cpu_count()} CPUs")
    print(f"{'variant':28s} {'median s/step':>13s} {'min':>7s} {'steps/s':>8s} {'vs first':>8s} {'peak RSS MB':>11s}")
    for r in rows:
        print(f"{r['variant']:28s} {r['median_s']:13.3f} {r['min_s']:7.3f} {r['steps_per_s']:8.3f} "
              f"{r['speed_vs_first']:8.2f} {r['peak_rss_mb_per_process']:11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
