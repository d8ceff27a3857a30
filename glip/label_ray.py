"""`glip label --engine ray`: the labelling of `glip.label` on a Ray cluster (one machine or many).

    from glip.label_ray import RayConfig, label_ray
    summary = label_ray("glip_tiny_model_o365_goldg.pth", "webdataset:cc3m/{00000..00331}.tar", "labels/",
                        ray=RayConfig(address="auto", gpus_per_actor=0.5))

The unit of work is the input shard, exactly as in the local engine: each Ray actor loads the model once,
and each call labels one whole shard with `glip.label.label_shard` and writes it with
`glip.label.write_shard` (temporary name, then rename) on the worker, so the ODVG files are the local
engine's, byte for byte. The driver alone writes the manifest (`RunPlan.add`, one writer, no race) when a
shard's call returns; `--resume` therefore skips what the manifest lists, whichever engine wrote it.

Why actors with a shard per call and not Ray Data's `map_batches` with a callable class: the shard is
what the manifest records, what `--resume` skips and what one output file holds, in input order. Ray
Data's unit is a block of rows that its streaming executor splits, fuses and reorders; mapping blocks
back to per-shard files, an ordering within each and a manifest entry when (and only when) a shard's
file is renamed would rebuild this module on top of it, with a second executor's start-up and
backpressure in between. A fixed pool of actors (`ray.util.ActorPool`) hands the next shard to whichever
actor is free, and Ray's own fault tolerance does the rest: an actor whose process dies mid-shard is
restarted (its constructor reloads the model, `max_restarts`) and the shard's call is run again from the
start (`max_task_retries`); since a shard is written only when complete, a retried shard is simply
labelled again, with the same result.

Resources: an actor asks Ray for `threads_per_actor` CPUs and `gpus_per_actor` GPUs (fractional below
one, so several small models share a GPU); torch uses that many threads in it. Requests no node can
satisfy are ConfigErrors; more actors than the cluster fits are clamped to what fits, with a warning.

Ray is imported only here, and this module only by the `--engine ray` path: `import glip` never loads it.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from glip.datasets import Dataset, open_dataset
from glip.errors import ConfigError, GLIPError
from glip.label import RECORDS_PER_SHARD, LabelSettings, check_writable, label_shard, plan_run, write_shard

# Set to a file path, this makes the first actor that finishes a batch create that file and kill its own
# process (os._exit) — once per file: how the tests prove that a worker lost mid-shard is retried by Ray.
DIE_ONCE_ENV = "GLIP_RAY_DIE_ONCE"
POLL_S = 0.5  # how often the driver refreshes the progress bar while shards run


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine runs: where, how many actors, and what each one asks of the cluster."""

    address: str | None = None          # None: $RAY_ADDRESS, else a new local Ray; "auto"; "ray://head:10001"
    actors: int | None = None           # None: as many as the cluster's CPUs (and GPUs) fit
    gpus_per_actor: float = 0.0         # 0: CPU actors; 0.25: four actors share a GPU; 2: two GPUs each
    threads_per_actor: int | None = None  # torch threads = CPUs asked per actor (None: see `plan_actors`)
    retries: int = 3                    # runs of a shard again after its worker died, before the run stops
    shards_per_actor: int = 2           # shards in flight on one actor: the next one decodes while one computes
    prefetch: int = 32                  # pairs each actor decodes ahead of its model (a background thread)

    def validate(self) -> "RayConfig":
        """The checks that need no cluster."""
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError(f"--threads-per-actor must be >= 1, got {self.threads_per_actor}")
        g = self.gpus_per_actor
        if not (g >= 0 and math.isfinite(g)):
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {g:g}")
        if g > 1 and g != int(g):
            raise ConfigError(f"--gpus-per-actor above 1 must be a whole number of GPUs (Ray shares a GPU in "
                              f"fractions of one), got {g:g}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if self.prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.shards_per_actor < 1:
            raise ConfigError(f"shards per actor must be >= 1, got {self.shards_per_actor}")
        return self


@dataclass(frozen=True)
class Placement:
    actors: int
    threads: int
    gpus: float
    warning: str = ""                   # why fewer actors than asked run ("" when none)


def plan_actors(cfg: RayConfig, nodes: list[dict]) -> Placement:
    """How many actors of how many threads run on a cluster whose alive nodes have these resources
    ({"CPU": n, "GPU": m} each, as `ray.nodes()` reports them).

    An actor lives on one node, so a request larger than every node is a ConfigError, and the number
    that fit is counted node by node. Threads when not given: 1 per GPU actor (the GPU does the work);
    for CPU actors the cluster's CPUs split evenly over `actors`, or 1 each when `actors` is not given
    either (then one actor per CPU). More actors than fit are clamped to what fits, with a warning:
    Ray would otherwise keep the extra ones pending forever, each holding back the shard given to it."""
    cfg.validate()
    cpus = [float(n.get("CPU", 0)) for n in nodes]
    gpus = [float(n.get("GPU", 0)) for n in nodes]
    total_cpu, total_gpu = sum(cpus), sum(gpus)
    g = cfg.gpus_per_actor
    if g > max(gpus, default=0.0):
        where = "the cluster has no GPU" if total_gpu == 0 else f"at most {max(gpus):g} on one node"
        raise ConfigError(f"--gpus-per-actor {g:g} asks for more GPUs than any node has ({where})")
    t = cfg.threads_per_actor
    if t is None:
        t = 1 if g > 0 or cfg.actors is None else max(1, int(total_cpu // cfg.actors))
        t = max(1, min(t, int(max(cpus, default=1))))
    if t > max(cpus, default=0.0):
        raise ConfigError(f"--threads-per-actor {t} asks for more CPUs than any node has (at most "
                          f"{max(cpus, default=0):g} on one node)")
    fit = sum(min(int(c // t), int(gg / g + 1e-9) if g > 0 else c) for c, gg in zip(cpus, gpus))
    fit = int(fit)
    if fit == 0:
        raise ConfigError(f"no node has both {t} CPUs and {g:g} GPUs for one actor; lower --threads-per-actor")
    if cfg.actors is None:
        return Placement(fit, t, g)
    if cfg.actors > fit:
        asked = f"{cfg.actors} actors × {t} threads" + (f" × {g:g} GPUs" if g else "")
        has = f"{total_cpu:g} CPUs" + (f", {total_gpu:g} GPUs" if g else "")
        return Placement(fit, t, g, f"{asked} do not fit the cluster ({has}, {len(nodes)} node"
                                    f"{'s' if len(nodes) != 1 else ''}): running {fit} actors")
    return Placement(cfg.actors, t, g)


# --------------------------------------------------------------------------------------------------
# the actors (plain classes: wrapped with ray.remote by the driver, so this module imports without ray)
# --------------------------------------------------------------------------------------------------
class ShardLabeller:
    """One worker: the model, loaded once, and `label(shard)` → the shard's manifest entry.

    A load error is kept and raised by each call (a raising constructor would make Ray report a dead
    actor instead of the error), so a wrong --model reaches the driver as its one-line GLIPError."""

    def __init__(self, model: str, model_kwargs: dict, settings: LabelSettings, out: str, threads: int,
                 prefetch: int, board: str | None = None, die_once: str | None = None, cwd: str | None = None):
        import torch

        if cwd and os.path.isdir(cwd):  # relative --data paths mean the same on a node that mounts the same folder
            os.chdir(cwd)
        torch.set_num_threads(threads)
        self.settings, self.out, self.prefetch, self.die_once = settings, out, prefetch, die_once
        self.progress = None
        if board is not None:  # by name: a handle argument would sit in the object store, which restarts rely on
            import ray

            self.progress = ray.get_actor(board)
        self.error: GLIPError | None = None
        t0 = time.perf_counter()
        try:
            from glip.model import GLIP

            self.model = GLIP.from_pretrained(model, **model_kwargs)
        except GLIPError as e:
            self.error = e
        self.load_s = time.perf_counter() - t0

    def ready(self) -> dict:
        if self.error is not None:
            raise self.error
        import torch

        return {"pid": os.getpid(), "load_s": round(self.load_s, 2), "threads": torch.get_num_threads(),
                "device": str(next(self.model.parameters()).device)}

    def label(self, shard) -> dict:
        if self.error is not None:
            raise self.error
        counts = [0, 0, 0]  # pairs seen (rejects included), regions kept, rejects

        def on_batch(n, regions, rejects):
            counts[0] += n
            counts[1] += regions
            counts[2] += rejects
            if self.progress is not None:
                self.progress.update.remote(shard.name, *counts)
            if self.die_once:
                try:
                    os.close(os.open(self.die_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                os._exit(1)

        start = time.time()
        result = label_shard(self.model, shard, self.settings, prefetch=self.prefetch, on_batch=on_batch)
        entry = write_shard(self.out, shard.name, result)
        return {"name": shard.name, "entry": entry, "seen": counts[0], "pairs": counts[0] - counts[2],
                "regions": counts[1], "rejects": counts[2], "reasons": dict(Counter(r["reason"] for r in result.rejects)),
                "start": start, "end": time.time(), "worker": f"{ray_node()}:{os.getpid()}"}


def ray_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:8]


def engine_figures(results: list[dict], wall_s: float, actors: int) -> dict:
    """How busy the workers were: the median idle gap of a worker between two stretches of shards (what
    handing out a shard costs: its result back to the driver, the next shard out; with several shards in
    flight per worker, usually none) and the fraction of the workers' time with a shard in hand (the
    rest: those gaps, and workers idle at the end while the last shards finish)."""
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        by_worker.setdefault(r["worker"], []).append((r["start"], r["end"]))
    gaps, busy = [], 0.0
    for spans in by_worker.values():
        merged: list[list[float]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        gaps += [b[0] - a[1] for a, b in zip(merged, merged[1:])]
        busy += sum(b - a for a, b in merged)
    return {"shard_gap_s": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else 0.0,
            "busy": round(busy / (wall_s * actors), 3) if wall_s > 0 and actors else None}


class ProgressBoard:
    """Latest counts of every shard in flight or done (a retried shard starts again from zero and
    overwrites its entry, so a lost attempt is not counted twice)."""

    def __init__(self):
        self.shards: dict[str, tuple[int, int, int]] = {}

    def update(self, name: str, seen: int, regions: int, rejects: int) -> None:
        self.shards[name] = (seen, regions, rejects)

    def totals(self) -> tuple[int, int, int]:
        return tuple(sum(v[k] for v in self.shards.values()) for k in range(3))


# --------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------
def connect(address: str | None):
    """The `ray` module, initialised: an existing session of this process is reused, else `address` joined
    ("auto": the cluster `ray start` runs on this machine, "ray://host:10001", "host:port"), else
    `$RAY_ADDRESS`, else a new private local instance (never a cluster found by chance). Returns
    (ray, started_here)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'ray[data]==2.60.0'") from None
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kw: dict = {"logging_level": logging.WARNING}
    if address == "local":  # a private instance on the loopback interface: nothing listens on the network
        kw.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"--address {address}: cannot join a Ray cluster ({first})") from None
    return ray, True


def alive_nodes(ray) -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _unwrap(ray, e: BaseException) -> BaseException:
    """The GLIPError a worker raised (Ray wraps it with its remote traceback), or `e`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, GLIPError) else e


def label_ray(model: str, data: str | Dataset, out: str | Path, settings: LabelSettings | None = None, *,
              config: RayConfig = RayConfig(), shard: tuple[int, int] | str = (0, 1), resume: bool = False,
              records_per_shard: int = RECORDS_PER_SHARD, model_name: str | None = None, progress: bool = True,
              model_kwargs: dict | None = None, **kw) -> dict:
    """`glip.label.label` on Ray: same arguments, same output folder, same summary (plus the engine's
    figures in `this_run`). `model` is what each actor loads (`GLIP.from_pretrained(model, **model_kwargs)`):
    a path every node can read or a shipped name; `out` must be a folder every node writes to (a shared
    file system) — the workers write the shards there, the driver the manifest."""
    cfg = config.validate()
    model_kwargs = dict(model_kwargs or {})
    device = model_kwargs.pop("device", "auto") or "auto"
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and cfg.gpus_per_actor == 0:
        raise ConfigError("--device cuda with --engine ray needs --gpus-per-actor > 0 (Ray assigns the GPUs)")
    if device == "cpu" and cfg.gpus_per_actor > 0:
        raise ConfigError("--device cpu contradicts --gpus-per-actor > 0")
    model_kwargs["device"] = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    out = check_writable(out).resolve()  # before Ray starts: a bad --out or --data fails at once
    ds = open_dataset(data)
    model_name = model if model_name is None else model_name  # as given: the manifest's, whichever engine ran
    if Path(model).exists():             # a relative path means the driver's folder on every node
        model = str(Path(model).resolve())

    t_start = time.perf_counter()
    ray_mod, started = connect(cfg.address)
    t_connect = time.perf_counter() - t_start
    actors, board = [], None
    try:
        nodes = alive_nodes(ray_mod)
        place = plan_actors(cfg, nodes)
        if place.warning:
            print(f"warning: {place.warning}", file=sys.stderr)
        plan = plan_run(ds, out, settings, shard=shard, resume=resume, records_per_shard=records_per_shard,
                        model_name=model_name, **kw)
        todo = list(plan.todo())
        remote = ray_mod.remote(ShardLabeller).options(num_cpus=place.threads, num_gpus=place.gpus,
                                                       max_restarts=-1, max_task_retries=cfg.retries,
                                                       max_concurrency=cfg.shards_per_actor)
        board_name = f"glip-label-progress-{os.getpid()}-{time.time_ns()}"
        board = ray_mod.remote(ProgressBoard).options(num_cpus=0, name=board_name).remote()
        n_actors = max(1, min(place.actors, len(todo)))
        actors = [remote.remote(model, model_kwargs, plan.settings, str(plan.out), place.threads, cfg.prefetch,
                                board_name, os.environ.get(DIE_ONCE_ENV) or None, os.getcwd()) for _ in range(n_actors if todo else 0)]
        ready = ray_mod.get([a.ready.remote() for a in actors])
        t_ready = time.perf_counter() - t_start
        counts, reasons, n_done, seconds, figures = _drive(ray_mod, plan, todo, actors, board, progress, cfg.retries,
                                                           cfg.shards_per_actor)
    except ray_mod.exceptions.RayTaskError as e:
        err = _unwrap(ray_mod, e)
        if err is e:
            raise
        raise err from None
    finally:
        for a in actors + ([board] if board is not None else []):
            ray_mod.kill(a)
        if started:
            ray_mod.shutdown()
    return plan.finish(counts, reasons, n_done, seconds, engine="ray", nodes=len(nodes), actors=len(actors),
                       threads_per_actor=place.threads, gpus_per_actor=place.gpus, connect_s=round(t_connect, 2),
                       startup_s=round(t_ready, 2), model_load_s=max((r["load_s"] for r in ready), default=0.0),
                       **figures)


def _drive(ray, plan, todo: list, actors: list, board, progress: bool, retries: int, per_actor: int = 1):
    """Hand the shards to the actors, record each in the manifest as it returns, show progress."""
    from ray.util import ActorPool
    from tqdm import tqdm

    by_name = {s.name: s for s in todo}
    prior = list(plan.run.data["shards"])
    done_pairs = sum(e["records"] + e["rejects"] for e in prior)
    n_shards = len(todo) + len(prior)
    total = plan.total_pairs()
    bar = tqdm(total=total, initial=done_pairs if total is not None else 0, disable=not progress, desc="label",
               unit="pair", dynamic_ncols=True)
    counts = {"pairs": 0, "regions": 0, "rejects": 0}
    reasons: Counter = Counter()
    n_done, shown, last = 0, 0, None
    results: list[dict] = []
    t0 = time.perf_counter()

    def refresh(seen: int, regions: int, rejects: int):
        nonlocal shown, last
        if (seen, regions, rejects, n_done) == last:
            return
        last = (seen, regions, rejects, n_done)
        bar.update(seen - shown)
        shown = seen
        post = {"shards": f"{len(prior) + n_done}/{n_shards}", "boxes": regions, "rejects": rejects}
        if total is None and n_done:  # no pair count known ahead: the ETA in shards
            eta = (time.perf_counter() - t0) / n_done * (len(todo) - n_done)
            post["eta"] = f"{eta:.0f}s"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    pool = ActorPool([a for a in actors for _ in range(per_actor)])  # an actor listed k times: k shards in flight
    for s in todo:
        pool.submit(lambda a, s: a.label.remote(s), s)
    try:
        while pool.has_next():
            try:
                r = pool.get_next_unordered(timeout=POLL_S)
            except TimeoutError:
                refresh(*ray.get(board.totals.remote()))
                continue
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"a labelling worker died {retries + 1} times on one shard ({e.__class__.__name__}; "
                                   f"out of memory? fewer actors or a smaller batch size help); the finished shards "
                                   f"are in {plan.run.path}: rerun with --resume") from None
            plan.add(by_name[r["name"]], r["entry"])
            results.append(r)
            n_done += 1
            for k in counts:
                counts[k] += r[k]
            reasons.update(r["reasons"])
            refresh(*ray.get(board.totals.remote()))
        refresh(counts["pairs"] + counts["rejects"], counts["regions"], counts["rejects"])  # exact, not the board's
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    return counts, dict(reasons), n_done, wall, engine_figures(results, wall, len(actors))


def label_from_args(a, ds: Dataset, settings: LabelSettings, shard: tuple[int, int]) -> dict:
    """`python -m glip label --engine ray ...` (glip/cli_data.py parses the arguments)."""
    cfg = RayConfig(address=a.address, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
                    threads_per_actor=a.threads_per_actor if a.threads_per_actor is not None else a.threads)
    config = a.config
    if config is not None and Path(config).exists():
        config = str(Path(config).resolve())
    return label_ray(a.model, ds, a.out, settings, config=cfg, shard=shard, resume=a.resume,
                     records_per_shard=a.records_per_shard, model_name=a.model, progress=not a.no_progress,
                     model_kwargs={"config": config, "device": a.device})


__all__ = ["DIE_ONCE_ENV", "Placement", "ProgressBoard", "RayConfig", "ShardLabeller", "connect", "label_from_args", "label_ray",
           "plan_actors"]
