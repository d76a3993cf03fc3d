"""MDS directories written by mosaicml-streaming's ``MDSWriter``, read through streaming's shard readers.

Each sample is one document whose token ids sit in one column (default ``tokens``) of MDS type
``ndarray:uint16`` or ``ndarray:int32``. Shards are opened with ``streaming.base.format.reader_from_json``
and samples decoded with ``MDSReader.get_item``, so the shard format is streaming's own. Compressed shards
are decompressed with ``streaming.base.compression`` and checked with ``streaming.base.hashing`` whenever the
index lists hashes. With ``remote=``, missing files are fetched by streaming's downloaders into ``path``,
which then acts as the local cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tikmix_loader.data.sources._lengths_cache import cache_root, file_fingerprint, load_lengths, save_lengths
from tikmix_loader.data.sources._tokens import cast_tokens
from tikmix_loader.data.sources.base import TokenSource
from tikmix_loader.errors import ShardError

INDEX_FILE = "index.json"
MDS_DTYPES = ("uint16", "int32")
DEFAULT_HASHES = ("xxh64",)

# ``import streaming`` costs seconds (it pulls in its multimodal and cloud modules), so it is imported inside
# the functions that need it and ``import tikmix_loader`` stays light.

# Reading failures a damaged shard can raise from inside streaming's decoder.
_DECODE_ERRORS = (ValueError, IndexError, TypeError, KeyError, OSError, OverflowError)


class MDSSource(TokenSource):
    """Documents of an MDS directory, one per sample, with random access through streaming's readers.

    ``StreamingDataset`` is not used: it allows one dataset per local directory per process, coordinates
    through shared memory and imposes its own epoch order, while the mixture loader needs plain random
    access to many domains at once. Streaming's per-shard readers give exactly that.

    Opening checks every shard's size against ``index.json``. The first open of a given set of files also
    validates shard hashes and scans every sample once for its length; the lengths are cached (see
    ``_lengths_cache``) so later opens skip both.

    Args:
        path (str | PathLike): The local directory holding ``index.json`` and the shards. With ``remote``,
            the local cache that missing files are downloaded into.
        remote (str, optional): A streaming remote (``s3://…``, ``gs://…``, another local directory, …) to
            fetch ``index.json`` and shards from when they are not in ``path``. Default: ``None``.
        column (str): The sample column holding the token ids. Default: ``"tokens"``.
        vocab_size (int, optional): Token ids must be ``< vocab_size``. Default: ``None`` (only ``>= 0``).
        validate_hash (str | bool): ``"auto"`` checks each shard against the first hash algorithm its
            index lists (no check when it lists none); an algorithm name (e.g. ``"sha1"``) requires that one;
            ``False`` skips hash checks. Default: ``"auto"``.
        download_timeout (float): Seconds allowed per downloaded file. Default: ``60.0``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        remote: str | None = None,
        column: str = "tokens",
        vocab_size: int | None = None,
        validate_hash: str | bool = "auto",
        download_timeout: float = 60.0,
    ):
        self.path = os.fspath(path)
        self.remote = remote
        self.column = column
        self.vocab_size = vocab_size
        self.validate_hash = validate_hash
        self.download_timeout = float(download_timeout)
        index_path = Path(self.path) / INDEX_FILE
        if remote is not None:
            self._fetch(INDEX_FILE)
        self._readers = [self._make_reader(shard, index_path) for shard in _read_index(index_path)]
        stored = [self._stored_file(reader) for reader in self._readers]
        samples = np.array([reader.samples for reader in self._readers], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(samples)])
        key = file_fingerprint([index_path, *stored], kind="mds", column=column, validate=validate_hash)
        cached = load_lengths(key)
        fresh = cached is None or len(cached) != self._shard_starts[-1]
        for reader, stored_file in zip(self._readers, stored, strict=True):
            self._prepare_raw(reader, stored_file, validate=fresh)
        if fresh:
            cached = self._scan_lengths()
            save_lengths(key, cached)
        self._lengths = cached

    @property
    def num_docs(self) -> int:
        return int(self._shard_starts[-1])

    def doc_lengths(self) -> np.ndarray:
        return self._lengths

    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        if not 0 <= start <= stop <= self.num_docs:
            raise IndexError(f"{self.path}: document range [{start}, {stop}) outside [0, {self.num_docs}).")
        documents = []
        shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        for index in range(start, stop):
            while index >= self._shard_starts[shard + 1]:
                shard += 1
            document = self._decode(shard, index - int(self._shard_starts[shard]))
            if len(document) != self._lengths[index]:
                raise ShardError(
                    f"{self._shard_file(self._readers[shard])}: document {index} now holds {len(document)} "
                    f"tokens but held {self._lengths[index]} when the domain was opened; the shard changed "
                    f"on disk. Re-open the domain."
                )
            documents.append(document)
        return documents

    def _make_reader(self, shard: dict, index_path: Path):
        from streaming.base.format import reader_from_json

        try:
            if shard["format"] != "mds":
                raise ShardError(
                    f"{index_path}: lists a {shard['format']!r} shard; only MDS shards are read here. "
                    f"Re-write the dataset with streaming's MDSWriter."
                )
            reader = reader_from_json(self.path, None, shard)
            column_index = (
                reader.column_names.index(self.column) if self.column in reader.column_names else -1
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(
                f"{index_path}: shard entry is malformed ({type(exc).__name__}: {exc}); the index is "
                f"corrupt. Re-write the dataset with MDSWriter or `tikmix convert`."
            ) from exc
        if column_index < 0:
            raise ShardError(
                f"{index_path}: shard {reader.raw_data.basename} has no column {self.column!r} (columns: "
                f"{reader.column_names}); pass `column=` naming the token column."
            )
        encoding = reader.column_encodings[column_index]
        if not encoding.startswith("ndarray"):
            raise ShardError(
                f"{index_path}: column {self.column!r} has MDS encoding {encoding!r}; token ids must be "
                f"stored as 'ndarray:uint16' or 'ndarray:int32'."
            )
        return reader

    def _shard_file(self, reader) -> Path:
        return Path(reader.dirname) / reader.raw_data.basename

    def _stored_file(self, reader) -> Path:
        """The file holding this shard in ``path`` (raw, else compressed), fetched from ``remote``."""
        local = Path(self.path)
        raw, packed = reader.raw_data, reader.zip_data
        if (local / raw.basename).is_file():
            return local / raw.basename
        if packed is not None and (local / packed.basename).is_file():
            return local / packed.basename
        if self.remote is not None:
            name = packed.basename if packed is not None else raw.basename
            self._fetch(name)
            return local / name
        listed = raw.basename if packed is None else f"{raw.basename} or {packed.basename}"
        raise ShardError(
            f"{local}: shard {listed} listed in {INDEX_FILE} is missing; restore it, re-download the "
            f"dataset or pass `remote=` to fetch it."
        )

    def _prepare_raw(self, reader, stored: Path, *, validate: bool) -> None:
        """Point ``reader`` at an uncompressed shard of the right size, decompressing it if needed."""
        if stored.name != reader.raw_data.basename:
            raw_dir = Path(self.path) if self.remote is not None else _decompressed_dir(stored)
            reader.dirname = str(raw_dir)
            if not self._shard_file(reader).is_file():
                self._decompress(reader, stored)
                validate = True
        shard_file = self._shard_file(reader)
        size = shard_file.stat().st_size
        if size != reader.raw_data.bytes:
            raise ShardError(
                f"{shard_file}: holds {size} bytes but {INDEX_FILE} declares {reader.raw_data.bytes}; the "
                f"shard is truncated or corrupt. Re-convert or re-download it."
            )
        if validate:
            self._check_hash(shard_file, reader.raw_data.hashes, shard_file.read_bytes())

    def _decompress(self, reader, stored: Path) -> None:
        from streaming.base.compression import decompress

        data = stored.read_bytes()
        self._check_hash(stored, reader.zip_data.hashes, data)
        try:
            raw = decompress(reader.compression, data)
        except Exception as exc:  # zstd/gzip/brotli/snappy each raise their own error type
            raise ShardError(
                f"{stored}: cannot decompress with {reader.compression!r} ({exc}); the shard is corrupt or "
                f"truncated. Re-convert or re-download it."
            ) from exc
        target = self._shard_file(reader)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            stream.write(raw)
        os.replace(temp_name, target)

    def _check_hash(self, file: Path, hashes: dict[str, str], data: bytes) -> None:
        from streaming.base.hashing import get_hash

        if self.validate_hash is False or (self.validate_hash == "auto" and not hashes):
            return
        algorithm = next(iter(hashes)) if self.validate_hash == "auto" else self.validate_hash
        if algorithm not in hashes:
            raise ShardError(
                f"{file}: `validate_hash={algorithm!r}` but {INDEX_FILE} records only {sorted(hashes)} for "
                f"this shard; pass one of those, 'auto' or False."
            )
        actual = get_hash(algorithm, data)
        if actual != hashes[algorithm]:
            raise ShardError(
                f"{file}: {algorithm} checksum failure (index.json records {hashes[algorithm]}, the file "
                f"hashes to {actual}); the shard is corrupt. Re-convert or re-download it."
            )

    def _fetch(self, name: str) -> None:
        from streaming.base.storage import CloudDownloader

        source = f"{self.remote.rstrip('/')}/{name}"
        try:
            CloudDownloader.direct_download(source, os.path.join(self.path, name), self.download_timeout)
        except Exception as exc:  # each cloud client raises its own error types
            raise ShardError(
                f"{source}: cannot download into {self.path} ({type(exc).__name__}: {exc}); check `remote=` "
                f"and credentials."
            ) from exc

    def _decode(self, shard: int, local_index: int) -> np.ndarray:
        reader = self._readers[shard]
        where = f"{self._shard_file(reader)} (sample {local_index})"
        try:
            tokens = reader.get_item(local_index)[self.column]
        except _DECODE_ERRORS as exc:
            raise ShardError(
                f"{where}: cannot decode ({type(exc).__name__}: {exc}); the shard is corrupt or truncated. "
                f"Re-convert or re-download it."
            ) from exc
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ShardError(
                f"{where}: column {self.column!r} decodes to {type(tokens).__name__} "
                f"{getattr(tokens, 'dtype', '')}{getattr(tokens, 'shape', '')}; it must be a 1-D integer "
                f"array."
            )
        return self.check_token_ids(tokens, where)

    def _scan_lengths(self) -> np.ndarray:
        lengths = np.empty(self.num_docs, dtype=np.int64)
        for shard, reader in enumerate(self._readers):
            offset = int(self._shard_starts[shard])
            for local_index in range(reader.samples):
                lengths[offset + local_index] = len(self._decode(shard, local_index))
        return lengths


def write_mds(
    directory: str | os.PathLike,
    documents: Iterable[np.ndarray],
    *,
    dtype: str = "uint16",
    column: str = "tokens",
    compression: str | None = None,
    hashes: Iterable[str] = DEFAULT_HASHES,
    size_limit: int = 1 << 26,
) -> Path:
    """Write ``documents`` as an MDS dataset (one sample per document) with streaming's ``MDSWriter``.

    Args:
        directory (str | PathLike): New or empty output directory.
        documents (Iterable[np.ndarray]): 1-D integer token arrays; streamed, never held together.
        dtype (str): ``"uint16"`` or ``"int32"``. Default: ``"uint16"``.
        column (str): Column name. Default: ``"tokens"``.
        compression (str, optional): A streaming compression such as ``"zstd"``. Default: ``None``.
        hashes (Iterable[str]): Streaming hash algorithms recorded per shard. Default: ``("xxh64",)``.
        size_limit (int): Shard size in bytes before a new shard starts. Default: 64 MiB.

    Returns:
        Path: ``directory``.
    """
    from streaming import MDSWriter

    if dtype not in MDS_DTYPES:
        raise ShardError(f"{directory}: MDS `dtype` must be one of {MDS_DTYPES}, got {dtype!r}.")
    with MDSWriter(
        out=os.fspath(directory),
        columns={column: f"ndarray:{dtype}"},
        compression=compression,
        hashes=sorted(hashes),
        size_limit=size_limit,
    ) as writer:
        for index, document in enumerate(documents):
            writer.write({column: cast_tokens(document, dtype, f"{directory} (document {index})")})
    return Path(directory)


def _read_index(index_path: Path) -> list[dict]:
    try:
        text = index_path.read_text()
    except FileNotFoundError as exc:
        raise ShardError(
            f"{index_path}: not found; an MDS directory needs the index.json that MDSWriter writes when it "
            f"finishes. Re-run the conversion (`tikmix convert`) or pass `remote=`."
        ) from exc
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(
            f"{index_path}: is empty or corrupt ({exc}); re-run the conversion or re-download the dataset."
        ) from exc
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise ShardError(
            f"{index_path}: not a streaming version-2 index (expected {{'version': 2, 'shards': [...]}}); "
            f"re-write the dataset with mosaicml-streaming's MDSWriter."
        )
    return index["shards"]


def _decompressed_dir(stored: Path) -> Path:
    """Cache directory for the uncompressed twin of a local compressed shard, keyed by its identity."""
    return cache_root() / "mds-raw" / file_fingerprint([stored])[:32]
