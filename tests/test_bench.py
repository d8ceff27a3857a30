"""The benchmark: its JSON schema and --compare round trip, FLOP counting (positive, and fewer FLOPs for the
re-associated X-MHA), on a tiny model. Figures are printed by `python -m glip bench`, never asserted."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_model import SMALL

from glip import GLIP
from glip.bench import BenchResult, Row, count_flops, format_compare, format_result, gemm_rate, load_result, run_bench
from glip.fusion import BiMultiHeadAttention

KEYS = {"backbone", "language", "head_full", "head_cropped", "post", "predict", "new_prompt", "new_image", "rethreshold"}


@pytest.fixture(scope="module")
def result():
    return run_bench(height=96, width=128, runs=1, device="cpu", model=GLIP(SMALL), sizes=(64,))


def test_rows_schema_and_flops(result):
    keys = [r.key for r in result.rows]
    assert KEYS | {"predict_64"} == set(keys) and len(keys) == len(set(keys))
    by = {r.key: r for r in result.rows}
    assert all(r.min_s > 0 and r.median_s >= r.min_s for r in result.rows)
    for k in ("backbone", "language", "head_full", "head_cropped", "predict", "new_prompt", "new_image", "predict_64"):
        assert by[k].gflop > 0 and by[k].floor_s > 0, k
    assert by["rethreshold"].gflop < 0.01 * by["predict"].gflop  # the cached head: post-processing only
    # what the caches skip, the FLOPs show: a new prompt skips the backbone, a new image skips BERT
    assert by["new_prompt"].gflop == pytest.approx(by["predict"].gflop - by["backbone"].gflop, rel=1e-6)
    assert by["head_cropped"].gflop < by["head_full"].gflop and by["predict_64"].gflop < by["predict"].gflop
    assert result.meta["gemm_gflops"] > 0 and result.meta["prompt_tokens"] < result.meta["tokens"]
    rates = result.meta["gemm_gflops_by_library"]  # the floor is the fastest library's rate, not the one in use
    assert result.meta["gemm_gflops"] == max(rates.values()) and result.meta["gemm_library"] in rates
    for r in result.rows:  # floor = FLOPs at the measured GEMM rate
        assert r.floor_s == pytest.approx(r.gflop / result.meta["gemm_gflops"])
    text = format_result(result)
    assert "÷ floor" in text and "predict at 64×" in text
    assert len(rates) < 2 or f"inference on {result.meta['gemm_library']}" in text.splitlines()[0]


def test_json_round_trip_and_compare(result, tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(result.to_json()))
    d = json.loads(path.read_text())
    assert {"meta", "rows"} <= set(d) and {"key", "name", "min_s", "median_s", "gflop", "floor_s", "over_floor"} <= set(d["rows"][0])
    ref = load_result(path)
    assert [asdict_row(r) for r in ref.rows] == [asdict_row(r) for r in result.rows]
    # a run twice as fast on every stage compares as 2.00x
    fast = BenchResult(dict(result.meta), [Row(r.key, r.name, r.min_s / 2, r.median_s / 2, r.gflop, r.floor_s) for r in result.rows])
    lines = format_compare(fast, ref).splitlines()
    assert len(lines) == 2 + len(result.rows)
    assert all("2.00x" in line for line in lines[2:])


def asdict_row(r: Row):
    return (r.key, r.name, r.min_s, r.median_s, r.gflop, r.floor_s)


def test_cli_json_and_compare(tmp_path):
    args = [sys.executable, "-m", "glip", "bench", "--preset", "toy", "--height", "64", "--width", "96", "--runs", "1"]
    out = subprocess.run(args + ["--json"], cwd=REPO, capture_output=True, text=True, check=True)
    (tmp_path / "ref.json").write_text(out.stdout)
    assert {r["key"] for r in json.loads(out.stdout)["rows"]} == KEYS
    cmp = subprocess.run(args + ["--compare", str(tmp_path / "ref.json")], cwd=REPO, capture_output=True, text=True, check=True)
    assert "speed-up" in cmp.stdout and "predict, nothing cached" in cmp.stdout.split("speed-up")[1]


def test_reassociated_xmha_executes_fewer_flops():
    attn = BiMultiHeadAttention(256, 768, 2048, 8).eval()
    v, l, mask = torch.randn(1, 2000, 256), torch.randn(1, 22, 768), torch.ones(1, 22, dtype=torch.long)
    flops = {}
    with torch.no_grad():
        for path in ("direct", "reassociated"):
            attn.path = path
            flops[path] = count_flops(lambda: attn(v, l, mask))
    # counted FLOPs are the multiply-add estimate the path choice uses (×2), plus the text projections
    text = 2 * 22 * (768 * 2048 * 2 + 2048 * 768)
    for path in flops:
        assert flops[path] == 2 * attn.macs(2000, 22, path == "reassociated") + text
    assert flops["reassociated"] < flops["direct"] / 5


def test_dcn_flops_are_counted_on_every_gemm_path(monkeypatch):
    """The DCN's GEMM is counted whether it runs as addmm, matmul (no bias) or MKL's packed linear: 2·P·K·C·O."""
    import glip.dyhead as dyhead
    from glip.dyhead import deform_conv2d

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 16, 20, 25, generator=g), torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
    off, m = torch.randn(1, 18, 20, 25, generator=g), torch.rand(1, 9, 20, 25, generator=g)
    expected = 2 * 20 * 25 * 9 * 16 * 8
    monkeypatch.setattr(dyhead, "CHUNK_ROWS", 9 * 50)
    for pack_min, bias in ((1, b), (10 ** 9, b), (10 ** 9, None), (1, None)):
        monkeypatch.setattr(dyhead, "PACK_MIN_CHUNKS", pack_min)
        with torch.no_grad():
            assert count_flops(lambda: deform_conv2d(x, off, m, w, bias, use_torchvision=False)) == expected


def test_gemm_rate_is_a_rate():
    assert gemm_rate(torch.device("cpu"), n=256, tries=2) > 1e8


def test_fresh_process_peak_memory_loads_from_a_checkpoint():
    from glip.bench import fresh_peak_rss_mb

    peak = fresh_peak_rss_mb("toy", 96, 128)
    assert 50 < peak["load"] <= peak["predict"]  # a high-water mark only rises
    res = BenchResult({"preset": "toy", "height": 96, "width": 128, "device": "cpu", "threads": 1, "precision": "fp32",
                       "runs": 1, "gemm_gflops": 1.0, "load_peak_rss_mb": peak["load"], "peak_rss_mb": peak["predict"]}, [])
    assert f"load from a .pth {peak['load']:.0f} MB" in format_result(res)


def test_official_bench_refuses_a_folder_that_is_not_a_glip_checkout(tmp_path, capsys):
    """The side-by-side timing needs a microsoft/GLIP checkout; anything else is one line and exit code 2,
    before any of its compatibility shims touch the process."""
    from glip.official_bench import main

    (tmp_path / "maskrcnn_benchmark").mkdir()  # half a checkout: the config is missing
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a microsoft/GLIP checkout" in err and "\n" not in err
    assert "torch._six" not in sys.modules and "maskrcnn_benchmark._C" not in sys.modules


def test_official_bench_names_the_missing_official_dependency(tmp_path, capsys, monkeypatch):
    """A checkout without yacs installed (the official config system) is one line naming the package, again
    before any shim touches the process."""
    from glip.official_bench import CONFIG, main

    (tmp_path / CONFIG).parent.mkdir(parents=True)
    (tmp_path / CONFIG).write_text("MODEL: {}\n")
    (tmp_path / "maskrcnn_benchmark").mkdir()
    monkeypatch.setitem(sys.modules, "yacs", None)  # makes `import yacs` fail, installed or not
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the official code needs yacs: pip install yacs"
    assert "torch._six" not in sys.modules and "maskrcnn_benchmark._C" not in sys.modules
