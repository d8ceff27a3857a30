"""Data-parallel training on `torch.distributed`: one process per device, started by torchrun.

    torchrun --nproc_per_node 2 -m glip train --config teacher --set num_threads=1     # CPU: gloo
    torchrun --nproc_per_node 8 -m glip train --config finetune --data ...             # GPUs: NCCL

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process and nothing here
communicates. Rank r builds its slots of each step's global batch (`glip.train.data.StepBatches`), the model
is wrapped in `DistributedDataParallel` (gradients averaged), the loss's normalisers are averaged over the
ranks (`mean_over_ranks`, which makes the averaged gradients those of one process with the whole batch), and
rank 0 alone writes checkpoints, logs and the final model.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glip.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device from `device`
    (auto | cpu | cuda[:N]); under torchrun a CUDA rank takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this PyTorch build sees no CUDA device")
        if d.enabled:
            if d.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"rank {d.rank}: LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPUs")
            device = f"cuda:{d.local_rank}"
        dev = torch.device(device)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"device must be auto, cpu or cuda[:N], not {device!r}")
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=d.rank, world_size=d.world, timeout=datetime.timedelta(minutes=30))
    return d, dev


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks (a copy; `t` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def max_over_ranks(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["Dist", "setup", "teardown", "mean_over_ranks", "max_over_ranks", "barrier"]
