"""``Domain``: a named token source plus how its documents become training sequences."""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np

from tikmix_loader.data.sources import TokenSource, open_source
from tikmix_loader.data.tokenizer import ByteTokenizer
from tikmix_loader.errors import ConfigError, DomainError

MODES = ("packed", "document")


class Domain:
    """One data domain (e.g. ``code``, ``web``) that the mixture loader samples from.

    Args:
        name (str): Unique domain name; the key used in mixture weights.
        path (str | PathLike): An MDS directory, a Parquet file or directory, or a ``.bin`` memmap.
        format (str): ``"auto"`` (sniff the path), ``"mds"``, ``"parquet"`` or ``"memmap"``. Default: ``"auto"``.
        mode (str): ``"packed"`` concatenates documents, each followed by ``eos_id``, and cuts the stream into
            windows of ``seq_len + 1`` tokens that overlap by one token (so every token is predicted once).
            ``"document"`` makes one sample per document: truncated to ``seq_len + 1`` tokens, padded with
            ``pad_id`` and loss-masked. Default: ``"packed"``.
        eos_id (int): Separator appended to every document in packed mode. Default: the byte tokenizer's 256.
        pad_id (int): Padding id in document mode. Default: the byte tokenizer's 257.
        **source_options: Passed to the format's reader (e.g. ``token_column`` for Parquet, ``vocab_size``).
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        format: str = "auto",
        mode: str = "packed",
        eos_id: int = ByteTokenizer.eos_id,
        pad_id: int = ByteTokenizer.pad_id,
        **source_options,
    ):
        if not isinstance(name, str) or not name:
            raise DomainError(f"Domain `name` must be a non-empty string, got {name!r}.")
        if mode not in MODES:
            raise ConfigError(f"Domain {name!r}: `mode` must be one of {MODES}, got {mode!r}.")
        self.name = name
        self.path = os.fspath(path)
        self.mode = mode
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.source: TokenSource = open_source(path, format, **source_options)
        if self.source.num_docs == 0 or self.num_tokens == 0:
            raise DomainError(
                f"Domain {name!r} at {self.path} is empty ({self.source.num_docs} documents, "
                f"{self.num_tokens} tokens); remove it from the mixture or point it at data."
            )

    @cached_property
    def doc_lengths(self) -> np.ndarray:
        """Token count of each document, int64 ``[num_docs]``."""
        return np.asarray(self.source.doc_lengths(), dtype=np.int64)

    @property
    def num_docs(self) -> int:
        return self.source.num_docs

    @cached_property
    def num_tokens(self) -> int:
        """Tokens over all documents, separators not included."""
        return self.source.num_tokens

    def num_samples(self, seq_len: int) -> int:
        """Samples of ``seq_len + 1`` tokens that one epoch of this domain yields."""
        if seq_len < 1:
            raise ConfigError(f"`seq_len` must be >= 1, got {seq_len}.")
        if self.mode == "document":
            return self.num_docs
        stream_length = self.num_tokens + self.num_docs  # one EOS after every document
        return max(0, (stream_length - 1) // seq_len)

    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        """Documents ``start .. stop-1`` in storage order."""
        return self.source.read_docs(start, stop)

    def __repr__(self) -> str:
        return f"Domain(name={self.name!r}, path={self.path!r}, mode={self.mode!r}, docs={self.num_docs})"
