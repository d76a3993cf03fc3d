"""Scorer benchmark: how well each built-in quality scorer tells injected noise from clean documents, and
what scoring costs.

1. Builds the built-in corpus with ``--rate`` of each train split replaced by known noise
   (``tikmix corpus build --inject-noise``; kinds in ``tikmix_loader/data/noise.py``).
2. Fits the ``ref_ppl`` reference model on the val splits of every domain (clean, held out from train).
3. Scores every domain's train split with each scorer, ``--repeats`` times, and prints:
   - per scorer and noise kind, the ROC AUC of the score separating that kind from the clean documents of
     the same domain (the probability that a noisy document scores worse than a clean one; ties count
     half), computed from the Mann-Whitney U statistic (``scipy.stats.mannwhitneyu``) within each domain,
     because QuaDMix ranks documents within their domain; reported as the mean and minimum over domains;
   - per scorer, the median scoring time and its ratio to the baseline: reading and decoding the same
     documents without scoring them;
   - ``score_dataset`` (all criteria, written to disk) on 2 worker processes against 1 (the baseline);
   - how criteria merge: with equal ``alpha`` over ``MERGED``, the share of clean and of each noise kind's
     tokens that a cut-off ``omega`` keeps, for a mean of plain percentiles (the baseline) against the
     sampler's tail scores ``-ln(1 - p)`` (``tikmix_loader/quality/sampler.py``).

Run: ``python benchmarks/bench_scorers.py`` or ``tikmix bench scorers``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from tikmix_loader.data.corpus import CorpusConfig, build_corpus, corpus_paths, noise_labels
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.noise import NOISE_KINDS
from tikmix_loader.quality import read_scores, tail_scores, weighted_percentiles
from tikmix_loader.quality.scorers import (
    DEFAULT_CRITERIA,
    KneserNeyLM,
    dataset_tokenizer,
    iter_texts,
    reference_texts,
    score_dataset,
    score_texts,
)

MERGED = ("ref_ppl", "word_order", "repetition", "lines")  # one criterion that sees each noise kind
CUTOFFS = (0.6, 0.7, 0.8)


def auc(noisy: np.ndarray, clean: np.ndarray) -> float:
    """P(noisy score > clean score) + 0.5 P(tie): the ROC AUC of "higher score = noise"."""
    return float(mannwhitneyu(noisy, clean).statistic / (len(noisy) * len(clean)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="corpus directory (default: a temporary one)")
    parser.add_argument("--rate", type=float, default=0.2, help="share of noisy train documents")
    parser.add_argument("--max-mb-per-domain", type=float, default=4.0, help="corpus size per domain")
    parser.add_argument("--repeats", type=int, default=3, help="timed scoring runs (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        outdir = Path(args.corpus or Path(scratch) / "corpus")
        config = CorpusConfig(
            max_mb_per_domain=args.max_mb_per_domain,
            min_mb_per_domain=0.0,
            inject_noise=args.rate,
            noise_seed=args.seed,
        )
        started = time.perf_counter()
        build_corpus(outdir, config, progress=False)
        print(f"corpus {outdir}: built in {time.perf_counter() - started:.1f}s, noise rate {args.rate}")
        run(outdir, args.repeats)
    return 0


def run(outdir: Path, repeats: int) -> None:
    started = time.perf_counter()
    reference = reference_texts(list(corpus_paths(outdir, "val").values()))
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model = KneserNeyLM(reference)
    fit_seconds = time.perf_counter() - started
    print(
        f"ref_ppl model: {model.size:,} words, {len(model.trigrams):,} trigrams; val splits read in "
        f"{read_seconds:.2f}s (the first MDS open imports mosaicml-streaming), fitted in {fit_seconds:.2f}s"
    )
    texts, labels = {}, {}
    decode_seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for name, path in corpus_paths(outdir, "train").items():
            domain = Domain(name, path)
            texts[name] = [t for chunk in iter_texts(domain, dataset_tokenizer(path)) for t in chunk]
            labels[name] = noise_labels(outdir, name)
        decode_seconds.append(time.perf_counter() - started)
    baseline = statistics.median(decode_seconds)
    megabytes = sum(len(t.encode()) for docs in texts.values() for t in docs) / 1e6
    documents = sum(len(docs) for docs in texts.values())
    print(
        f"train splits: {documents} documents, {megabytes:.1f} MB; read + decode (baseline): {baseline:.2f}s"
    )
    header = f"{'scorer':<12} " + " ".join(f"{kind:>20}" for kind in NOISE_KINDS)
    print("\nROC AUC, noise kind vs clean in the same domain: mean over domains (min)")
    print(header + f" {'seconds':>8} {'MB/s':>6} {'x baseline':>10}")
    for criterion in DEFAULT_CRITERIA:
        seconds, scores = [], {}
        for _ in range(repeats):
            started = time.perf_counter()
            scores = {
                name: score_texts(docs, [criterion], reference=model)[criterion]
                for name, docs in texts.items()
            }
            seconds.append(time.perf_counter() - started)
        cells = []
        for k, _kind in enumerate(NOISE_KINDS, start=1):
            per_domain = [
                auc(scores[name][labels[name] == k], scores[name][labels[name] == 0])
                for name in texts
                if (labels[name] == k).any()
            ]
            cells.append(f"{np.mean(per_domain):.3f} ({min(per_domain):.3f})" if per_domain else "n/a")
        median = statistics.median(seconds)
        print(
            f"{criterion:<12} "
            + " ".join(f"{cell:>20}" for cell in cells)
            + f" {median:>8.2f} {megabytes / median:>6.1f} {median / baseline:>10.2f}"
        )
    print("\nscore_dataset, all criteria, every train split (writes quality/*.npy):")
    paths = list(corpus_paths(outdir, "train").values())
    timings = {}
    for workers in (1, 2):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            for path in paths:
                score_dataset(path, reference=model, workers=workers, progress=False)
            seconds.append(time.perf_counter() - started)
        timings[workers] = statistics.median(seconds)
    print(
        f"  1 worker (baseline) {timings[1]:.2f}s, 2 workers {timings[2]:.2f}s, "
        f"speedup {timings[1] / timings[2]:.2f}x"
    )
    print_merges(outdir)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")


def print_merges(outdir: Path) -> None:
    """Share of clean and noisy tokens inside the cut-off, mean of percentiles vs mean of tail scores."""
    kinds = ("clean", *NOISE_KINDS)
    print(f"\nshare of tokens kept by r <= omega, equal alpha over {', '.join(MERGED)}:")
    print(
        f"{'merge':<12} {'omega':>5} " + " ".join(f"{kind:>14}" for kind in kinds) + f" {'noise in kept':>13}"
    )
    domains = {name: Domain(name, path) for name, path in corpus_paths(outdir, "train").items()}
    percentiles = {
        name: [
            weighted_percentiles(values, domain.doc_lengths)
            for values in read_scores(domain, MERGED).values()
        ]
        for name, domain in domains.items()
    }
    for merge, transform in (("percentiles", lambda p: p), ("tail scores", tail_scores)):
        for omega in CUTOFFS:
            total, kept = np.zeros(len(kinds)), np.zeros(len(kinds))
            for name, domain in domains.items():
                lengths = domain.doc_lengths.astype(np.float64)
                merged = sum(transform(p) for p in percentiles[name])
                inside = weighted_percentiles(merged, lengths) <= omega
                kind = noise_labels(outdir, name)
                total += np.bincount(kind, weights=lengths, minlength=len(kinds))
                kept += np.bincount(kind, weights=lengths * inside, minlength=len(kinds))
            shares = kept / np.maximum(total, 1)
            noise = kept[1:].sum() / kept.sum()
            print(
                f"{merge:<12} {omega:>5} "
                + " ".join(f"{share:>14.3f}" for share in shares)
                + f" {noise:>13.3f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
