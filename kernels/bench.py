"""Microbenchmarks of project_grads: our backends against the naive and unfused torch baselines, in one run.

Run ``python -m tikmix_kernels.bench [--shapes auto|cpu|gpu|sweep|all] [--repeats N] [--csv PATH]``
(also ``tikmix bench kernels``). For each shape and provider it prints the median and p20/p80 time, the
achieved GB/s (X, G, P_in and P_out read once plus Phi written: the fused kernel's minimum traffic), that as a
percentage of the device's copy bandwidth measured in the same run (a large ``Tensor.copy_``), GFLOP/s of the
factored computation, ``speedup = baseline median / provider median`` against both baselines, and the max
error relative to an fp64 reference.

Providers: ``naive`` (materialise every segment's W_s, then project; ``reference.project_grads_naive``),
``unfused`` (two matmuls, an [N, k, k] outer-product temporary, ``index_add_``;
``reference.project_grads_unfused``) and every backend ``available_backends`` lists for the device, through
the public ``project_grads`` (input checks included). The Triton interpreter is never timed. The baselines
are the functions the tests check, imported from one place.

GPU timings use ``triton.testing.do_bench`` (L2 flushed between runs); CPU timings a warmed-up
``time.perf_counter`` loop, because ``torch.utils.benchmark`` reports no percentiles for single runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tikmix_kernels import available_backends, project_grads, projection
from tikmix_kernels.reference import project_grads_naive, project_grads_unfused

BASELINES = {"naive": project_grads_naive, "unfused": project_grads_unfused}


@dataclass(frozen=True)
class BenchShape:
    """One benchmark case: a [B, T] batch through one Linear of d_in -> d_out, projected to k x k."""

    name: str
    batch: int
    seq: int
    d_in: int
    d_out: int
    k: int
    dtype: str
    device: str

    @property
    def tokens(self) -> int:
        """N = B * T."""
        return self.batch * self.seq


def _sweep(device: str, dtype: str) -> list[BenchShape]:
    cases = [
        (4, 256, 512, 512, 16),
        (8, 512, 1024, 1024, 32),
        (4, 1024, 2048, 768, 64),
        (16, 128, 768, 3072, 32),
    ]
    return [
        BenchShape(f"sweep-{b}x{t}-{di}x{do}-k{k}", b, t, di, do, k, dtype, device)
        for b, t, di, do, k in cases
    ]


CPU_CASE = BenchShape("cpu-case", 8, 512, 1024, 1024, 32, "float32", "cpu")
GPU_CASE = BenchShape("gpu-reference", 8, 2048, 4096, 4096, 64, "bfloat16", "cuda")
SMOKE_CASE = BenchShape("smoke", 2, 16, 24, 20, 4, "float32", "cpu")


def shape_set(name: str, *, has_cuda: bool) -> list[BenchShape]:
    """The shapes of ``--shapes name``; GPU shapes only when CUDA is present."""
    gpu = [GPU_CASE] if has_cuda else []
    sweep = _sweep("cuda", "bfloat16") if has_cuda else _sweep("cpu", "float32")
    sets = {
        "auto": [CPU_CASE, *gpu],
        "cpu": [CPU_CASE],
        "gpu": gpu,
        "sweep": sweep,
        "all": [CPU_CASE, *gpu, *sweep],
        "smoke": [SMOKE_CASE],
    }
    return sets[name]


def _time_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up: first-call allocations, lazy native loading
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = np.percentile(samples, [50, 20, 80])
    return float(median), float(p20), float(p80)


def _time_cuda(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(100, 10 * repeats))
    return median, p20, p80


def time_ms(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float, float]:
    """Median, p20 and p80 wall time of ``fn()`` in milliseconds."""
    return _time_cuda(fn, repeats) if device == "cuda" else _time_cpu(fn, repeats)


def copy_bandwidth_gbps(device: str, repeats: int) -> float:
    """Measured peak bandwidth: bytes read plus written by ``dst.copy_(src)`` of a buffer far beyond cache."""
    n_bytes = (1 << 30) if device == "cuda" else (1 << 27)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * n_bytes / (median * 1e-3) / 1e9


def _inputs(shape: BenchShape) -> dict:
    dtype = getattr(torch, shape.dtype)
    generator = torch.Generator(device=shape.device).manual_seed(0)
    return {
        "x": torch.randn(
            shape.batch, shape.seq, shape.d_in, generator=generator, device=shape.device, dtype=dtype
        ),
        "g": torch.randn(
            shape.batch, shape.seq, shape.d_out, generator=generator, device=shape.device, dtype=dtype
        ),
        "p_in": projection(shape.d_in, shape.k, seed=0, name="bench/in", dtype=dtype, device=shape.device),
        "p_out": projection(shape.d_out, shape.k, seed=0, name="bench/out", dtype=dtype, device=shape.device),
    }


def _fp64_reference(inputs: dict) -> torch.Tensor:
    """Per-example Phi in fp64 (the default segments of a [B, T, d] batch)."""
    x_proj = inputs["x"].double() @ inputs["p_in"].double()
    g_proj = inputs["g"].double() @ inputs["p_out"].double()
    return torch.einsum("bto,bti->boi", g_proj, x_proj)


def _min_bytes(shape: BenchShape) -> int:
    item = torch.empty((), dtype=getattr(torch, shape.dtype)).element_size()
    reads = shape.tokens * (shape.d_in + shape.d_out) + shape.k * (shape.d_in + shape.d_out)
    return reads * item + shape.batch * shape.k * shape.k * 4


def _factored_flops(shape: BenchShape) -> int:
    return 2 * shape.tokens * shape.k * (shape.d_in + shape.d_out + shape.k)


def providers(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> callable(x, g, p_in, p_out): both baselines, then each compiled backend on ``device``."""
    ours = [name for name in available_backends(device) if not (name == "triton" and device == "cpu")]
    table: dict[str, Callable[..., torch.Tensor]] = dict(BASELINES)
    for name in ours:
        table[name] = lambda x, g, p_in, p_out, _name=name: project_grads(x, g, p_in, p_out, backend=_name)
    return table


