"""Per-rank reads benchmark: what one rank reads, and how long it takes, per global batch at world size W.

W ranks are simulated in one process: for each W, a sample of ranks (all of them up to 8) each get their
own ``MixtureLoader(rank=r, world_size=W)`` over the same 4 memmap domains, with the global batch fixed
(``--global-batch`` samples of ``--seq-len`` tokens), so each rank's batch is ``global_batch / W``. Loaders
read on demand (``num_workers=0``) so the time is the rank's own work. Per rank and global batch we report:

- tokens read: tokens handed out by ``DomainStream.read_at`` (the samples the rank reads), against the
  named baseline ``global_batch_tokens / W`` (ratio column; the goal is within 1.1x);
- tokens taken from storage (``Domain.read_docs``, whole documents, and ``Domain.read_doc_ranges``, the
  parts of documents under sparse windows), the I/O under those samples;
- seconds per rank per global batch (median, p20, p80 over all timed batches of all sampled ranks and
  repeats), and the speedup against W = 1 measured in the same run (the goal is about W: the time falls
  as 1/W). Before per-rank reads every rank did the W = 1 work.
- CPU seconds per rank per global batch (median; the reading thread's own CPU time) and the same speedup:
  on a machine shared with other jobs wall time also counts waiting for a core, CPU time only the work.
- keyed permutations per rank and global batch (``shuffle.keyed_permutation`` calls, each seeding its own
  generator: the batch order, and the window order of each chunk and the document order of each block the
  rank reads from for the first time), a cost per chunk and block touched rather than per token, which stops
  falling once a rank's few samples land in as many chunks and blocks as it has samples.

The simulated ranks of one W share the process-wide cache of window orders, so each rank after the first
finds part of its seeding done; ``--own-caches`` clears it before each rank, as separate processes would.

Scaling fit: the CPU seconds per batch are fitted (least squares over the W's) as ``t(W) = a + b / W``: ``a``
is the fixed cost every rank pays per global batch whatever its share (planning the whole batch, seeding
the shuffles it touches, Python and numpy call overhead), ``b / W`` the part that follows the share. The
table prints both, and the speedup of the measured time without the fixed part, ``(t(1) - a) / (t(W) - a)``,
against W: when it tracks W, what does not fall as 1/W is the fixed cost alone.

Run: ``python benchmarks/bench_loader_ranks.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DOMAINS = {"web": 0.4, "code": 0.3, "math": 0.2, "books": 0.1}


def write_domains(directory: Path, *, docs_per_domain: int, doc_tokens: int, seed: int = 0) -> list[Path]:
    """One memmap of random byte-level documents per domain."""
    from tikmix_loader.data.sources.memmap import write_memmap

    rng = np.random.default_rng(seed)
    paths = []
    for name in DOMAINS:
        lengths = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2, size=docs_per_domain)
        documents = [rng.integers(0, 256, size=int(n)).astype(np.uint16) for n in lengths]
        paths.append(write_memmap(directory / f"{name}.bin", documents, vocab_size=258))
    return paths


class ReadCounter:
    """Spies on ``DomainStream.read_at`` (sample tokens read), on ``Domain.read_docs`` and
    ``Domain.read_doc_ranges`` (tokens taken from storage) and on ``shuffle.keyed_permutation`` (generators
    seeded)."""

    def __init__(self):
        from tikmix_loader.data import planner, shuffle, stream
        from tikmix_loader.data.domain import Domain
        from tikmix_loader.data.stream import DomainStream

        self.sample_tokens = 0
        self.decoded_tokens = 0
        self.seeded = 0
        keyed_permutation = shuffle.keyed_permutation

        def counting_keyed_permutation(*keys, n):
            self.seeded += 1
            return keyed_permutation(*keys, n=n)

        for module in (shuffle, stream, planner):  # each imported the name; replace it where it is called
            module.keyed_permutation = counting_keyed_permutation
        read_at, read_docs, read_doc_ranges = DomainStream.read_at, Domain.read_docs, Domain.read_doc_ranges

        def counting_read_at(stream, indices):
            tokens, valid = read_at(stream, indices)
            self.sample_tokens += tokens.size
            return tokens, valid

        def counting_read_docs(domain, start, stop):
            documents = read_docs(domain, start, stop)
            self.decoded_tokens += sum(len(document) for document in documents)
            return documents

        def counting_read_doc_ranges(domain, docs, starts, stops):
            tokens = read_doc_ranges(domain, docs, starts, stops)
            self.decoded_tokens += len(tokens)
            return tokens

        DomainStream.read_at, Domain.read_docs = counting_read_at, counting_read_docs
        Domain.read_doc_ranges = counting_read_doc_ranges

    def reset(self) -> None:
        self.sample_tokens = self.decoded_tokens = self.seeded = 0


def sampled_ranks(world_size: int, count: int) -> list[int]:
    """All ranks when there are at most ``count``, else ``count`` spread evenly, first and last included."""
    if world_size <= count:
        return list(range(world_size))
    return sorted({int(round(r)) for r in np.linspace(0, world_size - 1, count)})


def measure(domains, world_size: int, args, counter: ReadCounter) -> dict:
    """Per-rank tokens read, tokens decoded and seconds per global batch, over the sampled ranks."""
    from tikmix_loader import MixtureLoader
    from tikmix_loader.data import stream

    seconds, cpu_seconds, sample_tokens, decoded_tokens, seeded = [], [], [], [], []
    for _ in range(args.repeats):
        for rank in sampled_ranks(world_size, args.ranks):
            if args.own_caches:  # a real rank has its own process: no window orders seeded by another rank
                stream._window_permutation.cache_clear()
            loader = MixtureLoader(
                domains,
                batch_size=args.global_batch // world_size,
                seq_len=args.seq_len,
                weights=DOMAINS,
                rank=rank,
                world_size=world_size,
                num_workers=0,
                seed=0,
            )
            loader.next_batch()  # warm up: epoch layouts built, first blocks mapped
            for _ in range(args.batches):
                counter.reset()
                start, cpu_start = time.perf_counter(), time.thread_time()
                loader.next_batch()
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.thread_time() - cpu_start)
                sample_tokens.append(counter.sample_tokens)
                decoded_tokens.append(counter.decoded_tokens)
                seeded.append(counter.seeded)
    return {
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_seconds),
        "sample_tokens": statistics.median(sample_tokens),
        "decoded_tokens": statistics.median(decoded_tokens),
        "seeded": statistics.mean(seeded),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8, 64, 1024])
    parser.add_argument("--global-batch", type=int, default=2048, help="samples per global batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5, help="timed global batches per rank and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=8, help="ranks timed per world size (a sample)")
    parser.add_argument("--docs-per-domain", type=int, default=4000)
    parser.add_argument("--doc-tokens", type=int, default=600)
    parser.add_argument(
        "--own-caches",
        action="store_true",
        help="clear the process-wide window-order cache before each simulated rank, as if each had its own "
        "process (by default the ranks of one W share it, which hides part of each rank's seeding cost)",
    )
    args = parser.parse_args(argv)
    for world_size in args.world_sizes:
        if args.global_batch % world_size:
            parser.error(f"--global-batch {args.global_batch} is not divisible by world size {world_size}")

    from tikmix_loader import Domain

    counter = ReadCounter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_domains(Path(tmp), docs_per_domain=args.docs_per_domain, doc_tokens=args.doc_tokens)
        domains = [Domain(name, path) for name, path in zip(DOMAINS, paths)]
        results = {world_size: measure(domains, world_size, args, counter) for world_size in args.world_sizes}

    global_tokens = args.global_batch * (args.seq_len + 1)  # a sample reads seq_len + 1 tokens
    smallest = min(results)
    base = statistics.median(results[smallest]["seconds"])
    cpu_base = results[smallest]["cpu_seconds"]
    print(
        f"machine: {platform.node() or 'unknown'} {platform.machine()}, global batch {args.global_batch} x "
        f"(seq_len {args.seq_len} + 1) = {global_tokens:,} tokens; {args.batches} batches x {args.repeats} "
        f"repeats, up to {args.ranks} sampled ranks per W"
    )
    header = (
        f"{'W':>5} {'rank batch':>10} {'tokens read':>12} {'global/W':>10} {'ratio':>6} {'decoded':>10} "
        f"{'decoded/(global/W)':>18} {'s/batch med':>12} {'p20':>9} {'p80':>9} "
        f"{f'speedup vs W={smallest}':>15} {'cpu s/batch':>12} {'cpu speedup':>11} {'seeded':>7}"
    )
    print(header)
    for world_size, result in results.items():
        seconds = np.asarray(result["seconds"])
        share = global_tokens / world_size
        median = float(np.median(seconds))
        print(
            f"{world_size:>5} {args.global_batch // world_size:>10} {result['sample_tokens']:>12,.0f} "
            f"{share:>10,.0f} {result['sample_tokens'] / share:>5.2f}x {result['decoded_tokens']:>10,.0f} "
            f"{result['decoded_tokens'] / share:>17.2f}x {median:>12.6f} {np.percentile(seconds, 20):>9.6f} "
            f"{np.percentile(seconds, 80):>9.6f} {base / median:>14.1f}x {result['cpu_seconds']:>12.6f} "
            f"{cpu_base / result['cpu_seconds']:>10.1f}x {result['seeded']:>7.1f}"
        )
    if len(results) >= 2:
        print_scaling_fit({world_size: result["cpu_seconds"] for world_size, result in results.items()})


def scaling_fit(cpu_seconds: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``t(W) = a + b / W`` over the measured ``{W: CPU seconds per batch}``.

    The residuals are relative (each row divided by its ``t``): times span two orders of magnitude, and
    plain residuals would let W = 1 alone set the fit, leaving the sub-millisecond times at large W unfit.
    """
    world_sizes = np.array(list(cpu_seconds), dtype=np.float64)
    seconds = np.array(list(cpu_seconds.values()), dtype=np.float64)
    design = np.column_stack([np.ones_like(world_sizes), 1 / world_sizes]) / seconds[:, None]
    (fixed, share), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    return float(fixed), float(share)


