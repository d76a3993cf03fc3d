"""The contract every on-disk token format implements: random access to documents by index."""

from __future__ import annotations

import abc
from collections.abc import Mapping
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

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents (separators not included)."""
        return int(np.asarray(self.doc_lengths()).sum(dtype=np.int64))

    def check_token_ids(self, tokens: np.ndarray, where: str) -> np.ndarray:
        """Raise ``ShardError`` naming ``where`` if ``tokens`` holds ids outside ``[0, vocab_size)``."""
        if tokens.size == 0:
            return tokens
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            raise ShardError(
                f"{where}: token ids span [{low}, {high}], outside the declared vocabulary "
                f"[0, {self.vocab_size}). Re-convert the data with the right tokenizer or pass the right "
                f"`vocab_size` to Domain."
            )
        return tokens
