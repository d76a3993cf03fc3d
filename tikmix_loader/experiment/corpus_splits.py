"""A corpus's train/val/test splits for the experiment: open them, build the built-in corpus, draw targets."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tikmix_loader.data.corpus import MANIFEST_FILE, SPLITS, build_corpus, load_corpus
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.errors import DomainError


@dataclass(frozen=True)
class CorpusSplits:
    """The train, val and test domains of a corpus (``DIR/<domain>/{train,val,test}/``), in one order."""

    train: tuple[Domain, ...]
    val: tuple[Domain, ...]
    test: tuple[Domain, ...]

    @property
    def names(self) -> list[str]:
        return [domain.name for domain in self.train]


def load_splits(corpus: str | os.PathLike) -> CorpusSplits:
    """Open the three splits of the corpus in ``corpus``; every split must hold the same domains.

    Raises:
        ConfigError: no readable manifest (from ``corpus_paths``).
        DomainError: the splits hold different domains.
    """
    splits = {split: tuple(load_corpus(corpus, split)) for split in SPLITS}
    names = {split: [domain.name for domain in domains] for split, domains in splits.items()}
    if not (names["train"] == names["val"] == names["test"]) or not names["train"]:
        raise DomainError(f"corpus {corpus}: the splits hold different domains {names}; rebuild the corpus.")
    return CorpusSplits(**splits)


def ensure_corpus(corpus: str | os.PathLike, *, progress: bool = True) -> Path:
    """Use the corpus in ``corpus`` as is if built from text; else build (or reuse) the built-in one there."""
    corpus = Path(corpus)
    manifest = corpus / MANIFEST_FILE
    if manifest.is_file():
        try:
            builder = json.loads(manifest.read_text()).get("builder")
        except json.JSONDecodeError:
            builder = None
        if builder == "from-text":
            return corpus
    build_corpus(corpus, progress=progress)
    return corpus


def val_targets(
    val: Sequence[Domain], *, samples: int, batch_size: int, seq_len: int, seed: int
) -> dict[str, list[dict]]:
    """Target batches: ``samples`` random val samples of every domain, named ``<domain>/val``."""
    sampler = MixtureLoader(list(val), batch_size=1, seq_len=seq_len, seed=seed, num_workers=0)
    return {
        f"{name}/val": sampler.sample_batches(name, samples, batch_size=batch_size, seed=seed)
        for name in sampler.domain_names
    }
