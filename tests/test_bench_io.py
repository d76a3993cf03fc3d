"""`tikmix bench io` runs end to end on a tiny budget and prints every case with its baseline ratio."""

from tikmix_loader.cli import main


def test_bench_io_smoke(capsys):
    assert (
        main(["bench", "io", "--megabytes", "0.05", "--repeats", "1", "--open-docs", "300", "--vocab", "300"])
        == 0
    )
    out = capsys.readouterr().out
    for case in ("convert, 1 worker (baseline)", "convert, 2 workers", "first open, scan (baseline)"):
        assert case in out
    assert "first open, conversion index" in out and "x\n" in out
    assert "in the local cache after open 0, after the first read 1" in out
