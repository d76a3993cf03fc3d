"""A small three-domain text corpus (prose, arithmetic, code) in the layout ``tikmix corpus`` builds."""

import random
from pathlib import Path

import numpy as np

from tikmix_loader.data.corpus import NOISE_LABELS_FILE, corpus_from_text, load_corpus
from tikmix_loader.quality import write_scores

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def make_text_corpus(root: Path) -> Path:
    """A three-domain corpus (prose, arithmetic, code) built with ``corpus_from_text`` in ``root``."""
    rng = random.Random(0)
    generators = {
        "prose": lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400))) + ".",
        "numbers": lambda: "\n".join(f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = ?" for _ in range(120)),
        "code": lambda: "\n".join(f"def f{i}(x):\n    return x * {rng.randint(1, 9)}" for i in range(60)),
    }
    for name, generate in generators.items():
        folder = root / "text" / name
        folder.mkdir(parents=True)
        for index in range(10):
            (folder / f"doc{index}.txt").write_text(generate())
    corpus = root / "corpus"
    corpus_from_text(corpus, {name: root / "text" / name for name in generators}, progress=False)
    return corpus


def kept_by_hand(lengths: np.ndarray, keep: float) -> np.ndarray:
    """Documents (already in best-first order) whose token-weighted mid-rank is within ``keep``."""
    cumulative = np.cumsum(lengths)
    return (cumulative - lengths / 2) / cumulative[-1] <= keep


def make_scored_noisy_corpus(root: Path) -> Path:
    """``make_text_corpus`` with two criteria on every train split: ``compression`` ranks documents in storage
    order (document 0 best), ``repetition`` is random; the documents a top-80% filter on ``compression``
    drops are labelled as noise (kind 1, ``noise_labels.npy``)."""
    corpus = make_text_corpus(root)
    rng = np.random.default_rng(0)
    for domain in load_corpus(corpus, "train"):
        n = domain.num_docs
        write_scores(domain.path, "compression", np.arange(n, dtype=np.float32), num_docs=n)
        write_scores(domain.path, "repetition", rng.random(n), num_docs=n)
        dropped = ~kept_by_hand(domain.doc_lengths.astype(float), 0.8)
        assert 0 < dropped.sum() < n
        np.save(corpus / domain.name / "train" / NOISE_LABELS_FILE, dropped.astype(np.int8))
    return corpus
