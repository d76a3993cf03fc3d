"""Small synthetic domains on disk for loader tests (flat memmaps; the format tests cover MDS and Parquet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tikmix_loader import Domain
from tikmix_loader.data.sources.memmap import write_memmap


def random_documents(num_docs: int, *, seed: int, min_len: int = 1, max_len: int = 200, vocab: int = 256):
    """``num_docs`` random token documents with lengths in ``[min_len, max_len]``."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(min_len, max_len + 1))) for _ in range(num_docs)]


def write_domains(
    directory: Path, sizes: dict[str, int], *, mode: str = "packed", max_len: int = 200, **domain_options
):
    """One memmap domain per ``name: num_docs`` entry; documents differ per domain."""
    domains = []
    for index, (name, num_docs) in enumerate(sizes.items()):
        documents = random_documents(num_docs, seed=1000 + index, max_len=max_len)
        path = write_memmap(Path(directory) / f"{name}.bin", documents, vocab_size=258)
        domains.append(Domain(name, path, mode=mode, **domain_options))
    return domains
