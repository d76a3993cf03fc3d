"""Keyed permutation cost per call: numpy's ``Generator(PCG64(SeedSequence(keys))).permutation(n)`` against
the compiled one.

For each ``n`` it times, in one run: numpy as ``shuffle.rng_for`` seeds it (the baseline, the loader's path
before the compiled permutation), ``shuffle.keyed_permutation`` (what the loader calls: key handling plus the
compiled call) and the bare compiled call (what the pybind11 call and the work cost without the Python
wrapper). Keys are 5 values like a within-block key (seed, 63-bit domain key, epoch, tag, block). The
default lengths are a permutation of nothing (the call overhead alone), a small block, a default shuffle
chunk or block (256) and a default global batch's order (2048). Medians of ``--repeats`` timings of
``--number`` calls each.

Run: ``python benchmarks/bench_keyed_permutation.py`` (about 20 s).
"""

from __future__ import annotations

import argparse
import statistics
import timeit


def main(argv=None) -> None:
    from tikmix_loader.data import _compiled, shuffle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[0, 16, 256, 2048])
    parser.add_argument("--number", type=int, default=2000, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    library = _compiled.module()
    if library is None:
        raise SystemExit("the compiled data-path helpers are unavailable here (see the log line above)")
    compiled = library.permutation
    keys = (0, shuffle.stable_key("web"), 3, shuffle.WITHIN_BLOCK, 117)

    def per_call_us(function) -> float:
        timings = timeit.repeat(function, number=args.number, repeat=args.repeats)
        return statistics.median(timings) / args.number * 1e6

    print(f"per call, median of {args.repeats} x {args.number} calls; keys {len(keys)} values")
    print(f"{'n':>6} {'numpy us':>9} {'keyed_permutation us':>21} {'compiled us':>12} {'numpy/keyed':>12}")
    for n in args.lengths:
        numpy_us = per_call_us(lambda n=n: shuffle.rng_for(*keys).permutation(n))
        keyed_us = per_call_us(lambda n=n: shuffle.keyed_permutation(*keys, n=n))
        bare_us = per_call_us(lambda n=n: compiled(keys, n))
        print(f"{n:>6} {numpy_us:>9.2f} {keyed_us:>21.2f} {bare_us:>12.2f} {numpy_us / keyed_us:>11.1f}x")


if __name__ == "__main__":
    main()
