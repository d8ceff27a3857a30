"""Every bad argument or input of `python -m glip predict|convert|parity|bench` ends with exactly one line
on stderr and a non-zero exit code, never a traceback."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from glip.__main__ import main
from glip.cli_args import device, int_range, positive_int, probability, threads

FX = REPO / "tests" / "fixtures" / "glip-official-tiny"
IMAGE = str(FX / "image.png")


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err) -> str:
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """A model folder whose config.json claims 20000-wide Swin embeddings (tensors: 16)."""
    from glip import GLIP, get_preset

    out = tmp_path_factory.mktemp("bad")
    cfg = get_preset("toy").replace(num_dyhead_blocks=1, swin_embed_dim=16, swin_num_heads=(1, 2, 4, 8),
                                    fusion_embed_dim=64, channels=32)
    GLIP(cfg).save_pretrained(out, exclude_text_encoder=True)
    d = json.loads((out / "config.json").read_text())
    d["swin_embed_dim"] = 20000
    (out / "config.json").write_text(json.dumps(d))
    return out


CASES = {
    "device banana": (["predict", "--image", IMAGE, "--prompt", "dog", "--device", "banana"], "Unknown device 'banana'"),
    "threads 0": (["parity", str(FX), "--threads", "0"], "--threads: must be ≥ 1"),
    "threads x": (["parity", str(FX), "--threads", "x"], "--threads: expected a whole number"),
    "bench preset bogus": (["bench", "--preset", "bogus"], "invalid choice: 'bogus'"),
    "bench runs 0": (["bench", "--runs", "0"], "--runs: must be in 1..1000"),
    "bench height negative": (["bench", "--height", "-5"], "--height: must be in 32..8192"),
    "bench fp16 on cpu": (["bench", "--preset", "toy", "--device", "cpu", "--precision", "fp16"], "needs a CUDA device"),
    "parity of a file": (["parity", IMAGE], "is not a folder"),
    "parity of an empty folder": (["parity", str(REPO / "tests")], "lacks io.pt, model.pth, config.json"),
    "parity negative atol": (["parity", str(FX), "--atol", "-1"], "--atol: must be ≥ 0"),
    "threshold 2": (["predict", "--image", IMAGE, "--prompt", "dog", "--threshold", "2"], "--threshold: must be in [0, 1]"),
    "threshold nan": (["predict", "--image", IMAGE, "--prompt", "dog", "--threshold", "nan"], "expected a finite number"),
    "nms 0": (["predict", "--image", IMAGE, "--prompt", "dog", "--nms-iou", "0"], "--nms-iou: must be in (0, 1]"),
    "max dets 0": (["predict", "--image", IMAGE, "--prompt", "dog", "--max-dets", "0"], "--max-dets: must be in 1..1000"),
    "min size 8": (["predict", "--image", IMAGE, "--prompt", "dog", "--min-size", "8"], "--min-size: must be in 32..4096"),
    "out unknown type": (["predict", "--image", IMAGE, "--prompt", "dog", "--out", "x.unknown"], "unknown image type"),
    "out in a missing folder": (["predict", "--image", IMAGE, "--prompt", "dog", "--out", "/no/such/dir/x.png"],
                                "does not exist"),
    "missing image": (["predict", "--image", "/no/such.png", "--prompt", "dog"], "Image file not found"),
    "image is a folder": (["predict", "--image", str(FX), "--prompt", "dog"], "is a folder, not an image file"),
    "separators only": (["predict", "--image", IMAGE, "--prompt", " . . "], "The prompt has no word in it"),
    "folder spec of a file": (["eval", "--model", "toy", "--data", f"folder:{IMAGE}"], "is a file, not a folder"),
    "jsonl spec of a folder": (["eval", "--model", "toy", "--data", f"jsonl:{FX}"], "is a folder, not a file"),
    "not an image": (["predict", "--image", str(FX / "config.json"), "--prompt", "dog"], "corrupt or not an image"),
    "unknown model": (["predict", "--model", "no-such-model", "--image", IMAGE, "--prompt", "dog"], "Unknown model"),
    "unknown config": (["predict", "--config", "nope.json", "--image", IMAGE, "--prompt", "dog"], "neither a preset"),
    "empty prompt": (["predict", "--image", IMAGE, "--prompt", "  "], "The prompt is empty"),
    "missing argument": (["predict", "--prompt", "dog"], "the following arguments are required: --image"),
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "convert of nothing": (["convert", "/no/such.pth", "out"], "Unknown model"),
    "shard negative": (["label", "--model", "toy", "--data", f"folder:{FX}", "--out", "/tmp/x", "--shard", "-1/4"],
                       "--shard must be I/N with 0 <= I < N (e.g. 0/4), got '-1/4'"),
    "height negative float": (["bench", "--height", "-5.5"], "--height: expected a whole number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_give_one_line(case, capsys):
    argv, expect = CASES[case]
    code, _, err = _run(argv, capsys)
    line = _one_error_line(code, err)
    assert expect in line, line


def test_json_config_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"min_size_test": 800,')
    code, _, err = _run(["predict", "--model", "toy", "--config", str(bad), "--image", IMAGE, "--prompt", "dog"], capsys)
    line = _one_error_line(code, err)
    assert "broken.json: not valid JSON (line 1" in line


def test_config_driven_errors_name_the_key(bad_folder, capsys):
    code, _, err = _run(["predict", "--model", str(bad_folder), "--image", IMAGE, "--prompt", "dog"], capsys)
    assert "swin_embed_dim = 20000 is out of range" in _one_error_line(code, err)
    code, _, err = _run(["convert", str(bad_folder), str(bad_folder.parent / "converted")], capsys)
    assert "swin_embed_dim" in _one_error_line(code, err)


def test_unwritable_output(tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("a file where a folder is needed")
    code, _, err = _run(["convert", "toy", str(out)], capsys)
    assert "cannot write the converted model" in _one_error_line(code, err)


def test_predict_proves_its_out_folder_writable_before_loading_the_model(capsys, monkeypatch):
    from glip.model import GLIP

    monkeypatch.setattr(GLIP, "from_pretrained", classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError)))
    code, _, err = _run(["predict", "--image", IMAGE, "--prompt", "dog", "--out", "/proc/boxes.png"], capsys)
    assert "cannot write to the output folder /proc" in _one_error_line(code, err)  # not writable, even by root


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_on_a_machine_without_it(capsys):
    for argv in (["predict", "--image", IMAGE, "--prompt", "dog", "--device", "cuda"], ["parity", str(FX), "--device", "cuda:1"],
                 ["bench", "--device", "cuda"]):
        code, _, err = _run(argv, capsys)
        assert "is not available" in _one_error_line(code, err)


def test_the_real_entry_point_prints_one_line(bad_folder):
    """The same through `python -m glip` (a fresh interpreter: no warning or log line may leak to stderr)."""
    for argv in (["predict", "--image", IMAGE, "--prompt", "dog", "--device", "banana"],
                 ["predict", "--model", str(bad_folder), "--image", IMAGE, "--prompt", "dog"]):
        r = subprocess.run([sys.executable, "-m", "glip", *argv], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_validators_accept_good_values_and_reject_bad_ones():
    assert positive_int("3") == 3 and threads("2") == 2 and probability("0.25") == 0.25 and int_range(1, 5)("5") == 5
    assert device("auto") == "auto" and device("CPU") == "cpu"
    for fn, text in ((positive_int, "0"), (positive_int, "-3"), (positive_int, "2.5"), (threads, "0"),
                     (probability, "1.01"), (probability, "inf"), (int_range(1, 5), "6"), (device, "banana")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_a_good_prediction_still_works_and_reports_the_image_size(capsys):
    code, out, err = _run(["predict", "--model", str(FX / "model.pth"), "--config", str(FX / "config.json"),
                           "--image", IMAGE, "--prompt", "red circle . person", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    js = json.loads(out)
    assert js["image_size"] == [520, 300] and isinstance(js["detections"], list)


def test_an_error_mid_run_gets_a_line_of_its_own_after_the_progress_bar(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                      {"id": 2, "file_name": "gone.png", "width": 40, "height": 30}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
                           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0}],
           "categories": [{"id": 1, "name": "red square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    code, _, err = _run(["eval", "--model", "toy", "--data", f"coco:{tmp_path / 'ann.json'}:{tmp_path}",
                         "--batch-size", "1"], capsys)
    assert code == 2
    lines = err.replace("\r", "\n").splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "gone.png" in errors[0], err[-500:]


def test_a_data_warning_is_one_line_and_the_command_goes_on(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0}],
           "categories": [{"id": 1, "name": "red square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    code, out, err = _run(["eval", "--model", "toy", "--data", f"coco:{tmp_path / 'ann.json'}:{tmp_path}",
                           "--batch-size", "1"], capsys)
    assert code == 0, err[-500:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("warning")]
    assert lines == [f"warning: {tmp_path / 'ann.json'}: 1 of 2 annotations belong to no image in 'images' and are "
                     f"ignored (the first: annotation 2 with image_id 7)"], err[-800:]
    assert "Traceback" not in err and "DataWarning" not in err

