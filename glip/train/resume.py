"""The resume state of a run (`<out>/last.pt`): tensors and plain containers only, read with weights_only=True.

A file that needs anything else to unpickle (a crafted `__reduce__` payload, an arbitrary class) is refused
before any of it runs; a truncated or foreign file is a one-line `CheckpointError`. No RNG state is stored:
every random draw of a step is seeded from (seed, step) (the data stream, the per-step torch seed), so the
step counter is the whole of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from glip.checkpoint import load_error
from glip.errors import CheckpointError, ConfigError

VERSION = 1
# what may change between a run and its resumption: bookkeeping, and the length of the run (the schedule is
# a function of step / steps, so a longer run re-stretches the remaining cosine)
RESUMABLE_CHANGES = frozenset({"steps", "max_minutes", "ckpt_every", "eval_every", "eval_data", "num_threads",
                               "num_workers", "device", "out", "name"})


def save_state(path: Path, *, model_state: dict, optimizer: dict, ema: dict | None, step: int, elapsed: float,
               config: dict, scaler: dict | None = None) -> None:
    """Write atomically (temporary name, then rename): a kill leaves the previous state intact."""
    payload = {"version": VERSION, "step": int(step), "elapsed": float(elapsed),
               "model": {k: v.detach().cpu() for k, v in model_state.items()}, "optimizer": optimizer,
               "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.items()},
               "scaler": scaler, "config": json.dumps(config, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    """The resume state at `path`, checked; CheckpointError (one line) for anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no resume state") from None
    except Exception as e:
        raise load_error(path, e, "a resume state") from None
    need = {"version": int, "step": int, "elapsed": float, "model": dict, "optimizer": dict, "config": str}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in need.items()):
        raise CheckpointError(f"{path}: not a resume state of this trainer (expected keys {sorted(need)})")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path}: resume state version {state['version']}, this trainer reads {VERSION}")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path}: its model state holds non-tensors")
    return state


def check_same_run(state: dict, config: dict, path: Path) -> None:
    """Refuse to resume with settings that would not continue the same run."""
    saved = json.loads(state["config"])
    now = json.loads(json.dumps(config, sort_keys=True))  # tuples → lists, as saved
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        show = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{path}: --resume with different settings would not continue the same run ({show}); "
                          "use a new --out, or the original settings")


__all__ = ["save_state", "load_state", "check_same_run", "VERSION", "RESUMABLE_CHANGES"]
