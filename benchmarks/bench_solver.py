"""Benchmark TiKMiX-D solve time: ``solve_tikmix_d`` against plain SciPy SLSQP on the same problems.

Providers (all on the same synthetic influence matrices, one per seed):

* ``plain``: SLSQP on ``w`` as docs/methods.md §4 states it, with none of our structure: finite-difference
  gradients, every Pareto row as a constraint without a Jacobian, from the uniform mixture. BLAS is pinned
  to one thread as for ours, so the ratio measures the structure, not the pinning.
* ``primal``: ``solve_tikmix_d(method="primal")``: analytic gradients, reduced Pareto rows.
* ``ours``: ``solve_tikmix_d()`` (``method="auto"``: SLSQP on the 2 n_targets-dimensional dual).
* ``unpinned``: ``ours`` with the BLAS pinning switched off (shows what pinning buys on a busy machine).

Prints median and p20/p80 wall time per solve, ``speedup = plain / provider`` (medians) and the objective
difference to ``plain`` (negative = better). Usage::

    .venv/bin/python benchmarks/bench_solver.py [--repeats 20] [--plain-repeats 3] [--shapes 26x9 256x32]
        [--providers plain primal ours unpinned] [--csv benchmarks/data/solver.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import subprocess
import time

import numpy as np
import scipy
from scipy.optimize import minimize

from tikmix_loader.mixing import TikmixObjective, solve_tikmix_d, synthetic_problem, tikmix_d
from tikmix_loader.mixing._threads import blas_threads

GOALS_MS = {(26, 9): 50.0, (256, 32): 1000.0}


def solve_plain(S: np.ndarray, w_prior: np.ndarray) -> np.ndarray:
    """The baseline: plain SLSQP without analytic gradients or any structural trick."""
    objective = TikmixObjective(S)
    num_domains = S.shape[1]
    constraints = [
        {"type": "eq", "fun": lambda w: w.sum() - 1.0},
        {"type": "ineq", "fun": lambda w: S @ w - S @ w_prior},
    ]
    with blas_threads(1):
        result = minimize(
            objective.value,
            np.full(num_domains, 1.0 / num_domains),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * num_domains,
            constraints=constraints,
            options={"maxiter": 1000, "ftol": 1e-10},
        )
    return result.x


def solve_unpinned(S: np.ndarray, w_prior: np.ndarray) -> np.ndarray:
    """``solve_tikmix_d`` with its BLAS pinning replaced by a no-op."""
    pinned = tikmix_d.blas_threads
    tikmix_d.blas_threads = lambda limit: contextlib.nullcontext()
    try:
        return solve_tikmix_d(S, w_prior).weights
    finally:
        tikmix_d.blas_threads = pinned


PROVIDERS = {
    "plain": solve_plain,
    "primal": lambda S, w: solve_tikmix_d(S, w, method="primal").weights,
    "ours": lambda S, w: solve_tikmix_d(S, w).weights,
    "unpinned": solve_unpinned,
}


def time_provider(name: str, shape: tuple[int, int], repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall time (s) and objective of each of ``repeats`` solves, one problem per seed."""
    times, objectives = [], []
    for seed in range(repeats):
        S, w_prior = synthetic_problem(*shape, seed)
        start = time.perf_counter()
        w = PROVIDERS[name](S, w_prior)
        times.append(time.perf_counter() - start)
        objectives.append(TikmixObjective(S).value(w))
    return np.array(times), np.array(objectives)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="solves (seeds) per shape for ours")
    parser.add_argument("--plain-repeats", type=int, default=3, help="solves per shape for plain and primal")
    parser.add_argument("--shapes", nargs="+", default=["26x9", "256x32"], help="DOMAINSxTARGETS")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=list(PROVIDERS),
        choices=list(PROVIDERS),
        help="providers to time; plain is always included as the baseline",
    )
    parser.add_argument("--csv", help="append one row per shape and provider to this CSV file")
    args = parser.parse_args(argv)
    try:
        import threadpoolctl  # noqa: F401

        pinning = "threadpoolctl"
    except ImportError:
        pinning = "ctypes fallback"
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    print(
        f"# {machine}, load {os.getloadavg()[0]:.2f}; numpy {np.__version__}, scipy {scipy.__version__}; "
        f"BLAS pinning: {pinning}"
    )
    rows = []
    solve_tikmix_d(*synthetic_problem(8, 3, 0))  # warm-up: imports and first-call costs
    header = (
        f"{'shape':>8} {'provider':>8} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'speedup':>8} "
        f"{'d objective':>12} {'goal ms':>8}"
    )
    print(header)
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split("x"))
        results = {}
        for name in ["plain", *[p for p in args.providers if p != "plain"]]:
            repeats = args.repeats if name in ("ours", "unpinned") else args.plain_repeats
            results[name] = time_provider(name, shape, repeats)
        plain_median = np.median(results["plain"][0])
        for name, (times, objectives) in results.items():
            shared = min(len(objectives), len(results["plain"][1]))
            delta = float(np.max(objectives[:shared] - results["plain"][1][:shared]))
            p20, median, p80 = np.percentile(times * 1e3, [20, 50, 80])
            goal = GOALS_MS.get(shape, float("nan")) if name == "ours" else float("nan")
            speedup = plain_median * 1e3 / median
            print(
                f"{text:>8} {name:>8} {median:10.1f} {p20:9.1f} {p80:9.1f} {speedup:8.1f} "
                f"{delta:12.2e} {goal:8.0f}"
            )
            rows.append([text, name, len(times), median, p20, p80, speedup, delta])
    if args.csv:
        write_csv(args.csv, rows, machine, pinning)


def write_csv(path: str, rows: list, machine: str, pinning: str) -> None:
    """Append rows with the date, machine, versions, pinning mode and commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        commit = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "uncommitted"
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(
                [
                    "date",
                    "machine",
                    "numpy",
                    "scipy",
                    "pinning",
                    "commit",
                    "shape",
                    "provider",
                    "repeats",
                    "median_ms",
                    "p20_ms",
                    "p80_ms",
                    "speedup_vs_plain",
                    "d_objective",
                ]
            )
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for row in rows:
            writer.writerow([date, machine, np.__version__, scipy.__version__, pinning, commit, *row])


if __name__ == "__main__":
    main()
