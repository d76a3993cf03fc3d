"""``tikmix bench {counterfactual,io,kernels,loader,quadmix,scorers}``: run a benchmark from the console
script (extra arguments go to it)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from tikmix_loader.errors import ConfigError

REPO_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _repo_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` of the source tree (benchmarks are not in the installed package)."""
    path = REPO_BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: `tikmix bench` runs benchmarks from a source checkout of tikmix-loader."
        )
    spec = importlib.util.spec_from_file_location(f"tikmix_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the body runs
    spec.loader.exec_module(module)
    return module


BENCHMARKS = {
    "loader": (
        "MixtureLoader vs mosaicml-streaming vs a plain memmap DataLoader",
        lambda: _repo_benchmark("bench_loader"),
    ),
    "io": (
        "tikmix convert on 1 vs 2 processes, first open with vs without the index, lazy remote shards",
        lambda: _repo_benchmark("bench_io"),
    ),
    "counterfactual": (
        "does Group Influence rank mixtures like paired training branches do? (issue 14)",
        lambda: _repo_benchmark("bench_counterfactual"),
    ),
    "scorers": (
        "quality scorers vs injected noise: ROC AUC per noise kind, scoring time (issue 13)",
        lambda: _repo_benchmark("bench_scorers"),
    ),
    "quadmix": (
        "QuaDMix vs uniform documents and top-k filters on a corpus with injected noise (issue 13)",
        lambda: _repo_benchmark("bench_quadmix"),
    ),
    "kernels": (
        "fused projected-gradient kernels vs naive and unfused torch",
        lambda: importlib.import_module("tikmix_kernels.bench"),
    ),
}


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="run a benchmark and print its table (`tikmix bench loader --help`)"
    )
    bench.add_argument(
        "target", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[0]}" for k, v in BENCHMARKS.items())
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Run the benchmark's ``main``; its usage and errors name it ``tikmix bench NAME`` (argparse takes the
    program name from ``sys.argv[0]``, which is ``tikmix``)."""
    module = BENCHMARKS[args.target][1]()
    program = sys.argv[0]
    sys.argv[0] = f"tikmix bench {args.target}"
    try:
        return module.main(args.bench_args) or 0
    finally:
        sys.argv[0] = program
