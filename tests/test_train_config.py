"""Every TrainConfig field is reachable from the command line (`--set`, config files, named configs); unknown
keys and nonsense values are one-line errors that exit non-zero and write nothing."""
import dataclasses
import json

import pytest

from glip.__main__ import main
from glip.errors import ConfigError
from glip.train.config import CONFIGS, TrainConfig, get_config

# a valid value, different from the tiny config's, for every field (a new field without one fails the test)
SAMPLES = {
    "name": "mine", "model": "glip-t", "model_overrides": {"channels": 32}, "init_from": "some/folder", "init_config": "glip-t",
    "mode": "linear", "data": ["world:gold_ground:0:10:2", "odvg:x.jsonl:img/:1"], "steps": 11, "max_minutes": 7.5,
    "batch_size": 6, "grad_accum": 2, "lr": 0.002, "text_lr": 1e-5, "bias_lr_factor": 2.0, "weight_decay": 0.01,
    "warmup_steps": 5, "min_lr_ratio": 0.2, "clip_grad": 0.5, "ema": 0.9, "seed": 9, "device": "cpu",
    "precision": "bf16", "train_dropout": True, "det_negatives": [1, 3], "hard_negative_weight": 2.0,
    "attribute_prompt_prob": 0.1, "share_attribute_words": False, "min_score": 0.4, "mask_unlabelled": False,
    "text_projection_init": "whiten", "contrastive_weight": 0.5, "flip_prob": 0.25, "ckpt_every": 7,
    "eval_every": 3, "eval_data": ["world:test_det:5:4"], "num_threads": 1, "num_workers": 2, "out": "elsewhere",
}


def resolved(capsys, *args) -> dict:
    assert main(["train", "--config", "tiny", *args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_field_is_settable_with_set(capsys):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(SAMPLES) == fields
    tiny = get_config("tiny").to_dict()
    for key, value in SAMPLES.items():
        assert json.loads(json.dumps(tiny[key])) != value, key  # the sample really changes something
        extra = ["--set", "init_from=x"] if key == "mode" else []
        got = resolved(capsys, "--set", f"{key}={json.dumps(value)}", *extra)
        assert got[key] == value, key
    # all of them at once, and the flags are the same fields
    got = resolved(capsys, *[a for k, v in SAMPLES.items() for a in ("--set", f"{k}={json.dumps(v)}")])
    assert all(got[k] == v for k, v in SAMPLES.items())
    got = resolved(capsys, "--steps", "5", "--batch-size", "4", "--grad-accum", "2", "--threads", "1", "--data",
                   "world:gold_det:0:5", "odvg:a.jsonl:2", "--mode", "prompt", "--init-from", "m", "--workers", "0")
    assert (got["steps"], got["batch_size"], got["grad_accum"], got["num_threads"], got["mode"], got["num_workers"]
            ) == (5, 4, 2, 1, "prompt", 0)
    assert got["data"] == ["world:gold_det:0:5", "odvg:a.jsonl:2"]
    # a plain string needs no JSON quoting
    assert resolved(capsys, "--set", "out=runs/x y")["out"] == "runs/x y"


def test_config_files_and_presets(tmp_path, capsys):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"base": "finetune", "init_from": "m", "data": ["world:gold_det:0:5"], "steps": 9}))
    assert main(["train", "--config", str(f), "--print-config"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["steps"] == 9 and got["lr"] == CONFIGS["finetune"].lr and got["text_lr"] == 1e-5
    y = tmp_path / "run.yaml"
    y.write_text("base: prompt\ninit_from: m\nsteps: 4\ndet_negatives: [2, 5]\n")
    tc = get_config(str(y))
    assert tc.mode == "prompt" and tc.lr == 0.05 and tc.weight_decay == 0.25 and tc.det_negatives == (2, 5)
    assert get_config("linear", init_from="m").mode == "linear"
    for name in CONFIGS:  # every preset is valid once the user gives what it leaves open
        assert get_config(name, init_from=CONFIGS[name].init_from or "m").name == name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stpes": 3}))
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        get_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        get_config(str(bad))


@pytest.mark.parametrize("args, needle", [
    (["--steps", "-1"], "steps must be at least 1"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "6", "--grad-accum", "4"], "multiple of grad_accum"),
    (["--threads", "0"], "num_threads"),
    (["--workers", "-2"], "num_workers"),
    (["--max-minutes", "0"], "max_minutes"),
    (["--set", "lr=-1"], "lr must be positive"),
    (["--set", "lr=fast"], "not a valid float"),
    (["--set", "steps=2.5"], "not a valid int"),
    (["--set", "ema=1"], "ema must be in"),
    (["--set", "flip_prob=2"], "flip_prob"),
    (["--set", "det_negatives=[5,2]"], "det_negatives"),
    (["--set", "stepz=3"], "unknown training setting 'stepz'"),
    (["--set", "steps"], "expected key=value"),
    (["--mode", "everything"], "mode must be one of"),
    (["--mode", "prompt"], "set init_from"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--device", "banana"], "device must be"),
    (["--config", "missing.json"], "config file not found"),
    (["--config", "nope"], "unknown train config"),
    (["--data", "bogus:x"], "unknown dataset scheme"),
    (["--data", "world:gold_det"], "world:SPLIT:SEED"),
    (["--data", "world:gold_det:0:5:-1"], "weight must be a positive"),
    (["--data", "odvg:/nonexistent.jsonl"], "file not found"),
    (["--init-from", "glip-t"], "is a preset"),
])
def test_nonsense_fails_with_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    rc = main(["train", "--config", "tiny", "--out", str(out), "--no-progress", "--device", "cpu", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (out / "model").exists() and not (out / "last.pt").exists()


def test_captions_only_data_is_refused_with_the_way_forward(tmp_path, capsys):
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--data", "world:web:0:4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "label them first" in err[0]
