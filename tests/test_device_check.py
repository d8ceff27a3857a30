"""`python -m glip.device_check`: the accelerator script, run here small on the CPU with the toy preset."""
import json
from pathlib import Path

import pytest

from glip.datasets import open_dataset
from glip.device_check import CAPTIONS, FIXTURE, main, make_shards, run_check

SMALL = dict(device="cpu", preset="toy", hw=(160, 224), runs=1, pairs=8, batches=(4, 8), repeats=1,
             precisions=("fp32",))


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc")
    return out, run_check(out, **SMALL)


def test_every_step_runs_and_writes_its_files(checked):
    out, summary = checked
    steps = summary["steps"]
    assert list(steps) == ["env", "parity", "bench-fp32", "profile-fp32", "shards", "label-fp32-b4", "label-fp32-b8"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["env"]["device"] == "cpu" and isinstance(steps["env"]["torchvision_dcn"], bool)
    assert steps["parity"]["ok"] and steps["parity"]["stages"] > 50 and not steps["parity"]["failed"]
    assert "PARITY OK" in (out / "parity.txt").read_text()
    bench = json.loads((out / "bench-fp32.json").read_text())
    predict = next(r for r in bench["rows"] if r["key"] == "predict")
    assert steps["bench-fp32"]["rows"]["predict"]["min_s"] == predict["min_s"] > 0
    assert steps["bench-fp32"]["predict_goal_met"] == (predict["min_s"] < summary["goals"]["predict_s"])
    assert steps["profile-fp32"]["aten_ops"] > 100 and (out / "profile-fp32.txt").stat().st_size > 0
    for b in (4, 8):
        rows = {r["mode"]: r for r in json.loads((out / f"label-fp32-b{b}.json").read_text())}
        s = steps[f"label-fp32-b{b}"]
        assert s["pairs"] == 8 and s["images_per_s"] == rows["batch, background"]["pairs_per_s"] > 0
        assert s["read_only_per_s"] == rows["read only"]["pairs_per_s"] > 0
    assert steps["label-fp32-b4"]["one_by_one_per_s"] > 0 and steps["label-fp32-b8"]["one_by_one_per_s"] is None
    assert not any(p.suffix == ".tar" for p in out.rglob("*")), "the generated shards must not land in the output"
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text().splitlines()
    assert len(md) == 2 + len(steps) and all(f"| {n} | ok" in line for n, line in zip(steps, md[2:]))


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    summary = run_check(tmp_path, **dict(SMALL, runs=1), fixture=tmp_path / "nope", only=("env", "parity", "shards"))
    steps = summary["steps"]
    assert list(steps) == ["env", "parity", "shards"]
    assert steps["parity"]["status"] == "failed" and "is not a folder" in steps["parity"]["error"]
    assert "\n" not in steps["parity"]["error"] and (tmp_path / "parity.error.txt").is_file()
    assert steps["env"]["status"] == steps["shards"]["status"] == "ok"


def test_a_label_step_brings_its_shards_and_a_spent_budget_skips(tmp_path):
    summary = run_check(tmp_path, **SMALL, only=("label-fp32-b8",))
    assert list(summary["steps"]) == ["shards", "label-fp32-b8"]  # the shards come with any label step
    spent = run_check(tmp_path / "b", **SMALL, budget_s=-1, only=("env", "bench"))
    assert [s["status"] for s in spent["steps"].values()] == ["skipped", "skipped"]
    assert "time budget" in spent["steps"]["bench-fp32"]["reason"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text()) == spent


def test_generated_shards_read_back(tmp_path):
    spec = make_shards(tmp_path, 5, size=(48, 64), per_shard=2)
    records = list(open_dataset(spec))
    assert len(records) == 5 and len(list(tmp_path.glob("*.tar"))) == 3
    assert [r.caption for r in records] == [CAPTIONS[i % len(CAPTIONS)] for i in range(5)]
    assert all(r.load_image().size == (64, 48) for r in records)


def test_cli_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--out", str(blocker / "sub"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write to") and "\n" not in err


def test_default_fixture_is_the_shipped_one():
    assert FIXTURE.is_dir() and (FIXTURE / "io.pt").is_file() and FIXTURE == Path(__file__).parent / "fixtures" / "glip-official-tiny"
