"""``tikmix demo``: build (or reuse) the built-in corpus and show the mixture loader following a weight change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from tikmix_loader.data.corpus import build_corpus, load_corpus
from tikmix_loader.data.loader import MixtureLoader


def _shares_table(title: str, names: list[str], target: dict[str, float], counts: np.ndarray) -> str:
    realized = counts / max(counts.sum(), 1)
    lines = [title, f"  {'domain':<12}{'target':>8}{'realized':>10}{'samples':>9}"]
    for index, name in enumerate(names):
        lines.append(f"  {name:<12}{target[name]:>8.3f}{realized[index]:>10.3f}{int(counts[index]):>9}")
    return "\n".join(lines)


def run_loader_demo(corpus: Path, *, batches: int = 100, batch_size: int = 32, seq_len: int = 256, seed: int = 0) -> dict:
    """Draw ``batches`` batches at the natural mixture, switch to uniform weights, draw as many again."""
    build_corpus(corpus)
    domains = load_corpus(corpus, "train")
    loader = MixtureLoader(domains, batch_size=batch_size, seq_len=seq_len, seed=seed)
    names = loader.domain_names
    phases = {"natural token shares": None, "after set_weights(uniform)": dict.fromkeys(names, 1.0)}
    results = {}
    for title, weights in phases.items():
        if weights is not None:
            loader.set_weights(weights)
        counts = np.zeros(len(names))
        for batch in tqdm(loader, total=batches, desc=title, leave=False):
            counts += np.bincount(batch["domain"].numpy(), minlength=len(names))
            if counts.sum() >= batches * batch_size:
                break
        print(_shares_table(f"{title} ({batches} batches of {batch_size} x {seq_len} tokens):", names, loader.weights, counts))
        results[title] = {"target": loader.weights, "realized": dict(zip(names, (counts / counts.sum()).tolist()))}
    loader.close()
    return results


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="build the built-in corpus and run the demo")
    parser.add_argument("--corpus", type=Path, default=Path("corpus"), help="corpus directory (built if missing)")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=lambda args: run_loader_demo(
        args.corpus, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    ) and 0)

