"""Parquet files or directories, one document per row in a ``list<int>`` token column, read by row group.

Only one row group of the token column is ever decoded at a time (``pq.ParquetFile.read_row_group``), and
the last one decoded is kept, so reading consecutive documents touches each row group once.

``write_parquet`` (used by ``tikmix convert``) also stores each document's token count in an int64 column
``num_tokens`` and, in the schema metadata under ``b"tikmix"``, the ids' EOS/PAD/vocabulary and the name of
that column. Opening such files reads only that small column; files written by others are scanned once
(the list lengths of the token column) and their lengths cached (``_lengths_cache``). Other per-document
columns can be read the same way, without decoding documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tikmix_loader.data.sources._lengths_cache import file_fingerprint, load_lengths, save_lengths
from tikmix_loader.data.sources._token_info import EMBED_KEY, read_token_info
from tikmix_loader.data.sources._tokens import cast_tokens
from tikmix_loader.data.sources.base import TokenSource, concatenated_ranges
from tikmix_loader.errors import ShardError

LENGTHS_COLUMN = "num_tokens"


class ParquetSource(TokenSource):
    """Documents of one Parquet file, or of every ``*.parquet`` under a directory (sorted by path).

    Args:
        path (str | PathLike): A ``.parquet`` file or a directory searched recursively for them.
        token_column (str): The ``list<int>`` column holding each document's token ids. Default: ``"tokens"``.
        vocab_size (int, optional): Token ids must be ``< vocab_size``. Default: ``None``, which takes the
            vocabulary in the schema metadata ``tikmix convert`` writes (else only ids ``>= 0`` are checked).

    Attributes:
        token_info (dict): ``eos_id`` / ``pad_id`` / ``vocab_size`` from the first file's schema metadata.
    """

    def __init__(
        self, path: str | os.PathLike, *, token_column: str = "tokens", vocab_size: int | None = None
    ):
        self.path = os.fspath(path)
        self.token_column = token_column
        root = Path(path)
        self._files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
        if not self._files:
            raise ShardError(f"{root}: no *.parquet files in this directory; point `path` at Parquet data.")
        # One entry per row group, over all files: which file, which group, and its first document.
        group_file, group_index, group_rows, embedded = [], [], [], []
        for file_number, file in enumerate(self._files):
            metadata = self._metadata(file)
            embedded.append(_embedded(metadata, file))
            for group in range(metadata.num_row_groups):
                group_file.append(file_number)
                group_index.append(group)
                group_rows.append(metadata.row_group(group).num_rows)
        self._group_file = np.asarray(group_file, dtype=np.int64)
        self._group_index = np.asarray(group_index, dtype=np.int64)
        self._group_starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
        self._reset_handles()
        self.token_info = read_token_info(embedded[0], str(self._files[0]))
        self.vocab_size = vocab_size if vocab_size is not None else self.token_info.get("vocab_size")
        lengths_columns = {entry.get("lengths_column") for entry in embedded}
        if len(lengths_columns) == 1 and None not in lengths_columns:
            self._lengths = self.read_doc_column(lengths_columns.pop()).astype(np.int64, copy=False)
        else:
            key = file_fingerprint(self._files, kind="parquet", column=token_column)
            lengths = load_lengths(key)
            if lengths is None or len(lengths) != self.num_docs:
                lengths = self._scan_lengths()
                save_lengths(key, lengths)
            self._lengths = lengths

    @property
    def num_docs(self) -> int:
        return int(self._group_starts[-1])

    def doc_lengths(self) -> np.ndarray:
        return self._lengths

    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        if not 0 <= start <= stop <= self.num_docs:
            raise IndexError(f"{self.path}: document range [{start}, {stop}) outside [0, {self.num_docs}).")
        documents: list[np.ndarray] = []
        group = int(np.searchsorted(self._group_starts, start, side="right")) - 1
        while start < stop:
            values, offsets = self._row_group(group)
            first = int(self._group_starts[group])
            last = min(stop, int(self._group_starts[group + 1]))
            bounds = offsets[start - first : last - first + 1]
            if not np.array_equal(np.diff(bounds), self._lengths[start:last]):
                raise ShardError(
                    f"{self._files[self._group_file[group]]} (row group {self._group_index[group]}): "
                    f"documents {start}..{last - 1} do not hold the token counts recorded when the domain "
                    f"was opened; the file changed on disk or its {LENGTHS_COLUMN!r} column is wrong. "
                    f"Re-open the domain or re-run `tikmix convert`."
                )
            documents.extend(np.split(values[bounds[0] : bounds[-1]], bounds[1:-1] - bounds[0]))
            start, group = last, group + 1
        return documents

    def read_doc_ranges(self, docs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        # Gathers from each decoded row group in turn (storage order), with no per-document call.
        docs, starts, stops = self.check_doc_ranges(docs, starts, stops)
        lengths = stops - starts
        tokens = np.empty(int(lengths.sum()), dtype=np.int64)
        placed = np.cumsum(lengths) - lengths  # where each range goes in ``tokens``
        groups = np.searchsorted(self._group_starts, docs, side="right") - 1
        for group in np.unique(groups).tolist():
            values, offsets = self._row_group(group)
            rows = np.flatnonzero(groups == group)
            local = docs[rows] - self._group_starts[group]
            if not np.array_equal(offsets[local + 1] - offsets[local], self._lengths[docs[rows]]):
                raise ShardError(
                    f"{self._files[self._group_file[group]]} (row group {self._group_index[group]}): "
                    f"documents do not hold the token counts recorded when the domain was opened; the file "
                    f"changed on disk or its {LENGTHS_COLUMN!r} column is wrong. Re-open the domain or "
                    f"re-run `tikmix convert`."
                )
            tokens[concatenated_ranges(placed[rows], lengths[rows])] = values[
                concatenated_ranges(offsets[local] + starts[rows], lengths[rows])
            ]
        return tokens

    def __getstate__(self) -> dict:
        # Open files and decoded row groups stay in the process that made them.
        state = self.__dict__.copy()
        for name in ("_handle", "_handle_key", "_cached", "_cached_group"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._handle: pq.ParquetFile | None = None
        self._handle_key: tuple[int, int] | None = None
        self._cached: tuple[np.ndarray, np.ndarray] | None = None
        self._cached_group = -1

    def _metadata(self, file: Path) -> pq.FileMetaData:
        try:
            metadata = pq.read_metadata(file)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(
                f"{file}: not a readable Parquet file ({exc}); it is truncated or corrupt. Re-convert it."
            ) from exc
        schema = metadata.schema.to_arrow_schema()
        if self.token_column not in schema.names:
            raise ShardError(
                f"{file}: no column {self.token_column!r} (columns: {schema.names}); pass `token_column=`."
            )
        column_type = schema.field(self.token_column).type
        if not (
            (pa.types.is_list(column_type) or pa.types.is_large_list(column_type))
            and pa.types.is_integer(column_type.value_type)
        ):
            raise ShardError(
                f"{file}: column {self.token_column!r} has type {column_type}; token ids must be list<int>. "
                f"Tokenize the text first (`tikmix convert`)."
            )
        return metadata

    def _file(self, file_number: int) -> pq.ParquetFile:
        # One open file per process: forked loader workers must not share the parent's file position.
        key = (file_number, os.getpid())
        if self._handle_key != key:
            self._handle = pq.ParquetFile(self._files[file_number])
            self._handle_key = key
        return self._handle

    def _read_group(self, group: int) -> pa.ListArray:
        file = self._files[self._group_file[group]]
        where = f"{file} (row group {self._group_index[group]})"
        try:
            table = self._file(int(self._group_file[group])).read_row_group(
                int(self._group_index[group]), columns=[self.token_column]
            )
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{where}: cannot be read ({exc}); the file is corrupt. Re-convert it.") from exc
        column = table.column(0).combine_chunks()
        if column.null_count:
            first_null = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ShardError(
                f"{where}: row {first_null} has a null {self.token_column!r}; every row must hold a list of "
                f"token ids (use an empty list for an empty document, or drop the row)."
            )
        return column

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat token ids and ``rows + 1`` offsets of one row group, kept until another group is asked for."""
        if group != self._cached_group:
            column = self._read_group(group)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            values = column.flatten().to_numpy(zero_copy_only=False)
            where = f"{self._files[self._group_file[group]]} (row group {self._group_index[group]})"
            self.check_token_ids(values, where)
            self._cached = (values, np.concatenate([[0], np.cumsum(lengths)]))
            self._cached_group = group
        return self._cached

    def read_doc_column(self, column: str) -> np.ndarray:
        """One value per document from a scalar ``column``, read one row group at a time, no document decoded.

        The length column is one; other per-document columns (e.g. quality scores) are read the same way.
        Raises ``ShardError`` naming the file and row group when the column is missing or unreadable.
        """
        parts = []
        for group in range(len(self._group_file)):
            file = self._files[self._group_file[group]]
            try:
                table = self._file(int(self._group_file[group])).read_row_group(
                    int(self._group_index[group]), columns=[column]
                )
                if table.num_columns != 1:  # pyarrow skips a column the file lacks
                    raise KeyError("no such column")
                values = table.column(0).to_numpy()
            except (OSError, KeyError, pa.ArrowException) as exc:
                raise ShardError(
                    f"{file} (row group {self._group_index[group]}): cannot read the per-document column "
                    f"{column!r} ({exc}); re-run `tikmix convert` or pass a column the files hold."
                ) from exc
            parts.append(values)
        return np.concatenate(parts) if parts else np.zeros(0)

    def _scan_lengths(self) -> np.ndarray:
        lengths = np.empty(self.num_docs, dtype=np.int64)
        for group in range(len(self._group_file)):
            offsets = self._row_group(group)[1]
            lengths[self._group_starts[group] : self._group_starts[group + 1]] = np.diff(offsets)
        return lengths


