"""A small three-domain text corpus (prose, arithmetic, code) in the layout ``tikmix corpus`` builds."""

import random
from pathlib import Path

from tikmix_loader.data.corpus import corpus_from_text

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
