"""The contract every on-disk token format implements: random access to documents by index."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from tikmix_loader.errors import ShardError


class TokenSource(abc.ABC):
    """Read-only, random access to the documents (token arrays) of one dataset on disk.

    Subclasses open one format (MDS, Parquet, flat memmap). The loader only needs three things: how long each
    document is (to plan packing and report sizes without reading tokens), and the documents of a contiguous
    index range. Documents come back in storage order as 1-D integer arrays, already checked against the
    declared dtype and vocabulary.

    Attributes:
        path (str): The file or directory the source reads, used in every error message.
        vocab_size (int | None): Token ids must be ``< vocab_size`` when it is known.
        token_info (Mapping): ``eos_id`` / ``pad_id`` / ``vocab_size`` that the data's own metadata records
            (MDS index, Parquet schema, memmap sidecar); empty when it records none.
    """

    path: str
    vocab_size: int | None
    token_info: Mapping = MappingProxyType({})

    @property
    @abc.abstractmethod
    def num_docs(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def doc_lengths(self) -> np.ndarray:
        """Token count of every document, int64 of shape ``[num_docs]`` (may be memory-mapped)."""

    @abc.abstractmethod
    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        """Documents ``start .. stop-1`` in storage order."""

    def read_doc_ranges(self, docs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Tokens ``starts[i] .. stops[i]-1`` of document ``docs[i]``, for every ``i``, concatenated.

        What a rank reading a few packed windows needs: only the part of each document under a window.
        This default decodes each distinct document once, in storage order, and slices it; formats that
        can read part of a document (memmap) override it.
        """
        docs, starts, stops = self.check_doc_ranges(docs, starts, stops)
        if len(docs) == 0:
            return np.zeros(0, dtype=np.int64)
        decoded = {int(doc): self.read_docs(int(doc), int(doc) + 1)[0] for doc in np.unique(docs)}
        return np.concatenate(
            [
                decoded[doc][start:stop]
                for doc, start, stop in zip(docs.tolist(), starts.tolist(), stops.tolist())
            ]
        )

    def lengths_of(self, docs: np.ndarray) -> np.ndarray:
        """Token counts of documents ``docs`` (valid storage ids)."""
        return np.asarray(self.doc_lengths())[docs]

    def check_doc_ranges(self, docs, starts, stops) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``docs, starts, stops`` as int64 arrays; ``IndexError`` naming the source when one is out of range
        (like ``read_docs``)."""
        docs, starts, stops = (np.asarray(values, dtype=np.int64) for values in (docs, starts, stops))
        if not len(docs):
            return docs, starts, stops
        outside = (docs < 0) | (docs >= self.num_docs)
        if outside.any():
            raise IndexError(f"{self.path}: document {docs[outside][0]} is outside [0, {self.num_docs}).")
        bad = (starts < 0) | (starts > stops) | (stops > self.lengths_of(docs))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"{self.path}: token range [{starts[i]}, {stops[i]}) is outside document {docs[i]} "
                f"({self.lengths_of(docs[i : i + 1])[0]} tokens)."
            )
        return docs, starts, stops

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents (separators not included)."""
        return int(np.asarray(self.doc_lengths()).sum(dtype=np.int64))

    def check_token_ids(self, tokens: np.ndarray, where: str | Callable[[], str]) -> np.ndarray:
        """Raise ``ShardError`` naming ``where`` if ``tokens`` holds ids outside ``[0, vocab_size)``.

        ``where`` may be a function that builds the location, called only on an error: a rank's small reads
        would otherwise spend more building the message than checking the ids.
        """
        if tokens.size == 0:
            return tokens
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            where = where() if callable(where) else where
            raise ShardError(
                f"{where}: token ids span [{low}, {high}], outside the declared vocabulary "
                f"[0, {self.vocab_size}). Re-convert the data with the right tokenizer or pass the right "
                f"`vocab_size` to Domain."
            )
        return tokens


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # output position where each range begins
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
