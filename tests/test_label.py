"""`glip label` (glip.label): the replaced labeller's output reproduced, bad samples rejected and listed,
kill -9 + --resume byte-identical, --shard I/N splits, an unwritable --out fails before any work."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glip.datasets import Record, open_dataset, write_dataset
from glip.datasets.odvg import check_odvg
from glip.datasets.webdataset import write_webdataset
from glip.errors import ConfigError, ImageError, PromptError
from glip.label import (
    LabelSettings,
    known_vocabulary,
    label,
    label_pair,
    label_shard,
    prepare,
    read_vocabulary,
    resolve_score_words,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "label-golden" / "toy-teacher_web_s0_16.jsonl"
MICRO = dict(min_size_test=128, max_size_test=128, num_dyhead_blocks=1, swin_embed_dim=16,
             swin_num_heads=(1, 2, 4, 8), fusion_embed_dim=64, channels=32)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A small random GLIP saved in our format (text encoder refilled from the pip package)."""
    from glip.config import get_preset
    from glip.model import GLIP

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "model"
    GLIP(get_preset("toy").replace(**MICRO)).save_pretrained(path, exclude_text_encoder=True)
    return path


@pytest.fixture(scope="module")
def model(micro):
    """The micro model with a lower candidate threshold: untrained, its scores sit near the 0.01 prior, under
    the 0.05 default, and it would keep no box at all."""
    from glip.model import GLIP

    m = GLIP.from_pretrained(micro, device="cpu")
    m.config.inference_th = 0.01
    return m


def _png(w=40, h=30) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """WebDataset shards of 3 world web pairs plus a corrupt image, an empty caption and a caption with
    no noun phrase (shards of 3 samples)."""
    d = tmp_path_factory.mktemp("corpus")
    recs = list(open_dataset("world:web:0:3"))
    recs.insert(1, Record(key="corrupt", file_name="corrupt.jpg", image=b"\xff\xd8 this is no jpeg", caption="a red circle"))
    recs.insert(4, Record(key="empty", file_name="empty.png", image=_png(), caption=""))
    recs.append(Record(key="nonp", file_name="nonp.png", image=_png(), caption="!!! ???"))
    write_webdataset(recs, d, shard_size=3)
    return f"webdataset:{d}"


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith("summary")}


# ---------------------------------------------------------------- the replaced labeller's output
def test_label_reproduces_the_replaced_labeller_on_the_toy_chain(tmp_path):
    """The toy chain's labelling step (toy-teacher, one box per phrase, known-word scoring from the teacher's
    vocabulary.txt) writes exactly the golden records of the labeller it replaced."""
    from glip.__main__ import main

    rc = main(["label", "--model", "toy-teacher", "--data", "world:web:0:8", "--out", str(tmp_path / "o"),
               "--score-words", "known", "--max-per-phrase", "1", "--threads", "2", "--no-progress"])
    assert rc == 0
    golden = GOLDEN.read_bytes().splitlines(keepends=True)[:8]
    assert (tmp_path / "o" / "shards" / "00000.jsonl").read_bytes() == b"".join(golden)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["settings"]["score_words"] == sorted(known_vocabulary("toy-teacher"))
    assert m["shards"][0]["records"] == 8 and m["shards"][0]["rejects"] == 0


# ---------------------------------------------------------------- bad samples
def test_bad_samples_are_rejected_and_listed_the_rest_is_valid(model, corpus, tmp_path):
    s = label(model, corpus, tmp_path / "o", threshold=0.0, batch_size=2, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["key"], r["reason"]) for r in rejects} == {
        ("00000/corrupt", "unreadable image"), ("00001/empty", "empty caption"), ("00001/nonp", "no noun phrase")}
    assert "corrupt or not an image" in next(r["detail"] for r in rejects if r["key"] == "00000/corrupt")
    assert s["pairs"] == 3 and s["rejects"] == 3 and s["shards"] == 2
    assert sum(s["score_histogram"].values()) == s["regions"] > 0
    world = {r.file_name: r for r in open_dataset("world:web:0:3")}
    n = 0
    for shard in sorted((tmp_path / "o" / "shards").glob("0000?.jsonl")):
        for line in shard.read_text().splitlines():
            rec = json.loads(line)
            check_odvg(rec)  # boxes with positive size, spans inside the caption, scores in [0, 1]
            name = rec["filename"].split("/", 1)[1]
            assert rec["grounding"]["caption"] == world[name].caption
            assert (rec["width"], rec["height"]) == world[name].load_image().size
            cap = rec["grounding"]["caption"]
            for g in rec["grounding"]["regions"]:
                x1, y1, x2, y2 = g["bbox"]
                assert 0 <= x1 < x2 <= rec["width"] and 0 <= y1 < y2 <= rec["height"]
                assert g["score"] > 0.0
                assert all(cap[b:e].lower() == g["phrase"] for b, e in g["tokens_positive"])
            n += 1
    assert n == 3


