"""The Ray engine of `glip label`: same output as the local engine, a worker killed mid-shard, a driver
killed mid-run, resource checks. One local Ray instance (2 CPUs) serves every test of the module."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glip.errors import ConfigError
from glip.label_ray import DIE_ONCE_ENV, RayConfig, label_ray, plan_actors

REPO = Path(__file__).resolve().parents[1]
MODEL = "toy-teacher"
SETTINGS = dict(batch_size=2, threshold=0.5)   # 2 batches per shard of 4: a worker can die mid-shard


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --------------------------------------------------------------------------------------------------
# no cluster needed
# --------------------------------------------------------------------------------------------------
def test_import_glip_does_not_import_ray():
    """The library, its CLI, the app, and even this engine's module load without Ray (it is imported when a
    Ray run starts)."""
    code = ("import sys, glip, glip.label, glip.datasets, glip.__main__, glip.cli_data, glip.label_ray, app\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=REPO, timeout=120)


def test_noun_phrases_from_concurrent_first_calls():
    """An actor labels two shards at once (threads): their first noun-phrase calls race on the tagger's lazy
    lexicon. In a fresh process, four threads must find the phrases one thread finds."""
    code = """
import threading
from glip.prompts import noun_phrases
caps = ["a big turquoise star and the small red circle", "a man rides a horse", "an orange cross"] * 10
res = {}
ts = [threading.Thread(target=lambda k=k: res.__setitem__(k, [noun_phrases(c) for c in caps])) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
ref = [noun_phrases(c) for c in caps]
assert all(v == ref for v in res.values()), {k: sum(a != b for a, b in zip(v, ref)) for k, v in res.items()}
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=REPO, timeout=120)


ONE_NODE = [{"CPU": 2.0}]
GPU_NODES = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]


@pytest.mark.parametrize("cfg, message", [
    (RayConfig(actors=0), "--actors must be >= 1, got 0"),
    (RayConfig(threads_per_actor=0), "--threads-per-actor must be >= 1"),
    (RayConfig(gpus_per_actor=-1), "--gpus-per-actor must be >= 0"),
    (RayConfig(gpus_per_actor=1.5), "whole number"),
])
def test_static_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_more_gpus_than_exist_is_an_error():
    with pytest.raises(ConfigError, match=r"--gpus-per-actor 1 asks for more GPUs than any node has \(the cluster has no GPU\)"):
        plan_actors(RayConfig(gpus_per_actor=1), ONE_NODE)
    with pytest.raises(ConfigError, match=r"at most 2 on one node"):
        plan_actors(RayConfig(gpus_per_actor=3), GPU_NODES)
    with pytest.raises(ConfigError, match=r"--threads-per-actor 3 asks for more CPUs than any node has"):
        plan_actors(RayConfig(threads_per_actor=3), ONE_NODE)
    with pytest.raises(ConfigError, match=r"no node has both 4 CPUs and 1 GPUs"):  # the GPU is on the small node
        plan_actors(RayConfig(threads_per_actor=4, gpus_per_actor=1), [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 16.0}])


def test_actors_times_threads_over_cores_is_clamped_with_a_warning():
    p = plan_actors(RayConfig(actors=2, threads_per_actor=2), ONE_NODE)
    assert (p.actors, p.threads) == (1, 2)
    assert p.warning == "2 actors × 2 threads do not fit the cluster (2 CPUs, 1 node): running 1 actors"
    p = plan_actors(RayConfig(actors=2, threads_per_actor=1), ONE_NODE)
    assert (p.actors, p.threads, p.warning) == (2, 1, "")


def test_placement_counts_node_by_node_and_shares_gpus():
    # 3 threads: 5 actors fit on the 16-CPU node and 2 on the 8-CPU one (not 24 // 3 = 8)
    assert plan_actors(RayConfig(threads_per_actor=3), GPU_NODES).actors == 7
    # a quarter of a GPU each: 8 + 4 actors, one thread each by default
    p = plan_actors(RayConfig(gpus_per_actor=0.25), GPU_NODES)
    assert (p.actors, p.threads, p.gpus) == (12, 1, 0.25)
    p = plan_actors(RayConfig(actors=20, gpus_per_actor=0.5), GPU_NODES)
    assert p.actors == 6 and "running 6 actors" in p.warning
    # CPU defaults: one single-thread actor per CPU; with --actors the CPUs split evenly
    assert plan_actors(RayConfig(), ONE_NODE) == plan_actors(RayConfig(actors=2, threads_per_actor=1), ONE_NODE)
    assert plan_actors(RayConfig(actors=1), ONE_NODE).threads == 2


