"""MDS directories written by mosaicml-streaming's ``MDSWriter``, read through streaming's shard readers.

Each sample is one document whose token ids sit in one column (default ``tokens``) of MDS type
``ndarray:uint16`` or ``ndarray:int32``. Shards are opened with ``streaming.base.format.reader_from_json``
and samples decoded with ``MDSReader.get_item``, so the shard format is streaming's own. Compressed local
shards are decompressed with ``streaming.base.compression`` into the tikmix cache; shards are checked with
``streaming.base.hashing`` as ``verify_hashes`` says. With ``remote=``, shards are fetched lazily into
``path`` by streaming's ``Stream`` (see ``_mds_remote``).

``write_mds`` (used by ``tikmix convert``) also writes a length index, ``tikmix-lengths.npy`` (int64 token
count per document), and records it with the ids' EOS/PAD/vocabulary under the key ``"tikmix"`` of
``index.json``, which streaming ignores. Opening such a directory reads no sample; directories written by
others are scanned once and their lengths cached (``_lengths_cache``).
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from array import array
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np

from tikmix_loader.data.sources._hash_check import (
    check_hash,
    check_verify_mode,
    pick_algorithm,
    verify_file,
)
from tikmix_loader.data.sources._lengths_cache import cache_root, file_fingerprint, load_lengths, save_lengths
from tikmix_loader.data.sources._token_info import EMBED_KEY, read_token_info
from tikmix_loader.data.sources._tokens import cast_tokens
from tikmix_loader.data.sources.base import TokenSource
from tikmix_loader.errors import ShardError

INDEX_FILE = "index.json"
LENGTHS_FILE = "tikmix-lengths.npy"
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

    Opening checks every local shard's size against ``index.json`` and its hash as ``verify_hashes`` says,
    and reads the document lengths from the length index (or scans and caches them).

    Args:
        path (str | PathLike): The local directory holding ``index.json`` and the shards. With ``remote``,
            the local cache that shards are downloaded into.
        remote (str, optional): A streaming remote (``s3://…``, ``gs://…``, ``file://…``, another local
            directory) to fetch ``index.json`` and shards from. Only ``index.json`` and the length index are
            fetched at open; a shard is fetched when first read, and the next ``prefetch_shards`` after it
            in the background. Default: ``None``.
        cache_limit (int, optional): With ``remote``, bytes of shards kept in ``path``; the least recently
            read shards are evicted to stay under it and fetched again when needed. It counts the shards
            this process fetched: ranks or DataLoader worker processes sharing ``path`` on one node each
            keep up to ``cache_limit`` (N processes up to N times it), so give each the node's budget
            divided by the processes sharing the directory. Default: ``None`` (no limit).
        prefetch_shards (int): With ``remote``, shards fetched ahead of the one being read. Default: ``2``.
        column (str): The sample column holding the token ids. Default: ``"tokens"``.
        vocab_size (int, optional): Token ids must be ``< vocab_size``. Default: ``None``, which takes the
            vocabulary recorded in ``index.json`` by ``tikmix convert`` (else only ids ``>= 0`` are checked).
        verify_hashes (str): When shard hashes listed in ``index.json`` are checked. ``"first_open"``: the
            first time this machine opens each exact shard file (path, size, mtime, inode), which includes
            every shard fetched from ``remote``; ``"every_open"``: on every open, which re-reads the whole
            local dataset each time and catches bit rot that leaves the file's size and mtime unchanged;
            ``"never"``. Default: ``"first_open"``: corruption in transfer or conversion is caught once per
            machine, while a restart of a thousand ranks does not re-hash terabytes.
        hash_algorithm (str): ``"auto"`` checks the first algorithm the index lists (no check when it lists
            none); a name (e.g. ``"sha1"``) requires that one. Default: ``"auto"``.
        download_timeout (float): Seconds allowed per downloaded file. Default: ``60.0``.

    Attributes:
        token_info (dict): ``eos_id`` / ``pad_id`` / ``vocab_size`` recorded in ``index.json``, if any.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        remote: str | None = None,
        cache_limit: int | None = None,
        prefetch_shards: int = 2,
        column: str = "tokens",
        vocab_size: int | None = None,
        verify_hashes: str = "first_open",
        hash_algorithm: str = "auto",
        download_timeout: float = 60.0,
    ):
        self.path = os.fspath(path)
        # streaming 0.13 has no file:// downloader; it copies from a remote given as a plain local path.
        self.remote = urllib.parse.urlparse(remote).path if str(remote).startswith("file://") else remote
        self.column = column
        self.verify_hashes = check_verify_mode(verify_hashes)
        self.hash_algorithm = hash_algorithm
        self.download_timeout = float(download_timeout)
        index_path = Path(self.path) / INDEX_FILE
        if self.remote is not None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            if not index_path.is_file():
                self._fetch(INDEX_FILE)
        index = _read_index(index_path)
        self._readers = [self._make_reader(shard, index_path) for shard in index["shards"]]
        embedded = index.get(EMBED_KEY) or {}
        self.token_info = read_token_info(embedded, str(index_path))
        self.vocab_size = vocab_size if vocab_size is not None else self.token_info.get("vocab_size")
        samples = np.array([reader.samples for reader in self._readers], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(samples)])
        self._remote = None
        if remote is None:
            stored = [self._stored_file(reader) for reader in self._readers]
            for reader, stored_file in zip(self._readers, stored, strict=True):
                self._prepare_raw(reader, stored_file)
        else:
            from tikmix_loader.data.sources._mds_remote import RemoteShards

            self._remote = RemoteShards(
                remote=self.remote,
                local=self.path,
                readers=self._readers,
                cache_limit=cache_limit,
                prefetch_shards=prefetch_shards,
                download_timeout=self.download_timeout,
                validate_hash=self._download_algorithm(),
            )
            stored = []
            for shard, reader in enumerate(self._readers):
                if self._remote.is_resident(shard):
                    self._check_raw(reader)
        self._lengths = self._indexed_lengths(embedded, index_path)
        if self._lengths is None:
            key = file_fingerprint([index_path, *stored], kind="mds", column=column, remote=self.remote)
            cached = load_lengths(key)
            if cached is None or len(cached) != self.num_docs:
                cached = self._scan_lengths()
                save_lengths(key, cached)
            self._lengths = cached

    @property
    def num_docs(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def cached_bytes(self) -> int | None:
        """With ``remote``, bytes of shards now in the local cache; ``None`` for a local dataset."""
        return None if self._remote is None else self._remote.cached_bytes

    def doc_lengths(self) -> np.ndarray:
        return self._lengths

    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        if not 0 <= start <= stop <= self.num_docs:
            raise IndexError(f"{self.path}: document range [{start}, {stop}) outside [0, {self.num_docs}).")
        documents = []
        index = start
        while index < stop:
            shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
            end = min(stop, int(self._shard_starts[shard + 1]))
            with self._resident(shard):
                for position in range(index, end):
                    document = self._decode(shard, position - int(self._shard_starts[shard]))
                    if len(document) != self._lengths[position]:
                        raise ShardError(
                            f"{self._shard_file(self._readers[shard])}: document {position} now holds "
                            f"{len(document)} tokens but held {self._lengths[position]} when the domain was "
                            f"opened; the shard changed on disk. Re-open the domain."
                        )
                    documents.append(document)
            index = end
        return documents

    def _resident(self, shard: int) -> AbstractContextManager:
        """A block during which ``shard`` is on local disk (fetched and kept there with ``remote``)."""
        return nullcontext() if self._remote is None else self._remote.reading(shard)

    def _download_algorithm(self) -> str | None:
        """The algorithm streaming checks downloaded files with (``None``: no check)."""
        if self.verify_hashes == "never" or not self._readers:
            return None
        reader = self._readers[0]
        listed = (reader.zip_data or reader.raw_data).hashes
        return pick_algorithm(self.hash_algorithm, listed, Path(self.path) / INDEX_FILE)

    def _indexed_lengths(self, embedded: Mapping, index_path: Path) -> np.ndarray | None:
        """The converter's length index named in ``index.json``, or ``None`` when it names none."""
        name = embedded.get("lengths")
        if not name:
            return None
        lengths = self.read_doc_array(name)
        if lengths.dtype != np.int64:
            raise ShardError(
                f"{Path(self.path) / name}: holds {lengths.dtype} lengths, not int64; re-run "
                f"`tikmix convert`."
            )
        return lengths

    def read_doc_array(self, name: str) -> np.ndarray:
        """The per-document ``.npy`` array ``name`` beside ``index.json`` (fetched from ``remote``).

        The length index is one; other per-document values (e.g. quality scores) can be stored and read
        the same way, without decoding a document. Raises ``ShardError`` naming the file unless it holds one
        value per document.
        """
        file = Path(self.path) / name
        if self.remote is not None and not file.is_file():
            self._fetch(name)
        try:
            values = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ShardError(
                f"{file}: cannot read this per-document array named by {INDEX_FILE} ({exc}); restore it or "
                f"re-run `tikmix convert`."
            ) from exc
        if values.shape != (self.num_docs,):
            raise ShardError(
                f"{file}: holds {values.dtype} {values.shape} values but {INDEX_FILE} lists {self.num_docs} "
                f"documents; the index and the shards disagree. Re-run `tikmix convert`."
            )
        return values

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
        """The file holding this shard in ``path``: raw, else compressed."""
        local = Path(self.path)
        raw, packed = reader.raw_data, reader.zip_data
        if (local / raw.basename).is_file():
            return local / raw.basename
        if packed is not None and (local / packed.basename).is_file():
            return local / packed.basename
        listed = raw.basename if packed is None else f"{raw.basename} or {packed.basename}"
        raise ShardError(
            f"{local}: shard {listed} listed in {INDEX_FILE} is missing; restore it, re-download the "
            f"dataset or pass `remote=` to fetch it."
        )

    def _prepare_raw(self, reader, stored: Path) -> None:
        """Point ``reader`` at an uncompressed, checked shard, decompressing it into the cache if needed."""
        if stored.name != reader.raw_data.basename:
            reader.dirname = str(_decompressed_dir(stored))
            if not self._shard_file(reader).is_file():
                self._decompress(reader, stored)
        self._check_raw(reader)

    def _check_raw(self, reader) -> None:
        """Check the raw shard's size against ``index.json``, and its hash as ``verify_hashes`` says."""
        shard_file = self._shard_file(reader)
        size = shard_file.stat().st_size
        if size != reader.raw_data.bytes:
            raise ShardError(
                f"{shard_file}: holds {size} bytes but {INDEX_FILE} declares {reader.raw_data.bytes}; the "
                f"shard is truncated or corrupt. Re-convert or re-download it."
            )
        hashes = reader.raw_data.hashes
        algorithm = pick_algorithm(self.hash_algorithm, hashes, shard_file)
        verify_file(shard_file, algorithm, hashes.get(algorithm), self.verify_hashes)

    def _decompress(self, reader, stored: Path) -> None:
        from streaming.base.compression import decompress

        data = stored.read_bytes()
        hashes = reader.zip_data.hashes
        algorithm = pick_algorithm(self.hash_algorithm, hashes, stored)
        if algorithm is not None and self.verify_hashes != "never":
            check_hash(stored, algorithm, hashes[algorithm], data)
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
        # A plain string, not ``_shard_file``'s Path: building a Path per decoded document costs a third
        # of the decode.
        where = f"{reader.dirname}{os.sep}{reader.raw_data.basename} (sample {local_index})"
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
            with self._resident(shard):
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
    token_info: Mapping | None = None,
) -> Path:
    """Write ``documents`` as an MDS dataset (one sample per document) with streaming's ``MDSWriter``.

    Also writes the length index ``tikmix-lengths.npy`` and records it, with ``token_info``, under
    ``"tikmix"`` in ``index.json`` (see the module docstring).

    Args:
        directory (str | PathLike): New or empty output directory.
        documents (Iterable[np.ndarray]): 1-D integer token arrays; streamed, never held together.
        dtype (str): ``"uint16"`` or ``"int32"``. Default: ``"uint16"``.
        column (str): Column name. Default: ``"tokens"``.
        compression (str, optional): A streaming compression such as ``"zstd"``. Default: ``None``.
        hashes (Iterable[str]): Streaming hash algorithms recorded per shard. Default: ``("xxh64",)``.
        size_limit (int): Shard size in bytes before a new shard starts. Default: 64 MiB.
        token_info (Mapping, optional): ``eos_id`` / ``pad_id`` / ``vocab_size`` / ``tokenizer`` of the ids
            (``_token_info.token_info_of``). Default: ``None``.

    Returns:
        Path: ``directory``.
    """
    from streaming import MDSWriter

    if dtype not in MDS_DTYPES:
        raise ShardError(f"{directory}: MDS `dtype` must be one of {MDS_DTYPES}, got {dtype!r}.")
    lengths = array("q")
    with MDSWriter(
        out=os.fspath(directory),
        columns={column: f"ndarray:{dtype}"},
        compression=compression,
        hashes=sorted(hashes),
        size_limit=size_limit,
    ) as writer:
        for index, document in enumerate(documents):
            tokens = cast_tokens(document, dtype, f"{directory} (document {index})")
            writer.write({column: tokens})
            lengths.append(len(tokens))
    directory = Path(directory)
    np.save(directory / LENGTHS_FILE, np.frombuffer(lengths, dtype=np.int64))
    index_path = directory / INDEX_FILE
    index = json.loads(index_path.read_text())
    index[EMBED_KEY] = {
        **(token_info or {}),
        "lengths": LENGTHS_FILE,
        "num_docs": len(lengths),
        "num_tokens": int(sum(lengths)),
    }
    index_path.write_text(json.dumps(index, sort_keys=True))
    return directory


def _read_index(index_path: Path) -> dict:
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
    return index


def _decompressed_dir(stored: Path) -> Path:
    """Cache directory for the uncompressed twin of a local compressed shard, keyed by its identity."""
    return cache_root() / "mds-raw" / file_fingerprint([stored])[:32]