def test_prepare_names_every_reason(monkeypatch):
    st = LabelSettings()
    ok = Record(key="a", file_name="a.png", image=_png(), caption="a red circle")
    assert prepare(ok, st).prompt.phrases == ["a red circle"]
    cases = {"malformed record": Record(key="m", file_name="", error="f.jsonl:3: invalid JSON"),
             "no caption": Record(key="n", file_name="n.png", image=_png()),
             "caption not text": Record(key="t", file_name="t.png", image=_png(), caption=5),
             "empty caption": Record(key="e", file_name="e.png", image=_png(), caption="  "),
             "unreadable image": Record(key="u", file_name="u.png", image=None, caption="a cat")}
    for reason, rec in cases.items():
        assert prepare(rec, st)["reason"] == reason
    import glip.datasets.records as records

    monkeypatch.setattr(records, "MAX_PIXELS", 100)
    big = prepare(Record(key="b", file_name="b.png", image=_png(), caption="a cat"), st)
    assert big["reason"] == "image too large" and "40×30" in big["detail"]


# ---------------------------------------------------------------- resume, shards, output safety
KILLED = """
import sys, time, torch
torch.set_num_threads(1)
from glip.model import GLIP
from glip.label import label
m = GLIP.from_pretrained(sys.argv[1], device="cpu")
m.config.inference_th = 0.01
predict = m.predict
def slow(*a, **k):
    time.sleep(1.0)
    return predict(*a, **k)
m.predict = slow
label(m, sys.argv[2], sys.argv[3], threshold=0.0, batch_size=2, records_per_shard=2, model_name="micro", progress=False)
"""


@pytest.mark.parametrize("max_per_phrase", [1, None])
def test_one_pair_is_labelled_as_the_command_labels_it(model, max_per_phrase):
    """`label_pair` (the app's Teacher vs student) keeps exactly the regions that `label_shard` writes for the
    same pair labelled alone, on the caption's own noun-phrase prompt."""
    from glip.data import KNOWN_WORDS

    settings = LabelSettings(threshold=0.0, batch_size=1, max_per_phrase=max_per_phrase, score_words=KNOWN_WORDS)
    recs = list(open_dataset("world:web:0:3"))
    lines = label_shard(model, recs, settings).records
    for rec, line in zip(recs, lines):
        res = label_pair(model, rec.load_image(), rec.caption, settings)
        regions = line["grounding"]["regions"]
        assert len(res) == len(regions) > 0
        assert res.prompt.caption == rec.caption and res.prompt.spans == prepare(rec, settings).prompt.spans
        for i, r in enumerate(regions):
            assert res.phrases[i] == r["phrase"] and [list(x) for x in res.spans(i)] == r["tokens_positive"]
            np.testing.assert_allclose(res.boxes[i], r["bbox"], atol=0.006)
            assert abs(float(res.scores[i]) - r["score"]) < 6e-5
    with pytest.raises(PromptError, match="no noun phrase"):
        label_pair(model, recs[0].load_image(), "and so on", settings)
    with pytest.raises(ImageError, match="corrupt or not an image"):
        label_pair(model, b"not an image", "a red circle", settings)


