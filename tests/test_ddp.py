"""Scale-out and resume: 2 gloo ranks = 1 process with the same global batch; kill -9 + --resume = an
uninterrupted run; resume states are read with weights_only=True (a crafted last.pt is refused, a truncated one
is a one-line error)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glip.errors import CheckpointError, ConfigError
from glip.train.trainer import get_config, train

REPO = Path(__file__).resolve().parents[1]
MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)
DATA = ("world:gold_det:0:8:0.5", "world:gold_ground:0:8:0.5")


def micro(out, **kw):
    base = dict(model_overrides=MICRO, out=str(out), max_minutes=1e6, steps=3, batch_size=4, data=DATA,
                ckpt_every=1, device="cpu", num_workers=0, num_threads=1)
    base.update(kw)
    return get_config("tiny", **base)


def cli_args(tc) -> list[str]:
    """The same run as `tc`, as `python -m glip train` arguments."""
    sets = [f"{k}={json.dumps(v)}" for k, v in tc.to_dict().items()]
    return ["-m", "glip", "train", "--config", "tiny", "--no-progress"] + [a for s in sets for a in ("--set", s)]


def env():
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, each rank 2 of the 4 items of each step) vs one process with all 4.
    The normalisers are averaged over the ranks, so the gradients agree up to summation order: losses within
    1e-5 (relative), weights after 3 AdamW steps (lr 1e-3) within 1e-4, a tenth of one step's update."""
    one = micro(tmp_path / "one")
    train(one, progress_bar=False, quiet=True)
    two = micro(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + cli_args(two)
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(la) == len(lb) == 3
    for a, b in zip(la, lb):
        assert abs(a - b) <= 1e-5 * abs(a), (la, lb)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-4, worst
    moved = max(float((wa[k] - v).abs().max()) for k, v in _init_weights(one).items() if k in wa)
    assert moved > 1e-3  # the comparison is not between two untouched models


def _init_weights(tc) -> dict:
    from glip.train.trainer import build_model

    return {k: v for k, v in build_model(tc).state_dict().items() if not k.startswith("language_backbone.")}


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL after a few checkpointed steps, then resumed, ends with the weights and the log
    of a run never interrupted."""
    full = micro(tmp_path / "full", steps=6, batch_size=2)
    train(full, progress_bar=False, quiet=True)
    killed = micro(tmp_path / "killed", steps=6, batch_size=2)
    p = subprocess.Popen([sys.executable] + cli_args(killed), cwd=tmp_path, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed: " + p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert not (tmp_path / "killed" / "model").exists()
    done = len(log.read_text().splitlines())
    assert 3 <= done < 6
    resumed = train(killed, resume=True, progress_bar=False, quiet=True)
    assert resumed["steps"] == 6 and len(resumed["history"]) <= 6 - 2
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "killed")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # the log holds each step once


class _Payload:
    """Unpickling this runs `os.mkdir(marker)`: what a crafted checkpoint could do with any command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _write_state(tmp_path) -> Path:
    tc = micro(tmp_path / "run", steps=2)
    train(tc, progress_bar=False, quiet=True, stop_after=1)
    return tmp_path / "run" / "last.pt"


def test_a_malicious_last_pt_is_refused_before_it_runs(tmp_path):
    from glip.train.resume import load_state

    marker = tmp_path / "pwned"
    bad = tmp_path / "evil" / "last.pt"
    bad.parent.mkdir()
    torch.save({"version": 1, "step": 1, "elapsed": 0.0, "model": {}, "optimizer": {}, "config": "{}",
                "ema": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_state(bad)
    assert not marker.exists()
    # the same file on the command line: one line on stderr, a non-zero exit, the payload never ran
    tc = micro(tmp_path / "evil", steps=2)
    r = subprocess.run([sys.executable] + cli_args(tc) + ["--resume"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and not marker.exists()
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0], r.stderr[-2000:]


def test_a_truncated_or_foreign_last_pt_is_a_one_line_error(tmp_path):
    from glip.train.resume import load_state

    ckpt = _write_state(tmp_path)
    state = load_state(ckpt)  # a real one loads with weights_only=True
    assert state["step"] == 1 and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state(ckpt)
    tc = micro(tmp_path / "run", steps=2)
    r = subprocess.run([sys.executable] + cli_args(tc) + ["--resume"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(err) == 1 and "truncated" in err[0], r.stderr[-2000:]
    torch.save({"weights": torch.zeros(3)}, ckpt)  # loadable, but not ours
    with pytest.raises(CheckpointError, match="not a resume state"):
        load_state(ckpt)


def test_resume_refuses_a_different_run(tmp_path):
    _write_state(tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        train(micro(tmp_path / "run", steps=2, lr=5e-4), resume=True, progress_bar=False, quiet=True)
    # the length of the run may change (the schedule re-stretches): that resumes
    r = train(micro(tmp_path / "run", steps=3), resume=True, progress_bar=False, quiet=True)
    assert r["steps"] == 3 and len(r["history"]) == 2


def norms(run: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def test_accumulating_identical_micro_batches_equals_the_whole_batch(tmp_path):
    """One grounding scene in every slot (no flips): each micro-batch has the same loss normalisers as the whole
    batch, so K accumulation steps of 1/K of the batch must give the whole batch's gradients (averaged, not
    summed; zeroed between steps): the same losses and gradient norms; the weights differ only by rounding,
    which AdamW amplifies on near-zero gradients, so they are compared as a whole: the difference is under 1% of
    the update."""
    kw = dict(data=("world:gold_ground:0:1",), flip_prob=0.0, steps=2, warmup_steps=0)
    runs = {k: micro(tmp_path / f"accum{k}", grad_accum=k, **kw) for k in (1, 2, 4)}
    for tc in runs.values():
        train(tc, progress_bar=False, quiet=True)
    base, init = weights(tmp_path / "accum1"), _init_weights(runs[1])
    norm = lambda a, b: sum(float((a[n].double() - b[n].double()).square().sum()) for n in a) ** 0.5  # noqa: E731
    update = norm(base, {n: init[n] for n in base})
    assert update > 1e-2
    for k in (2, 4):
        assert losses(tmp_path / f"accum{k}") == pytest.approx(losses(tmp_path / "accum1"), rel=1e-6)
        assert norms(tmp_path / f"accum{k}") == pytest.approx(norms(tmp_path / "accum1"), rel=1e-5)
        assert norm(weights(tmp_path / f"accum{k}"), base) < 0.01 * update, (k, update)


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    """--precision bf16 (autocast; the loss in fp32): the first step's loss is the fp32 one within bf16's
    precision, and training moves the weights without NaNs."""
    a, b = micro(tmp_path / "fp32", steps=2), micro(tmp_path / "bf16", steps=2, precision="bf16")
    train(a, progress_bar=False, quiet=True)
    train(b, progress_bar=False, quiet=True)
    la, lb = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(lb)))
    assert abs(la[0] - lb[0]) < 0.05 * abs(la[0]), (la, lb)
    w = weights(tmp_path / "bf16")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert json.loads((tmp_path / "bf16" / "model" / "config.json").read_text())["training"]["precision"] == "bf16"
