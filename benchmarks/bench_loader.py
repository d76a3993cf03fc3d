"""Loader throughput benchmark: MixtureLoader vs mosaicml-streaming vs a plain memmap DataLoader, in one run.

All three read the same data: 4 domains of random byte-level documents, written once as MDS shards (for
MixtureLoader and streaming) and as flat memmaps (for the plain baseline). Each provider delivers batches
of ``batch_size x seq_len`` training tokens; we report delivered tokens/s (median and p20/p80 over
repeats) and the ratio against streaming's ``StreamingDataset`` with ``Stream(proportion=...)`` in a torch
``DataLoader`` with the same number of workers. MixtureLoader changes its weights every 50 batches while it
is timed. Also reported: the weight-switch latency in batches (how many batches after ``set_weights`` the
realized composition follows the new weights) and the resume time (``load_state_dict`` plus the first batch).

With ``--quality`` it instead times MixtureLoader with and without QuaDMix quality sampling (random scores
for two criteria, ``QUALITY_PARAMS`` on every domain) on the same data, interleaved, and prints the ratio.

Run: ``python benchmarks/bench_loader.py`` or ``tikmix bench loader`` (``--quality`` for the comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DOMAINS = {"web": 0.4, "code": 0.3, "math": 0.2, "books": 0.1}


def write_data(directory: Path, *, docs_per_domain: int, doc_tokens: int, seed: int = 0) -> None:
    """MDS shards and flat memmaps of the same documents, one directory per domain."""
    from streaming import MDSWriter

    from tikmix_loader.data.sources.memmap import write_memmap

    rng = np.random.default_rng(seed)
    for name in DOMAINS:
        lengths = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2, size=docs_per_domain)
        documents = [rng.integers(0, 256, size=int(n)).astype(np.uint16) for n in lengths]
        with MDSWriter(
            out=str(directory / "mds" / name), columns={"tokens": "ndarray:uint16"}, size_limit=1 << 24
        ) as out:
            for document in documents:
                out.write({"tokens": document})
        (directory / "memmap").mkdir(parents=True, exist_ok=True)
        write_memmap(directory / "memmap" / f"{name}.bin", documents, vocab_size=258)


def _time_batches(iterator, num_batches: int, on_batch=None) -> float:
    next(iterator)  # warm up: workers started, first shards opened
    start = time.perf_counter()
    for index in range(num_batches):
        batch = next(iterator)
        if on_batch is not None:
            on_batch(index, batch)
    return time.perf_counter() - start


def _mixture_loader(directory: Path, args, quality=None):
    """MixtureLoader over the MDS data (with ``quality`` sampling when given) and its domains."""
    from tikmix_loader import Domain, MixtureLoader

    # Plain MDSWriter output records no ids; these documents are byte tokens (EOS 256, vocabulary 258).
    domains = [Domain(name, directory / "mds" / name, eos_id=256, vocab_size=258) for name in DOMAINS]
    loader = MixtureLoader(
        domains,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        weights=DOMAINS,
        num_workers=args.workers,
        seed=0,
        quality=quality,
    )
    return loader, domains


def _time_with_weight_changes(loader, args) -> float:
    """Seconds for ``args.batches`` batches, the weights redrawn every 50 batches."""
    rng = np.random.default_rng(1)

    def change_weights(index, batch):
        if index % 50 == 49:
            loader.set_weights(rng.dirichlet(np.ones(len(DOMAINS))).tolist())

    return _time_batches(iter(loader), args.batches, change_weights)


def run_mixture_loader(directory: Path, args) -> tuple[float, dict]:
    loader, domains = _mixture_loader(directory, args)
    elapsed = _time_with_weight_changes(loader, args)
    extras = {
        "switch_latency_batches": _switch_latency(loader),
        "resume_seconds": _resume_time(loader, domains, args),
    }
    loader.close()
    return elapsed, extras


def _switch_latency(loader) -> int:
    """Batches after ``set_weights`` until one is drawn entirely from the newly weighted domain."""
    target = len(loader.domain_names) - 1
    loader.set_weights([0.0] * target + [1.0])
    for latency in range(100):
        if (loader.next_batch()["domain"] == target).all():
            return latency
    return -1


def _resume_time(loader, domains, args) -> float:
    from tikmix_loader import MixtureLoader

    state = loader.state_dict()
    start = time.perf_counter()
    resumed = MixtureLoader(
        domains, batch_size=args.batch_size, seq_len=args.seq_len, num_workers=args.workers, seed=0
    )
    resumed.load_state_dict(state)
    resumed.next_batch()
    elapsed = time.perf_counter() - start
    resumed.close()
    return elapsed


def run_streaming(directory: Path, args) -> tuple[float, dict]:
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    streams = [
        Stream(local=str(directory / "mds" / name), proportion=share) for name, share in DOMAINS.items()
    ]
    seq_len = args.seq_len

    class Packed(StreamingDataset):
        # Streaming yields whole documents; cut each to one training window so the work per sample matches.
        def __getitem__(self, index):
            tokens = super().__getitem__(index)["tokens"].astype(np.int64)
            window = np.resize(tokens, seq_len + 1)
            return {"input_ids": torch.from_numpy(window[:-1]), "labels": torch.from_numpy(window[1:])}

    dataset = Packed(
        streams=streams, batch_size=args.batch_size, shuffle=True, shuffle_seed=0, epoch_size=10**7
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    iterator = iter(loader)
    elapsed = _time_batches(iterator, args.batches)
    del iterator, loader
    start = time.perf_counter()
    state = dataset.state_dict(num_samples=args.batches * args.batch_size, from_beginning=True)
    dataset.load_state_dict(state)
    next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)))
    resume = time.perf_counter() - start
    return elapsed, {"switch_latency_batches": "rebuild", "resume_seconds": resume}


class _MemmapWindows(torch.utils.data.IterableDataset):
    """nanoGPT-style random windows over flat memmaps, domain drawn by weight (the plain baseline)."""

    def __init__(self, paths, weights, seq_len):
        super().__init__()
        self.paths, self.weights, self.seq_len = paths, weights, seq_len

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(0 if worker is None else worker.id)
        arrays = [np.memmap(path, dtype=np.uint16, mode="r") for path in self.paths]
        while True:
            tokens = arrays[rng.choice(len(arrays), p=self.weights)]
            start = int(rng.integers(0, len(tokens) - self.seq_len - 1))
            window = torch.from_numpy(tokens[start : start + self.seq_len + 1].astype(np.int64))
            yield {"input_ids": window[:-1], "labels": window[1:]}


def run_memmap(directory: Path, args) -> tuple[float, dict]:
    paths = [directory / "memmap" / f"{name}.bin" for name in DOMAINS]
    dataset = _MemmapWindows(paths, list(DOMAINS.values()), args.seq_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    return _time_batches(iter(loader), args.batches), {
        "switch_latency_batches": "n/a",
        "resume_seconds": "n/a",
    }


PROVIDERS = {"streaming": run_streaming, "mixture_loader": run_mixture_loader, "memmap": run_memmap}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs-per-domain", type=int, default=4000)
    parser.add_argument("--doc-tokens", type=int, default=600)
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse/keep the generated data here")
    parser.add_argument(
        "--quality", action="store_true", help="compare MixtureLoader with and without quality sampling"
    )


@contextlib.contextmanager
def _data_directory(args):
    """``--data-dir`` with the benchmark data written once, or a temporary folder removed afterwards."""
    directory = args.data_dir or Path(tempfile.mkdtemp(prefix="tikmix-bench-loader-"))
    if not (directory / "mds").exists():
        write_data(directory, docs_per_domain=args.docs_per_domain, doc_tokens=args.doc_tokens)
    try:
        yield directory
    finally:
        if args.data_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


def run(args) -> dict:
    """Run every provider ``repeats`` times, interleaved, and print the table."""
    tokens_per_run = args.batches * args.batch_size * args.seq_len
    rates = {name: [] for name in PROVIDERS}
    extras = {}
    with _data_directory(args) as directory:
        for _ in range(args.repeats):
            for name, provider in PROVIDERS.items():
                elapsed, extras[name] = provider(directory, args)
                rates[name].append(tokens_per_run / elapsed)
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; batch {args.batch_size} x seq_len {args.seq_len}, "
        f"{args.workers} workers, "
        f"{args.batches} batches x {args.repeats} repeats"
    )
    print(
        f"{'provider':<16}{'tokens/s median':>16}{'p20':>12}{'p80':>12}{'vs streaming':>14}"
        f"{'switch lat.':>13}{'resume s':>10}"
    )
    baseline = statistics.median(rates["streaming"])
    summary = {}
    for name, values in rates.items():
        median = statistics.median(values)
        p20, p80 = np.percentile(values, [20, 80])
        resume = extras[name]["resume_seconds"]
        resume = f"{resume:.3f}" if isinstance(resume, float) else resume
        print(
            f"{name:<16}{median:>16,.0f}{p20:>12,.0f}{p80:>12,.0f}{median / baseline:>13.2f}x"
            f"{extras[name]['switch_latency_batches']!s:>13}{resume:>10}"
        )
        summary[name] = {
            "median": median,
            "p20": p20,
            "p80": p80,
            "ratio_vs_streaming": median / baseline,
            **extras[name],
        }
    return summary


# A typical QuaDMix setting: the better 60% of tokens boosted up to 2x, the rest kept with probability 0.2.
QUALITY_PARAMS = {"alpha": (0.6, 0.4), "lam": 10.0, "omega": 0.6, "eta": 1.0, "eps": 0.2}


def _mixture_loader_rate(directory: Path, args, quality) -> float:
    """Delivered tokens/s of MixtureLoader on the MDS data, weights changing every 50 batches."""
    loader, _ = _mixture_loader(directory, args, quality)
    elapsed = _time_with_weight_changes(loader, args)
    loader.close()
    return args.batches * args.batch_size * args.seq_len / elapsed


def run_quality(args) -> dict:
    """MixtureLoader with and without quality sampling, ``repeats`` times interleaved; prints the ratio."""
    from tikmix_loader.quality import QualityConfig, QualityParams, write_scores

    params = QualityParams(**QUALITY_PARAMS)
    quality = QualityConfig(["score_a", "score_b"], {name: params for name in DOMAINS})
    rates = {"without quality": [], "with quality": []}
    with _data_directory(args) as directory:
        rng = np.random.default_rng(2)
        for name in DOMAINS:
            for criterion in ("score_a", "score_b"):
                scores = rng.random(args.docs_per_domain)
                write_scores(directory / "mds" / name, criterion, scores, num_docs=args.docs_per_domain)
        for _ in range(args.repeats):
            rates["without quality"].append(_mixture_loader_rate(directory, args, None))
            rates["with quality"].append(_mixture_loader_rate(directory, args, quality))
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"batch {args.batch_size} x seq_len {args.seq_len}, {args.workers} threads, "
        f"{args.batches} batches x {args.repeats} repeats; QualityParams {QUALITY_PARAMS}"
    )
    print(f"{'MixtureLoader':<18}{'tokens/s median':>16}{'p20':>12}{'p80':>12}{'vs without':>12}")
    baseline = statistics.median(rates["without quality"])
    summary = {}
    for name, values in rates.items():
        median = statistics.median(values)
        p20, p80 = np.percentile(values, [20, 80])
        print(f"{name:<18}{median:>16,.0f}{p20:>12,.0f}{p80:>12,.0f}{median / baseline:>11.2f}x")
        summary[name] = {"median": median, "p20": p20, "p80": p80, "ratio": median / baseline}
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    if args.quality:
        run_quality(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