def print_scaling_fit(cpu_seconds: dict[int, float]) -> None:
    """The fit's fixed and share parts per W, and how the measured time without the fixed part scales."""
    fixed, share = scaling_fit(cpu_seconds)
    smallest = min(cpu_seconds)
    print(
        f"fit of CPU s/batch over W = {', '.join(map(str, cpu_seconds))}: t(W) = a + b/W, a (fixed per-batch "
        f"cost) = {fixed:.6f} s, b = {share:.6f} s"
    )
    print(
        f"{'W':>5} {'cpu s/batch':>12} {'fit a + b/W':>12} {'a':>10} {'b/W':>10} {'a share':>8} "
        f"{'t - a':>10} {f'(t - a) speedup vs W={smallest}':>28}"
    )
    for world_size, measured in cpu_seconds.items():
        variable = measured - fixed
        speedup = f"{(cpu_seconds[smallest] - fixed) / variable:.1f}x" if variable > 0 else "n/a (t <= a)"
        print(
            f"{world_size:>5} {measured:>12.6f} {fixed + share / world_size:>12.6f} {fixed:>10.6f} "
            f"{share / world_size:>10.6f} {fixed / measured:>7.0%} {variable:>10.6f} {speedup:>28}"
        )


if __name__ == "__main__":
    main()
