"""The benchmark script runs end to end (figures are printed by `python -m glip bench`, never asserted)."""
from test_model import SMALL

from glip import GLIP
from glip.bench import format_rows, run_bench


def test_bench_smoke():
    rows = run_bench(height=96, width=128, runs=1, device="cpu", model=GLIP(SMALL))
    names = [r[0] for r in rows]
    assert any("backbone" in n for n in names) and any("re-threshold" in n for n in names)
    assert all(mn > 0 and md >= mn for _, mn, md in rows)
    assert "median" in format_rows(rows, "t")
