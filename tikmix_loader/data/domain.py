"""``Domain``: a named token source plus how its documents become training sequences."""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np

from tikmix_loader.data.metadata import DatasetMeta, read_dataset_meta
from tikmix_loader.data.sources import TokenSource, open_source
from tikmix_loader.errors import ConfigError, DomainError, ShardError

MODES = ("packed", "document")


class Domain:
    """One data domain (e.g. ``code``, ``web``) that the mixture loader samples from.

    Args:
        name (str): Unique domain name; the key used in mixture weights.
        path (str | PathLike): An MDS directory, a Parquet file or directory, or a ``.bin`` memmap.
        format (str): ``"auto"`` (sniff the path), ``"mds"``, ``"parquet"`` or ``"memmap"``.
            Default: ``"auto"``.
        mode (str): ``"packed"`` concatenates documents, each followed by ``eos_id``, and cuts the stream into
            windows of ``seq_len + 1`` tokens that overlap by one token (so every token is predicted once).
            ``"document"`` makes one sample per document: truncated to ``seq_len + 1`` tokens, padded with
            ``pad_id`` and loss-masked. Default: ``"packed"``.
        eos_id (int, optional): Separator appended to every document in packed mode. Default: ``None``, which
            takes the dataset's ``tikmix.json``, else what the data's own metadata records (``tikmix convert``
            writes it into the MDS ``index.json``, the Parquet schema and the memmap sidecar, so remote MDS
            domains carry it too). A domain that records none needs it passed: a ``DomainError`` says so
            rather than guess an EOS the model never saw.
        pad_id (int, optional): Padding id in document mode. Default: ``None``, which takes ``tikmix.json``,
            else the data's own metadata, else ``eos_id`` (padding is always loss-masked).
        **source_options: Passed to the format's reader (e.g. ``token_column`` for Parquet; ``remote``,
            ``cache_limit`` and ``verify_hashes`` for MDS; ``vocab_size``, which is resolved like
            ``eos_id`` and required the same way).

    Attributes:
        metadata (DatasetMeta | None): The dataset's ``tikmix.json``, when it has one. When ``path`` is the
            whole dataset (its directory, or the single ``.bin`` of a memmap), its document and token counts
            must match the files, so a missing shard or a stale file fails here.
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        format: str = "auto",
        mode: str = "packed",
        eos_id: int | None = None,
        pad_id: int | None = None,
        **source_options,
    ):
        if not isinstance(name, str) or not name:
            raise DomainError(f"Domain `name` must be a non-empty string, got {name!r}.")
        if mode not in MODES:
            raise ConfigError(f"Domain {name!r}: `mode` must be one of {MODES}, got {mode!r}.")
        self.name = name
        self.path = os.fspath(path)
        self.mode = mode
        if source_options.get("remote") is None and not os.path.exists(self.path):
            raise DomainError(
                f"Domain {name!r}: {self.path} does not exist ({os.path.abspath(self.path)}); check the "
                f"path, or tokenize text into it first with `tikmix convert`."
            )
        self.metadata: DatasetMeta | None = None if source_options.get("remote") else read_dataset_meta(path)
        meta = self.metadata
        if meta is not None:
            source_options.setdefault("vocab_size", meta.vocab_size)
        self.source: TokenSource = open_source(path, format, **source_options)
        recorded = dict(self.source.token_info)
        if meta is not None:
            recorded.update(eos_id=meta.eos_id, pad_id=meta.pad_id)
        eos_id = eos_id if eos_id is not None else recorded.get("eos_id")
        vocab_size = self.source.vocab_size
        missing = [arg for arg, value in (("eos_id", eos_id), ("vocab_size", vocab_size)) if value is None]
        if missing:
            arguments = " and ".join(f"`{arg}=`" for arg in missing)
            raise DomainError(
                f"Domain {name!r} at {self.path}: its data records no {' or '.join(missing)} (no "
                f"tikmix.json, and the shard metadata names none), and a guessed EOS or vocabulary would be "
                f"silently wrong. Pass {arguments} from the tokenizer that made the ids, or re-convert with "
                f"`tikmix convert`, which records them."
            )
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id if pad_id is not None else recorded.get("pad_id", eos_id))
        self._check_metadata()
        for argument, value in (("eos_id", self.eos_id), ("pad_id", self.pad_id)):
            if value < 0 or (vocab_size is not None and value >= vocab_size):
                raise ConfigError(
                    f"Domain {name!r}: `{argument}`={value} is outside the vocabulary [0, {vocab_size}) of "
                    f"{self.path}; pass the id your tokenizer uses."
                )
        if self.source.num_docs == 0 or self.num_tokens == 0:
            raise DomainError(
                f"Domain {name!r} at {self.path} is empty ({self.source.num_docs} documents, "
                f"{self.num_tokens} tokens); remove it from the mixture or point it at data."
            )

    def _check_metadata(self) -> None:
        meta = self.metadata
        whole_dataset = os.path.isdir(self.path) or (meta is not None and meta.format == "memmap")
        if meta is None or not whole_dataset:
            return
        found = (self.source.num_docs, self.source.num_tokens)
        if found != (meta.num_docs, meta.num_tokens):
            raise ShardError(
                f"Domain {self.name!r}: {self.path} holds {found[0]} documents / {found[1]} tokens but its "
                f"tikmix.json records {meta.num_docs} / {meta.num_tokens}; a shard is missing or was "
                f"replaced. Restore it or re-run `tikmix convert`."
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

    def read_doc_ranges(self, docs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Tokens ``starts[i] .. stops[i]-1`` of document ``docs[i]`` (storage ids), concatenated.

        ``docs``, ``starts`` and ``stops`` are 1-D integer sequences of one length (``DomainError``, a
        ``ValueError``, names the argument otherwise); a document or token range outside the data raises
        ``IndexError`` naming the file (each source checks it against its documents).
        """
        ranges = {"docs": np.asarray(docs), "starts": np.asarray(starts), "stops": np.asarray(stops)}
        for argument, values in ranges.items():
            if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
                raise DomainError(
                    f"Domain {self.name!r}: read_doc_ranges needs `{argument}` as a 1-D sequence of "
                    f"integers, got {values.dtype} of shape {values.shape}."
                )
            if len(values) != len(ranges["docs"]):
                raise DomainError(
                    f"Domain {self.name!r}: read_doc_ranges got {len(values)} `{argument}` for "
                    f"{len(ranges['docs'])} `docs`; pass one start and one stop per document."
                )
        return self.source.read_doc_ranges(*ranges.values())

    def __repr__(self) -> str:
        return f"Domain(name={self.name!r}, path={self.path!r}, mode={self.mode!r}, docs={self.num_docs})"
