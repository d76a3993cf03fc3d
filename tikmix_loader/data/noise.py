"""Known low-quality documents made from real ones, for measuring whether quality sampling avoids them.

``inject_noise(texts, rate, kinds, seed=..., domain=...)`` returns the documents of one split with noisy
documents added among them, and a label per document: 0 for an original, ``k`` for the ``k``-th kind of
``NOISE_KINDS`` (1-based). ``tikmix corpus ... --inject-noise RATE`` applies it to each domain's train split
(val and test stay clean) and stores the labels as ``noise_labels.npy`` (see ``docs/quadmix.md``).

Each noisy document is derived from a real document of the same domain, so its length and vocabulary stay
plausible and only the damage named by its kind tells it apart:

====================  ==================================================================================
kind                  what is done to a copy of a randomly chosen document
====================  ==================================================================================
``shuffled_words``    its whitespace-separated words permuted; whitespace (and so the lines) kept in place
``char_noise``        a quarter of its non-space characters replaced by random printable ASCII characters
``boilerplate``       one of its lines (or a slice of it) repeated until the copy is as long as the original
``fragment``          a prefix of 5% to 30% of it, cut at an arbitrary character in the middle of a line
====================  ==================================================================================

Everything is drawn from ``numpy.random.default_rng`` keyed by ``(seed, domain)``, so the same inputs give
the same documents in the same places.
"""

from __future__ import annotations

import hashlib
import re
import string

import numpy as np

from tikmix_loader.errors import ConfigError

NOISE_KINDS = ("shuffled_words", "char_noise", "boilerplate", "fragment")
CHAR_NOISE_RATE = 0.25
FRAGMENT_SHARE = (0.05, 0.30)
_PRINTABLE = np.array(list(string.ascii_letters + string.digits + string.punctuation))
_WORDS_AND_SPACES = re.compile(r"(\s+)")


def check_noise_options(rate: float, kinds) -> tuple[str, ...]:
    """The kinds to inject (all of ``NOISE_KINDS`` when ``kinds`` is empty); ``ConfigError`` if invalid."""
    if not 0 <= rate < 1:
        raise ConfigError(
            f"`inject_noise` must be in [0, 1) (the share of noisy documents in each train split), got "
            f"{rate}."
        )
    kinds = tuple(kinds or NOISE_KINDS)
    unknown = sorted(set(kinds) - set(NOISE_KINDS))
    if unknown or len(set(kinds)) != len(kinds):
        raise ConfigError(
            f"`noise_kinds` {list(kinds)}: each must be one of {list(NOISE_KINDS)}, named once "
            f"(unknown: {unknown})."
        )
    return kinds


def noise_count(num_clean: int, rate: float) -> int:
    """Noisy documents to add to ``num_clean`` originals so that they are ``rate`` of the result."""
    return round(num_clean * rate / (1 - rate))


def inject_noise(
    texts: list[str], rate: float, kinds=(), *, seed: int = 0, domain: str = ""
) -> tuple[list[str], np.ndarray]:
    """``texts`` with noisy copies added at random places, and the label of every resulting document.

    Args:
        texts (list[str]): The clean documents of one split, in storage order (their order is kept).
        rate (float): Share of noisy documents in the result, in ``[0, 1)``; the count is rounded.
        kinds (Sequence[str]): Kinds to make, split as evenly as the count allows (the first kinds get one
            more). Default: all of ``NOISE_KINDS``.
        seed (int): Seed of the random draws. Default: ``0``.
        domain (str): Domain name, mixed into the seed so domains get different noise. Default: ``""``.

    Returns:
        tuple[list[str], np.ndarray]: The documents, and int8 labels (0 original, ``k`` the kind
        ``NOISE_KINDS[k-1]``).
    """
    kinds = check_noise_options(rate, kinds)
    count = noise_count(len(texts), rate)
    labels = np.zeros(len(texts) + count, dtype=np.int8)
    if count == 0:
        return list(texts), labels
    if not texts:
        raise ConfigError(f"domain {domain!r}: no documents to derive noise from.")
    key = int.from_bytes(hashlib.sha256(f"noise:{domain}".encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, key])
    per_kind = np.full(len(kinds), count // len(kinds)) + (np.arange(len(kinds)) < count % len(kinds))
    kind_ids = np.repeat([NOISE_KINDS.index(kind) + 1 for kind in kinds], per_kind)
    noisy = [MAKERS[NOISE_KINDS[k - 1]](texts[rng.integers(len(texts))], rng) for k in kind_ids]
    positions = np.sort(rng.choice(len(labels), size=count, replace=False))
    order = rng.permutation(count)  # kinds spread over the positions, not in blocks
    labels[positions] = kind_ids[order]
    result, clean, made = [], iter(texts), iter(order)
    for label in labels:
        result.append(next(clean) if label == 0 else noisy[next(made)])
    return result, labels


def shuffled_words(text: str, rng: np.random.Generator) -> str:
    """``text`` with its words permuted and every run of whitespace left where it was."""
    parts = _WORDS_AND_SPACES.split(text)
    word_slots = [i for i, part in enumerate(parts) if part and not part.isspace()]
    words = [parts[i] for i in word_slots]
    for slot, source in zip(word_slots, rng.permutation(len(words)), strict=True):
        parts[slot] = words[source]
    return "".join(parts)


def char_noise(text: str, rng: np.random.Generator) -> str:
    """``text`` with ``CHAR_NOISE_RATE`` of its non-space characters replaced by random printable ones."""
    chars = np.array(list(text))
    candidates = np.flatnonzero(~np.char.isspace(chars)) if len(chars) else np.array([], dtype=int)
    hit = candidates[rng.random(len(candidates)) < CHAR_NOISE_RATE]
    chars[hit] = rng.choice(_PRINTABLE, size=len(hit))
    return "".join(chars.tolist())


def boilerplate(text: str, rng: np.random.Generator) -> str:
    """One non-blank line of ``text`` (at most 200 characters of it) repeated to the length of ``text``."""
    lines = [line for line in text.splitlines() if line.strip()] or [text.strip() or "x"]
    line = lines[rng.integers(len(lines))]
    if len(line) > 200:
        start = int(rng.integers(len(line) - 200))
        line = line[start : start + 200]
    return "\n".join([line] * max(3, len(text) // (len(line) + 1))) + "\n"


def fragment(text: str, rng: np.random.Generator) -> str:
    """A prefix of ``text`` of ``FRAGMENT_SHARE`` of its length, ending on a non-space character."""
    cut = max(16, int(len(text) * rng.uniform(*FRAGMENT_SHARE)))
    piece = text[:cut].rstrip()
    return piece or text[:cut]


MAKERS = {
    "shuffled_words": shuffled_words,
    "char_noise": char_noise,
    "boilerplate": boilerplate,
    "fragment": fragment,
}
