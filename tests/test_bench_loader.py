"""The loader benchmark runs end to end through ``tikmix bench loader`` (tiny sizes; no numbers checked), and
its usage names it so."""

import pytest

from tikmix_loader.cli import main


def test_bench_loader_smoke(tmp_path, capsys):
    args = ["bench", "loader", "--batches", "3", "--repeats", "1", "--docs-per-domain", "40"]
    args += ["--doc-tokens", "64", "--seq-len", "32", "--batch-size", "4", "--workers", "0"]
    args += ["--data-dir", str(tmp_path)]
    assert main(args) == 0
    table = capsys.readouterr().out
    for provider in ("streaming", "mixture_loader", "memmap"):
        assert provider in table
    assert "vs streaming" in table


def test_bench_loader_quality_smoke(tmp_path, capsys):
    args = ["bench", "loader", "--quality", "--batches", "3", "--repeats", "1", "--docs-per-domain", "40"]
    args += ["--doc-tokens", "64", "--seq-len", "32", "--batch-size", "4", "--workers", "0"]
    args += ["--data-dir", str(tmp_path)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "without quality" in table and "with quality" in table and "vs without" in table


def test_bench_usage_names_the_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "loader", "--help"])
    assert capsys.readouterr().out.startswith("usage: tikmix bench loader [-h]")
