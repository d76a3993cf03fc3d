"""Deterministic, seekable block shuffling of one domain: random streams keyed by (seed, domain, epoch).

Shuffling is two-level, in the spirit of mosaicml-streaming's ``py1b``: documents are grouped into fixed
blocks of consecutive documents, the block order is permuted per epoch, and documents are permuted inside
each block. Only ``num_blocks`` integers are ever held per epoch (never a permutation of every document),
so it scales to billions of documents, and any position of any epoch can be reached without replaying
the ones before it. We do not call streaming's shuffles directly because they return the full per-sample
permutation as one array, which is what this design avoids.
"""

from __future__ import annotations

import hashlib
import operator

import numpy as np

from tikmix_loader.data import _compiled


def stable_key(name: str) -> int:
    """A 63-bit integer derived from ``name`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for ``(seed, *keys)``: equal keys give equal streams, others differ.

    The generator is ``PCG64(SeedSequence([seed, *keys]))``. The shuffles take their permutations from
    ``keyed_permutation`` (the same numbers, compiled), which falls back to this generator; seeding it is
    slow: SeedSequence splits Python ints into 32-bit words in Python-level code, so we hand it those words
    already split (``_entropy_words``), which gives the same pool, hence the same numbers, at about half the
    cost of the whole seeding.
    """
    values = (int(seed), *map(int, keys))
    if min(values) < 0:  # not valid entropy: let SeedSequence raise its own error
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(values))))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy_words(values))))


def keyed_permutation(seed: int, *keys: int, n: int) -> np.ndarray:
    """``rng_for(seed, *keys).permutation(n)``, bit for bit: a random order of ``0 .. n-1`` keyed by
    ``(seed, *keys)``.

    Every shuffle chunk and block a rank reads, and every global batch, needs one, so on the per-batch path
    the numbers come from compiled code (``_compiled``: the same algorithm, checked against numpy at first
    use), which skips numpy's Python-level seeding; numpy computes them when that is unavailable.
    Keys are validated like ``rng_for``'s (a negative one raises SeedSequence's ``ValueError``).

    Args:
        seed (int): Global seed (>= 0).
        *keys (int): Stream keys (>= 0, any size).
        n (int): Length of the permutation (>= 0).

    Returns:
        np.ndarray: int64 array holding each of ``0 .. n-1`` once.
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"keyed_permutation: n must be >= 0, got {n}")
    values = (int(seed), *map(int, keys))
    library = _compiled.module()
    if library is None or n > _compiled.MAX_LENGTH or min(values) < 0:
        return rng_for(seed, *keys).permutation(n)
    if max(values) >= 2**64:  # the compiled code takes 64-bit values; words are values giving themselves
        return library.permutation(_entropy_words(values).tolist(), n)
    return library.permutation(values, n)


def _entropy_words(values: tuple[int, ...]) -> np.ndarray:
    """The uint32 words SeedSequence makes of non-negative ints: each int's words, least significant first,
    one word ``0`` for a zero (numpy's ``_coerce_to_uint32_array``)."""
    words = []
    for value in values:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        while value:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return np.array(words, dtype=np.uint32)


# Tags that keep the different random streams of one (seed, domain, epoch) apart.
BLOCK_ORDER, WITHIN_BLOCK, WINDOW_ORDER, OBSERVATION, BATCH_ORDER, QUALITY_COPIES = range(6)


class BlockShuffle:
    """The document order of one domain in one epoch.

    Args:
        num_docs (int): Documents in the domain.
        block_docs (int): Consecutive documents per block.
        seed (int): Global seed.
        domain_key (int): ``stable_key(domain_name)``.
        epoch (int): Epoch number.
    """

    def __init__(self, num_docs: int, block_docs: int, seed: int, domain_key: int, epoch: int):
        self.num_docs = num_docs
        self.block_docs = block_docs
        self.seed = seed
        self.domain_key = domain_key
        self.epoch = epoch
        num_blocks = -(-num_docs // block_docs)
        self.block_order = keyed_permutation(seed, domain_key, epoch, BLOCK_ORDER, n=num_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.block_order)

    def block_range(self, block: int) -> tuple[int, int]:
        """Storage document range ``[start, stop)`` of block id ``block``."""
        start = block * self.block_docs
        return start, min(start + self.block_docs, self.num_docs)

    def within_block(self, block: int) -> np.ndarray:
        """Permutation of the documents of block id ``block`` (offsets into its range)."""
        start, stop = self.block_range(block)
        return keyed_permutation(self.seed, self.domain_key, self.epoch, WITHIN_BLOCK, block, n=stop - start)

    def documents(self, block: int, copies: np.ndarray | None = None) -> np.ndarray:
        """Storage ids of block id ``block``'s documents in shuffled order.

        With ``copies`` (one count per document of the domain, from quality sampling) each document appears
        that many times and the expanded list is permuted with the same key; without, or with every count
        1, the order is exactly ``block_range(block)[0] + within_block(block)``.
        """
        start, stop = self.block_range(block)
        ids = np.arange(start, stop, dtype=np.int64)
        if copies is not None:
            ids = np.repeat(ids, copies[start:stop])
        return ids[keyed_permutation(self.seed, self.domain_key, self.epoch, WITHIN_BLOCK, block, n=len(ids))]