# --------------------------------------------------------------------------------------------------
# a local Ray instance
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """14 world web pairs in 4 WebDataset tars (4, 4, 4, 2) with a corrupt image and an empty caption."""
    from glip.datasets import open_dataset
    from glip.datasets.webdataset import write_webdataset

    records = list(open_dataset("world:web:0:14"))
    records[5] = dataclasses.replace(records[5], image=b"\x89PNG\r\n\x1a\n this is not an image")
    records[10] = dataclasses.replace(records[10], caption="")
    d = tmp_path_factory.mktemp("corpus")
    write_webdataset(records, d, shard_size=4)
    return f"webdataset:{d}/{{00000..00003}}.tar"


@pytest.fixture(scope="module")
def local_out(corpus, tmp_path_factory) -> Path:
    from glip.label import label
    from glip.model import GLIP

    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray actor below: the same arithmetic
    try:
        label(GLIP.from_pretrained(MODEL, device="cpu"), corpus, out, model_name=MODEL, progress=False, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": _env()["PYTHONPATH"]}})
    yield ray
    ray.shutdown()


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}


def _same_output(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:  # record for record, in order
        assert fa[name].decode().splitlines() == fb[name].decode().splitlines(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["settings"] == mb["settings"] and ma["shards"] == mb["shards"]


def test_ray_output_equals_local(ray_session, corpus, local_out, tmp_path, capsys):
    out = tmp_path / "ray"
    s = label_ray(MODEL, corpus, out, config=RayConfig(actors=2, threads_per_actor=1), model_name=MODEL,
                  progress=True, **SETTINGS)
    _same_output(local_out, out)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["empty caption", "unreadable image"]
    assert (s["pairs"], s["rejects"], s["shards"]) == (12, 2, 4)
    assert s["this_run"]["engine"] == "ray" and s["this_run"]["actors"] == 2
    err = capsys.readouterr().err
    assert "shards=4/4" in err and "rejects=2" in err and "pair/s" in err and "eta=" in err


def test_worker_killed_mid_shard_is_retried(ray_session, corpus, local_out, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "died"
    monkeypatch.setenv(DIE_ONCE_ENV, str(marker))
    out = tmp_path / "ray"
    # 3 actors asked: 2 fit (warned and clamped); the first one that finishes a batch kills its process
    label_ray(MODEL, corpus, out, config=RayConfig(actors=3, threads_per_actor=1), model_name=MODEL,
              progress=False, **SETTINGS)
    assert marker.is_file(), "no worker died"
    assert "running 2 actors" in capsys.readouterr().err
    _same_output(local_out, out)


def test_model_error_reaches_the_driver_as_one_line(ray_session, corpus, tmp_path):
    from glip.errors import GLIPError

    with pytest.raises(GLIPError) as e:
        label_ray(str(tmp_path / "no-such-model"), corpus, tmp_path / "out", config=RayConfig(actors=1),
                  progress=False)
    assert "\n" not in str(e.value) and "no-such-model" in str(e.value)


def test_resource_errors_on_the_cluster(ray_session, corpus, tmp_path):
    with pytest.raises(ConfigError, match="asks for more GPUs than any node has"):
        label_ray(MODEL, corpus, tmp_path / "out", config=RayConfig(gpus_per_actor=1), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()  # refused before the run started


def test_driver_killed_then_resume(ray_session, corpus, local_out, tmp_path):
    out = tmp_path / "ray"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "glip", "label", "--engine", "ray", "--address", address, "--actors", "1",
           "--threads-per-actor", "1", "--model", MODEL, "--data", corpus, "--out", str(out),
           "--batch-size", str(SETTINGS["batch_size"]), "--no-progress"]
    driver = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.time() + 240
    listed: list[dict] = []
    while time.time() < deadline and driver.poll() is None:
        if manifest.is_file():
            listed = json.loads(manifest.read_text())["shards"]
            if listed:
                break
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert listed and len(listed) < 4, f"kill after {len(listed)} shards; driver stderr: {driver.stderr.read()[-2000:]}"
    mtimes = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in listed}
    s = label_ray(MODEL, corpus, out, config=RayConfig(actors=2, threads_per_actor=1), resume=True,
                  model_name=MODEL, progress=False, **SETTINGS)
    assert s["this_run"]["shards_skipped"] == len(listed)
    assert s["this_run"]["shards"] == 4 - len(listed)
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes  # finished shards not relabelled
    _same_output(local_out, out)
