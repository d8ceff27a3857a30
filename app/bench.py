"""`python -m app.bench [THREADS]`: a real GLIP's round trip on this machine's CPU at several input sizes — what
the app's CPU input size (`GLIP_CPU_SIZE`, default 512) is chosen from.

GLIP-T with random weights (timing does not depend on them), a new 640×480 image each run (no cache hit), a
5-phrase prompt; min and median of 3 runs after one warm-up run. Compare sizes within one run, not machines.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from glip import GLIP, get_preset

SIZES = (800, 608, 512, 448)
PROMPT = "person . dog . cup . chair . car"


def main(threads: int = 2, preset: str = "glip-t") -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GLIP(get_preset(preset)).eval()
    rng = np.random.default_rng(0)
    for size in SIZES:
        ts = []
        for _ in range(4):
            image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
            model.predictor.clear_cache()
            t = time.perf_counter()
            model.predict(image, PROMPT, threshold=0.5, min_size=size, max_size=size * 1333 // 800)
            ts.append(time.perf_counter() - t)
        ts = ts[1:]
        print(f"{preset} shorter side {size}: min {min(ts):.2f} s, median {statistics.median(ts):.2f} s "
              f"({threads} threads)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
