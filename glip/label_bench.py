"""`python -m glip.label_bench`: labelling throughput, measured in one run against its baselines.

    python -m glip.label_bench --model toy-teacher --data world:web:0:64 --threads 2 --repeats 3
    python -m glip.label_bench --model glip-t --data webdataset:SHARDS --device cuda --precision bf16 --batch-size 16

Modes, on the same pairs (predictor caches cleared before every run):
  read only          prepare every pair (decode / render, resize for the model, noun phrases) and nothing else
  predict one by one prepare a pair, then model.predict on it alone (the loop a script would write)
  batch, foreground  `label_shard` with `batch_size` pairs per padded batch, reading between batches
  batch, background  the same with the reading in a background worker (what `glip label` runs)
Prints min and median seconds over `repeats` and pairs/s of the median; compare within one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def run(model, records, settings, repeats: int, modes: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of every mode (or those named in `modes`), interleaved `repeats` times."""
    from .label import image_preparer, label_shard, prepare

    ready = image_preparer(model)

    def read_only():
        for r in records:
            prepare(r, settings, ready)

    def one_by_one():
        for r in records:
            it = prepare(r, settings, ready)
            if not isinstance(it, dict):
                model.predict(it.image, it.scoring, threshold=settings.threshold, precision=settings.precision)

    every = {"read only": read_only, "predict one by one": one_by_one,
             "batch, foreground": lambda: label_shard(model, records, settings, prefetch=0),
             "batch, background": lambda: label_shard(model, records, settings, prefetch=32)}
    modes = {name: every[name] for name in (modes or every)}
    label_shard(model, records[: settings.batch_size], settings)  # warm-up (tagger, tokenizer, allocator)
    times = {name: [] for name in modes}
    for _ in range(repeats):  # interleaved, so that load changes hit every mode alike
        for name, fn in modes.items():
            model.predictor.clear_cache()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["predict one by one"]) if "predict one by one" in times else None
    return [{"mode": name, "min_s": round(min(ts), 2), "median_s": round(statistics.median(ts), 2),
             "pairs_per_s": round(len(records) / statistics.median(ts), 2),
             "speed-up vs one by one": round(base / statistics.median(ts), 2) if base else None}
            for name, ts in times.items()]


def main(argv=None) -> int:
    from .cli_args import Parser, device, run_command

    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-teacher")
    ap.add_argument("--data", default="world:web:0:64")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-words", default="all")
    ap.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    return run_command(_bench, ap.parse_args(argv))


def _bench(a) -> None:
    from .datasets import open_dataset
    from .label import LabelSettings, resolve_score_words
    from .model import GLIP

    torch.set_num_threads(a.threads)
    model = GLIP.from_pretrained(a.model, device=a.device)
    settings = LabelSettings(batch_size=a.batch_size, score_words=resolve_score_words(a.score_words, a.model),
                             precision=a.precision).validate()
    records = list(open_dataset(a.data))
    rows = run(model, records, settings, a.repeats)
    print(f"{a.model} on {a.data} ({len(records)} pairs) on {a.device}, {a.precision}, batch {a.batch_size}, "
          f"{a.threads} threads, {a.repeats} runs")
    for r in rows:
        print(f"  {r['mode']:20s} min {r['min_s']:7.2f} s  median {r['median_s']:7.2f} s  {r['pairs_per_s']:6.2f} pairs/s"
              f"  x{r['speed-up vs one by one']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
