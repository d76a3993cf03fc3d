"""The microbenchmark harness runs end to end on a tiny shape and reports every provider and column."""

import csv

import pytest
from kernel_cases import CPU_BACKENDS
from tikmix_kernels import bench


def test_smoke_benchmark_reports_every_provider(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--shapes", "smoke", "--repeats", "2", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured copy bandwidth" in printed and "x unfused" in printed

    rows = list(csv.DictReader(out.open()))
    expected = ["naive", "unfused", *(name for name in CPU_BACKENDS if name != "triton")]
    assert [row["provider"] for row in rows] == expected
    for row in rows:
        assert {"date", "machine", "torch", "commit", "p20_ms", "p80_ms", "pct_roofline"} <= row.keys()
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        assert float(row["max_rel_err"]) < 1e-5
        # speedup = baseline median / provider median, measured in this run.
        for baseline in ("naive", "unfused"):
            base = next(r for r in rows if r["provider"] == baseline)
            ratio = float(base["median_ms"]) / float(row["median_ms"])
            assert float(row[f"speedup_vs_{baseline}"]) == pytest.approx(ratio)

    # A second run appends rows under the same header.
    assert bench.main(["--shapes", "smoke", "--repeats", "1", "--csv", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 2 * len(expected)


def test_shape_sets_hold_the_issue_cases():
    assert bench.shape_set("cpu", has_cuda=False) == [bench.CPU_CASE]
    assert (bench.CPU_CASE.batch, bench.CPU_CASE.seq, bench.CPU_CASE.d_in, bench.CPU_CASE.k) == (
        8,
        512,
        1024,
        32,
    )
    assert (bench.GPU_CASE.tokens, bench.GPU_CASE.d_in, bench.GPU_CASE.k, bench.GPU_CASE.dtype) == (
        16384,
        4096,
        64,
        "bfloat16",
    )
    assert bench.shape_set("gpu", has_cuda=False) == []
    assert bench.GPU_CASE in bench.shape_set("auto", has_cuda=True)
    assert all(shape.device == "cpu" for shape in bench.shape_set("sweep", has_cuda=False))