def write_parquet(
    directory: str | os.PathLike,
    documents: Iterable[np.ndarray],
    *,
    dtype: str = "uint16",
    token_column: str = "tokens",
    rows_per_group: int = 1024,
    rows_per_file: int = 65536,
    compression: str = "snappy",
    token_info: Mapping | None = None,
) -> Path:
    """Write ``documents`` as ``part-NNNNN.parquet`` files, one row per document in a ``list<dtype>`` column.

    Each row also holds the document's token count (column ``num_tokens``), and the schema metadata records
    ``token_info`` and that column (see the module docstring).

    Args:
        directory (str | PathLike): Output directory (created if missing).
        documents (Iterable[np.ndarray]): 1-D integer token arrays; streamed one row group at a time.
        dtype (str): Element type of the list column. Default: ``"uint16"``.
        token_column (str): Column name. Default: ``"tokens"``.
        rows_per_group (int): Documents per row group. Default: ``1024``.
        rows_per_file (int): A new part starts after the row group that reaches this many documents.
            Default: ``65536``.
        compression (str): Parquet codec (``"none"``, ``"snappy"``, ``"zstd"``, …). Default: ``"snappy"``.
        token_info (Mapping, optional): ``eos_id`` / ``pad_id`` / ``vocab_size`` / ``tokenizer`` of the ids
            (``_token_info.token_info_of``). Default: ``None``.

    Returns:
        Path: ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    embedded = {**(token_info or {}), "lengths_column": LENGTHS_COLUMN}
    schema = pa.schema(
        [(token_column, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))), (LENGTHS_COLUMN, pa.int64())],
        metadata={EMBED_KEY.encode(): json.dumps(embedded, sort_keys=True).encode()},
    )
    writer: pq.ParquetWriter | None = None
    batch: list[np.ndarray] = []
    rows_in_file = parts = 0

    def flush() -> None:
        nonlocal writer, rows_in_file, parts
        if writer is None:
            writer = pq.ParquetWriter(
                directory / f"part-{parts:05d}.parquet", schema, compression=compression
            )
            parts += 1
        if not batch:  # no documents at all: a file with the schema and no row groups
            return
        values = np.concatenate(batch)
        lengths = np.array([len(document) for document in batch], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        table = pa.table({token_column: column, LENGTHS_COLUMN: lengths}, schema=schema)
        writer.write_table(table, row_group_size=len(batch))
        rows_in_file += len(batch)
        batch.clear()
        if rows_in_file >= rows_per_file:
            writer.close()
            writer, rows_in_file = None, 0

    try:
        for index, document in enumerate(documents):
            batch.append(cast_tokens(document, dtype, f"{directory} (document {index})"))
            if len(batch) == rows_per_group:
                flush()
        if batch or parts == 0:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return directory


def _embedded(metadata: pq.FileMetaData, file: Path) -> dict:
    """The ``b"tikmix"`` schema metadata of one file (``{}`` when absent)."""
    raw = (metadata.schema.to_arrow_schema().metadata or {}).get(EMBED_KEY.encode())
    if raw is None:
        return {}
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        raise ShardError(
            f"{file}: its {EMBED_KEY!r} schema metadata is not JSON ({exc}); re-convert."
        ) from exc
    if not isinstance(entry, dict):
        raise ShardError(f"{file}: its {EMBED_KEY!r} schema metadata must be an object; re-convert.")
    return entry
