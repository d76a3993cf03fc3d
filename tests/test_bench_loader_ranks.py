"""The per-rank benchmark and the quota fuzz run end to end at tiny sizes, and their figures hold."""

from tikmix_loader._bench_commands import _repo_benchmark


def test_bench_loader_ranks_smoke(capsys):
    args = ["--world-sizes", "1", "4", "--global-batch", "8", "--seq-len", "16", "--batches", "2"]
    args += ["--repeats", "1", "--ranks", "2", "--docs-per-domain", "40", "--doc-tokens", "32"]
    _repo_benchmark("bench_loader_ranks").main(args)
    table = capsys.readouterr().out.split("fit of")[0]  # the per-W table, before the scaling fit's
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [row[:2] for row in rows] == [["1", "8"], ["4", "2"]]
    for row in rows:  # tokens read is exactly the rank's share: 8 / W samples of 17 tokens
        assert row[2].replace(",", "") == row[3].replace(",", "") and row[4] == "1.00x"


def test_fuzz_quota_smoke(capsys):
    result = _repo_benchmark("fuzz_quota").fuzz(histories=20, batches=50)
    assert result["max_error"] < 1
    _repo_benchmark("fuzz_quota").main(["--histories", "2", "--batches", "5"])
    assert "max |served - target|" in capsys.readouterr().out


def test_scaling_fit_recovers_the_fixed_and_share_parts(capsys):
    bench = _repo_benchmark("bench_loader_ranks")
    times = {world_size: 2e-4 + 1e-2 / world_size for world_size in (1, 8, 64, 1024)}
    fixed, share = bench.scaling_fit(times)
    assert abs(fixed - 2e-4) < 1e-12 and abs(share - 1e-2) < 1e-12
    bench.print_scaling_fit(times)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    # Without the fixed part the time falls exactly as 1/W: its speedup is W.
    assert [row[-1] for row in rows] == ["1.0x", "8.0x", "64.0x", "1024.0x"]