def bench_shape(shape: BenchShape, *, repeats: int, peak_gbps: float) -> list[dict]:
    """Time every provider on one shape; one result row per provider, baselines first."""
    inputs = _inputs(shape)
    reference = _fp64_reference(inputs)
    scale = reference.abs().max().item()
    rows = []
    for name, fn in providers(shape.device).items():
        error = (fn(**inputs).double() - reference).abs().max().item() / scale
        median, p20, p80 = time_ms(lambda fn=fn: fn(**inputs), shape.device, repeats)
        gbps = _min_bytes(shape) / (median * 1e-3) / 1e9
        rows.append(
            {
                **asdict(shape),
                "provider": name,
                "median_ms": median,
                "p20_ms": p20,
                "p80_ms": p80,
                "gb_per_s": gbps,
                "pct_roofline": 100 * gbps / peak_gbps,
                "gflop_per_s": _factored_flops(shape) / (median * 1e-3) / 1e9,
                "max_rel_err": error,
                "peak_gb_per_s": peak_gbps,
            }
        )
    medians = {row["provider"]: row["median_ms"] for row in rows}
    for row in rows:
        for baseline in BASELINES:
            row[f"speedup_vs_{baseline}"] = medians[baseline] / row["median_ms"]
    return rows


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info(device: str) -> dict:
    """Machine, versions, commit and date stamped on every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = (
        torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} {platform.processor()}"
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} / {name.strip()} / {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
    }


COLUMNS = [
    ("provider", "{:<9}"),
    ("median_ms", "{:>10.3f}"),
    ("p20_ms", "{:>9.3f}"),
    ("p80_ms", "{:>9.3f}"),
    ("gb_per_s", "{:>8.1f}"),
    ("pct_roofline", "{:>7.1f}"),
    ("gflop_per_s", "{:>8.1f}"),
    ("speedup_vs_naive", "{:>9.2f}"),
    ("speedup_vs_unfused", "{:>9.2f}"),
    ("max_rel_err", "{:>9.1e}"),
]
HEADERS = [
    "provider",
    "median ms",
    "p20 ms",
    "p80 ms",
    "GB/s",
    "%roof",
    "GFLOP/s",
    "x naive",
    "x unfused",
    "rel err",
]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of one shape's rows."""
    widths = [len(fmt.format(rows[0][key])) if rows else 9 for key, fmt in COLUMNS]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths, strict=True))
        )
    ]
    lines += ["  ".join(fmt.format(row[key]) for key, fmt in COLUMNS) for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (used by ``main`` and by ``tikmix bench kernels``)."""
    parser.add_argument(
        "--shapes",
        default="auto",
        choices=["auto", "cpu", "gpu", "sweep", "all", "smoke"],
        help="auto: the CPU case, plus the GPU reference case when CUDA is present; sweep: small shapes "
        "on the GPU if present, else the CPU (default: auto)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed calls per provider on the CPU; scales do_bench's time budget on the GPU (default: 10)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV file")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; returns the exit status."""
    has_cuda = torch.cuda.is_available()
    shapes = shape_set(args.shapes, has_cuda=has_cuda)
    if not shapes:
        print(f"--shapes {args.shapes}: no shapes to run here (no CUDA device)")
        return 1
    all_rows = []
    for device in dict.fromkeys(shape.device for shape in shapes):
        peak = copy_bandwidth_gbps(device, args.repeats)
        stamp = machine_info(device)
        print(
            f"# {stamp['machine']}; torch {stamp['torch']}, triton {stamp['triton']}, "
            f"commit {stamp['commit']}"
        )
        print(f"# {device}: measured copy bandwidth {peak:.1f} GB/s (roofline for the GB/s column)")
        for shape in (s for s in shapes if s.device == device):
            rows = [stamp | row for row in bench_shape(shape, repeats=args.repeats, peak_gbps=peak)]
            print(
                f"\n## {shape.name}: B={shape.batch} T={shape.seq} d_in={shape.d_in} d_out={shape.d_out} "
                f"k={shape.k} {shape.dtype} on {device}"
            )
            print(format_table(rows))
            all_rows += rows
    if args.csv is not None:
        write_csv(args.csv, all_rows)
        print(f"\nappended {len(all_rows)} rows to {args.csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tikmix_kernels.bench`` entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m tikmix_kernels.bench", description=__doc__.splitlines()[0]
    )
    add_cli_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