def test_kill_9_then_resume_is_byte_identical_to_an_uninterrupted_run(micro, model, tmp_path):
    data = "world:web:0:6"
    kw = dict(threshold=0.0, batch_size=2, records_per_shard=2, model_name="micro", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process
    try:
        label(model, data, tmp_path / "whole", **kw)
        script = tmp_path / "killed.py"
        script.write_text(KILLED)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, str(script), str(micro), data, str(tmp_path / "run")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        manifest, done = tmp_path / "run" / "manifest.json", 0
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file():
                try:
                    done = len(json.loads(manifest.read_text())["shards"])
                except json.JSONDecodeError:  # never: the manifest is replaced atomically
                    raise
                if done >= 1:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 1 <= done < 3, proc.stderr.read().decode()[-2000:]
        with pytest.raises(ConfigError, match="--resume"):
            label(model, data, tmp_path / "run", **kw)
        s = label(model, data, tmp_path / "run", resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    assert s["this_run"]["shards_skipped"] >= 1 and s["shards"] == 3
    assert files(tmp_path / "run") == files(tmp_path / "whole")


def test_shards_i_of_n_split_the_corpus(model, corpus, tmp_path):
    kw = dict(threshold=0.0, batch_size=2, progress=False)
    label(model, corpus, tmp_path / "whole", **kw)
    a = label(model, corpus, tmp_path / "split", shard="0/2", **kw)
    b = label(model, corpus, tmp_path / "split", shard=(1, 2), **kw)
    assert (a["shards"], b["shards"]) == (1, 1) and a["manifest"] == "manifest.0-of-2.json"
    whole, split = files(tmp_path / "whole"), files(tmp_path / "split")
    assert {k: v for k, v in split.items() if k.startswith("shards/")} == \
           {k: v for k, v in whole.items() if k.startswith("shards/")}
    rejects = lambda d, names: sorted(line for n in names for line in (d / n).read_text().splitlines())  # noqa: E731
    assert rejects(tmp_path / "split", ["rejects.0-of-2.jsonl", "rejects.1-of-2.jsonl"]) == \
           rejects(tmp_path / "whole", ["rejects.jsonl"])
    assert [r.caption for r in open_dataset(f"odvg:{tmp_path / 'whole'}")] == \
           [r.caption for r in open_dataset(f"odvg:{tmp_path / 'split'}")]
    from glip.data import from_odvg  # what the toy chain's trainer reads (`--pseudo OUT`)

    assert [r["grounding"]["caption"] for r in from_odvg(tmp_path / "split")] == \
           [r.caption for r in open_dataset(f"odvg:{tmp_path / 'whole'}")] and len(from_odvg(tmp_path / "whole")) == 3


def test_resume_refuses_other_settings(model, tmp_path):
    label(model, "world:web:0:2", tmp_path / "o", threshold=0.0, progress=False)
    with pytest.raises(ConfigError, match="other settings \\(threshold\\)"):
        label(model, "world:web:0:2", tmp_path / "o", threshold=0.3, resume=True, progress=False)


def test_a_slice_never_writes_over_another_slicing_or_settings(model, corpus, tmp_path):
    kw = dict(threshold=0.0, batch_size=2, progress=False)
    label(model, corpus, tmp_path / "o", **kw)
    before = files(tmp_path / "o")
    with pytest.raises(ConfigError, match="split 1 way.*--shard I/1"):
        label(model, corpus, tmp_path / "o", shard="1/2", **kw)
    with pytest.raises(ConfigError, match="split 1 way"):
        label(model, corpus, tmp_path / "o", shard="1/2", resume=True, **kw)
    assert files(tmp_path / "o") == before
    label(model, corpus, tmp_path / "s", shard="0/2", **kw)
    with pytest.raises(ConfigError, match="another slice of this run used other settings \\(threshold\\)"):
        label(model, corpus, tmp_path / "s", shard="1/2", **{**kw, "threshold": 0.9})
    with pytest.raises(ConfigError, match="split 2 way"):
        label(model, corpus, tmp_path / "s", **kw)


def test_labelling_stops_before_any_work_on_what_cannot_succeed(model, tmp_path, capsys):
    """A precision the device cannot run, or data without captions, would reject every pair and mark the shards
    complete: both stop with one line, before a manifest is written."""
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA device"):
        label(model, "world:web:0:2", tmp_path / "fp16", threshold=0.0, precision="fp16", progress=False)
    assert not (tmp_path / "fp16" / "manifest.json").exists()
    from glip.__main__ import main

    assert main(["label", "--model", "toy-teacher", "--data", "world:gold_det:0:2", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "labelling needs image–caption pairs" in err and "detection" in err and "\n" not in err
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_an_image_over_the_pixel_limit_is_too_large_not_corrupt(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a valid PNG header announcing 60000×60000 pixels (PIL refuses it in `open`, before any decoding)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    rec = Record(key="huge", file_name="huge.png", image=png, caption="a red circle")
    got = prepare(rec, LabelSettings())
    assert got["reason"] == "image too large" and "too large" in got["detail"]


class Spy:
    calls = 0

    def eval(self):
        return self

    def predict(self, *a, **k):
        Spy.calls += 1
        raise AssertionError("no work may start")


def test_unwritable_out_fails_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "out"
    with pytest.raises(ConfigError, match="cannot write to the output folder"):
        label(Spy(), "world:web:0:2", bad, progress=False)
    assert Spy.calls == 0
    from glip.__main__ import main
    from glip.model import GLIP

    monkeypatch.setattr(GLIP, "from_pretrained", classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError)))
    assert main(["label", "--model", "toy-teacher", "--data", "world:web:0:2", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write to the output folder") and "\n" not in err
    assert main(["label", "--model", "toy-teacher", "--data", "nope:x", "--out", str(tmp_path / "o")]) == 2
    assert "unknown dataset scheme 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # stopped before writing: no empty folder left behind
    (tmp_path / "kept").mkdir()
    assert main(["label", "--model", "toy-teacher", "--data", "nope:x", "--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


# ---------------------------------------------------------------- the per-shard unit
def test_background_reader_gives_the_same_labels_and_passes_errors_on(model):
    recs = list(open_dataset("world:web:2:3"))
    st = LabelSettings(threshold=0.0, batch_size=2)
    a, b = label_shard(model, recs, st, prefetch=0), label_shard(model, recs, st, prefetch=2)
    assert a.records == b.records and len(a.records) == 3

    def broken():
        yield recs[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        label_shard(model, broken(), st, prefetch=2)


def test_score_words_from_the_model_or_a_file(micro, tmp_path):
    assert resolve_score_words("all") == "all" and resolve_score_words("content") == "content"
    with pytest.raises(ConfigError, match="no vocabulary.txt"):
        resolve_score_words("known", micro)
    (tmp_path / "v.txt").write_text("# colours\nRed\n\nblue  # and blue\n")
    assert read_vocabulary(tmp_path / "v.txt") == {"red", "blue"}
    assert resolve_score_words(str(tmp_path / "v.txt")) == {"red", "blue"}
    with pytest.raises(ConfigError, match="not found"):
        resolve_score_words(str(tmp_path / "none.txt"))
    from glip.data import KNOWN_WORDS, NOVEL_WORDS

    assert known_vocabulary("toy-teacher") == KNOWN_WORDS and known_vocabulary(micro) is None
    assert known_vocabulary("toy-student") == KNOWN_WORDS | NOVEL_WORDS  # the teacher's words and the learned ones


def test_exported_shards_label_like_the_world(model, tmp_path):
    """The toy chain can run on the world's exported WebDataset shards: the same labels (file names
    gain the shard folder)."""
    write_dataset("world:web:0:4", "webdataset", tmp_path / "shards", shard_size=2)
    kw = dict(threshold=0.0, batch_size=2, records_per_shard=2, progress=False)
    label(model, "world:web:0:4", tmp_path / "a", **kw)
    label(model, f"webdataset:{tmp_path / 'shards'}", tmp_path / "b", **kw)
    read = lambda d: [json.loads(x) for p in sorted((d / "shards").glob("0000?.jsonl"))  # noqa: E731
                      for x in p.read_text().splitlines()]
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert [x["filename"] for x in b] == [f"{k // 2:05d}/{x['filename']}" for k, x in enumerate(a)]
    assert [x["grounding"] for x in a] == [x["grounding"] for x in b]
    assert np.array_equal(*(np.asarray(r.load_image()) for r in (next(iter(open_dataset("world:web:0:1"))),
                                                                 next(iter(open_dataset(f"webdataset:{tmp_path / 'shards'}"))))))


def test_label_bench_runs_every_mode_on_the_chosen_precision(tmp_path, capsys, monkeypatch):
    """The throughput benchmark times the four modes on the same pairs and says what it ran on; the
    one-by-one loop is its own baseline, at the same precision as the batches."""
    from glip.label_bench import main
    from glip.model import GLIP

    seen = []
    predict = GLIP.predict
    monkeypatch.setattr(GLIP, "predict", lambda self, *a, **k: seen.append(k["precision"]) or predict(self, *a, **k))
    out = tmp_path / "rows.json"
    assert main(["--data", "world:web:0:4", "--batch-size", "2", "--repeats", "1", "--threads", "1",
                 "--precision", "bf16", "--json", str(out)]) == 0
    assert "(4 pairs) on cpu, bf16, batch 2" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["read only", "predict one by one", "batch, foreground", "batch, background"]
    assert all(r["pairs_per_s"] > 0 and r["min_s"] <= r["median_s"] for r in rows)
    assert rows[1]["speed-up vs one by one"] == 1.0
    assert seen and set(seen) == {"bf16"}


@pytest.mark.parametrize("args, says", [
    (["--data", "nope:xyz"], "unknown dataset scheme 'nope'"),
    (["--model", "/nonexistent.pth"], "Unknown model '/nonexistent.pth'"),
    (["--precision", "fp64"], "invalid choice: 'fp64'"),
    pytest.param(["--device", "cuda"], "Device 'cuda' is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_label_bench_reports_bad_input_in_one_line(args, says, capsys):
    from glip.label_bench import main

    try:
        rc = main(args + ["--repeats", "1"])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and says in err and "\n" not in err
