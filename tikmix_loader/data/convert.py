"""``tikmix convert``: tokenize text files, directories, JSONL and Parquet text into a dataset, atomically.

Every input document becomes one stored document (one MDS sample, one Parquet row, one memmap span). The
dataset is written into a temporary directory beside ``output`` and renamed into place only when complete,
so an interrupted or failed conversion leaves no partial dataset; it gets the mode ``mkdir`` would give it
under the umask. A ``tikmix.json`` (``DatasetMeta``) beside the data records the tokenizer, ids, sizes and
every input file with its sha256. The MDS and Parquet writers also store each document's token count and
the ids' EOS/PAD/vocabulary in the data itself, so opening the dataset reads no document and a copy without
``tikmix.json`` (or a remote MDS dataset) still names its ids.

``--max-doc-tokens N`` splits longer documents into consecutive pieces of at most N tokens. ``--workers N``
tokenizes on N processes; documents keep their input order, so the output is the same for any N.

Inputs by file name: ``*.jsonl`` holds one JSON object per line with a text field; ``*.parquet`` holds a
string column; anything else is one UTF-8 text document. A ``.gz`` suffix is decompressed first.
Directories are searched recursively in sorted order; hidden files and directories (``.git``…) are left
out.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tikmix_loader.data.metadata import DatasetMeta
from tikmix_loader.data.sources._token_info import token_info_of
from tikmix_loader.data.sources.mds import write_mds
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.data.sources.parquet import write_parquet
from tikmix_loader.data.tokenizer import Tokenizer, load_tokenizer
from tikmix_loader.errors import ConfigError, ConversionError

FORMATS = ("mds", "parquet", "memmap")
MEMMAP_FILE = "tokens.bin"
ENCODING_ERRORS = ("strict", "replace")
# Texts sent to a worker process at a time: large enough to amortise the transfer, small enough to keep
# every worker busy on modest inputs.
BATCH_BYTES = 1 << 20
PARQUET_CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")


def _write_mds_dataset(directory: Path, documents: Iterable[np.ndarray], tokenizer: Tokenizer, compression):
    from streaming.base.compression import get_compressions

    if compression is not None and compression not in get_compressions():
        raise ConfigError(
            f"`compression` {compression!r} is not one of streaming's {sorted(get_compressions())}."
        )
    write_mds(
        directory,
        documents,
        dtype=tokenizer.dtype,
        compression=compression,
        token_info=token_info_of(tokenizer),
    )


def _write_parquet_dataset(
    directory: Path, documents: Iterable[np.ndarray], tokenizer: Tokenizer, compression
):
    import pyarrow as pa

    codec = compression or "snappy"
    if codec != "none" and not (codec in PARQUET_CODECS and pa.Codec.is_available(codec)):
        raise ConfigError(
            f"`compression` {compression!r} is not an available Parquet codec {PARQUET_CODECS}."
        )
    write_parquet(
        directory,
        documents,
        dtype=tokenizer.dtype,
        compression=codec,
        token_info=token_info_of(tokenizer),
    )


def _write_memmap_dataset(
    directory: Path, documents: Iterable[np.ndarray], tokenizer: Tokenizer, compression
):
    if compression:
        raise ConfigError(f"`compression` {compression!r} applies to mds and parquet only, not memmap.")
    write_memmap(
        directory / MEMMAP_FILE,
        documents,
        dtype=tokenizer.dtype,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )


WRITERS: dict[str, Callable] = {
    "mds": _write_mds_dataset,
    "parquet": _write_parquet_dataset,
    "memmap": _write_memmap_dataset,
}


@contextmanager
def atomic_directory(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``output`` that replaces ``output`` if the block succeeds.

    Any exception (``KeyboardInterrupt`` included) removes the temporary directory and leaves ``output``
    as it was. ``output`` may already exist only when empty or when ``overwrite`` is set.
    """
    output = Path(output)
    if output.exists() and not overwrite and not (output.is_dir() and not any(output.iterdir())):
        raise ConfigError(f"`output` {output} already exists; choose a new path or pass --overwrite.")
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield temp
        # mkdtemp makes the directory 0700 whatever the umask; give it the mode mkdir would have.
        temp.chmod(0o777 & ~_current_umask())
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(temp, output)
            shutil.rmtree(retired)
        else:
            os.replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it, so put it straight back
    os.umask(mask)
    return mask


def write_dataset(
    output: str | os.PathLike,
    documents: Iterable[np.ndarray],
    *,
    name: str,
    format: str = "mds",
    tokenizer: str | os.PathLike | Tokenizer = "bytes",
    sources: Sequence[dict] = (),
    compression: str | None = None,
    overwrite: bool = False,
    max_doc_tokens: int | None = None,
) -> DatasetMeta:
    """Write already-tokenized ``documents`` as a dataset with its ``tikmix.json``, atomically.

    Args:
        output (str | PathLike): The dataset directory to create.
        documents (Iterable[np.ndarray]): Token arrays, one per document; empty ones are dropped and counted.
        name (str): Dataset name recorded in ``tikmix.json``.
        format (str): ``"mds"``, ``"parquet"`` or ``"memmap"``. Default: ``"mds"``.
        tokenizer (str | PathLike | Tokenizer): What made the ids; gives dtype, EOS/PAD and vocabulary.
            Default: ``"bytes"``.
        sources (Sequence[dict]): Input files (``path``, ``bytes``, ``sha256``) to record. Default: ``()``.
        compression (str, optional): Shard compression, e.g. ``"zstd"`` (MDS and Parquet). Default: ``None``.
        overwrite (bool): Replace an existing ``output``. Default: ``False``.
        max_doc_tokens (int, optional): Split longer documents into consecutive pieces of at most this many
            tokens. Default: ``None`` (no limit).

    Returns:
        DatasetMeta: What was written (also in ``output/tikmix.json``).
    """
    if format not in WRITERS:
        raise ConfigError(f"`format` {format!r} is not one of {sorted(WRITERS)}.")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise ConfigError(f"`max_doc_tokens` must be >= 1 or None, got {max_doc_tokens!r}.")
    tokenizer = load_tokenizer(tokenizer)
    counts = {"docs": 0, "tokens": 0, "empty": 0, "split": 0}

    def non_empty() -> Iterator[np.ndarray]:
        for document in documents:
            if len(document) == 0:
                counts["empty"] += 1
                continue
            pieces = split_document(document, max_doc_tokens)
            counts["split"] += len(pieces) > 1
            counts["docs"] += len(pieces)
            counts["tokens"] += len(document)
            yield from pieces

    with atomic_directory(output, overwrite=overwrite) as temp:
        WRITERS[format](temp, non_empty(), tokenizer, compression)
        if counts["docs"] == 0:
            raise ConversionError(
                f"{name}: no non-empty documents to write to {output} ({counts['empty']} empty inputs); "
                f"check the inputs and `text_column`."
            )
        meta = DatasetMeta(
            name=name,
            format=format,
            tokenizer=tokenizer.name,
            tokenizer_sha256=getattr(tokenizer, "sha256", None),
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            vocab_size=tokenizer.vocab_size,
            dtype=tokenizer.dtype,
            num_docs=counts["docs"],
            num_tokens=counts["tokens"],
            empty_docs_dropped=counts["empty"],
            max_doc_tokens=max_doc_tokens,
            docs_split=counts["split"],
            sources=tuple(sources),
        )
        meta.write(temp)
    return meta


def split_document(document: np.ndarray, max_doc_tokens: int | None) -> list[np.ndarray]:
    """``document`` cut into consecutive pieces of at most ``max_doc_tokens`` tokens (whole when ``None``)."""
    if max_doc_tokens is None or len(document) <= max_doc_tokens:
        return [document]
    return [document[start : start + max_doc_tokens] for start in range(0, len(document), max_doc_tokens)]


def convert(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    name: str,
    format: str = "mds",
    tokenizer: str | os.PathLike | Tokenizer = "bytes",
    text_column: str = "text",
    encoding_errors: str = "strict",
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_doc_tokens: int | None = None,
    workers: int = 1,
) -> DatasetMeta:
    """Tokenize the documents of ``inputs`` into a new dataset at ``output`` (see the module docstring).

    Args:
        inputs (Sequence[str | PathLike]): Text files, JSONL files, Parquet files and directories of them.
        output (str | PathLike): The dataset directory to create; ``Domain(name, output)`` opens it.
        name (str): Dataset name recorded in ``tikmix.json``.
        format (str): ``"mds"``, ``"parquet"`` or ``"memmap"``. Default: ``"mds"``.
        tokenizer (str | PathLike | Tokenizer): ``"bytes"`` or a local ``tokenizer.json``.
            Default: ``"bytes"``.
        text_column (str): Text field of JSONL records and text column of Parquet inputs. Default: ``"text"``.
        encoding_errors (str): ``"strict"`` fails on text that is not UTF-8; ``"replace"`` substitutes
            U+FFFD. Default: ``"strict"``.
        compression (str, optional): Shard compression such as ``"zstd"``. Default: ``None``.
        overwrite (bool): Replace an existing ``output``. Default: ``False``.
        progress (bool): Show a tqdm bar over input bytes. Default: ``True``.
        max_doc_tokens (int, optional): Split longer documents into pieces of at most this many tokens.
            Default: ``None`` (no limit).
        workers (int): Processes that tokenize; the output does not depend on it. Default: ``1`` (in this
            process).

    Returns:
        DatasetMeta: What was written.
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise ConfigError(f"`encoding_errors` must be one of {ENCODING_ERRORS}, got {encoding_errors!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"`workers` must be an int >= 1, got {workers!r}.")
    tokenizer = load_tokenizer(tokenizer)
    files = expand_inputs(inputs)
    # Filled while the files are read; write_dataset records it only after the last document.
    sources: list[dict] = []
    bar = tqdm(
        total=sum(file.stat().st_size for file in files),
        unit="B",
        unit_scale=True,
        desc=f"convert {name}",
        disable=not progress,
    )

    def texts() -> Iterator[str]:
        for file in files:
            sources.append(
                {"path": str(file.resolve()), "bytes": file.stat().st_size, "sha256": sha256_file(file)}
            )
            for text, consumed in read_texts(file, text_column=text_column, encoding_errors=encoding_errors):
                bar.update(consumed)
                if text is not None:
                    yield text

    with bar, _encoder(tokenizer, workers) as encode:
        return write_dataset(
            output,
            encode(texts()),
            name=name,
            format=format,
            tokenizer=tokenizer,
            sources=sources,
            compression=compression,
            overwrite=overwrite,
            max_doc_tokens=max_doc_tokens,
        )


@contextmanager
def _encoder(tokenizer: Tokenizer, workers: int) -> Iterator[Callable[[Iterable[str]], Iterator[np.ndarray]]]:
    """A function from texts to their token arrays, in order, tokenizing on ``workers`` processes."""
    if workers == 1:
        yield lambda texts: map(tokenizer.encode, texts)
        return
    # The platform's default start method (fork on Linux): spawn would re-import the caller's __main__,
    # which fails for `python -` and interactive sessions.
    with multiprocessing.get_context().Pool(
        workers, initializer=_start_worker, initargs=(tokenizer,)
    ) as pool:

        def encode(texts: Iterable[str]) -> Iterator[np.ndarray]:
            # apply_async over a bounded window rather than Pool.imap, whose feeder thread would read every
            # input into memory ahead of the workers.
            pending: collections.deque = collections.deque()
            for batch in _batches(texts):
                pending.append(pool.apply_async(_encode_batch, (batch,)))
                if len(pending) > 2 * workers:
                    yield from pending.popleft().get()
            while pending:
                yield from pending.popleft().get()

        yield encode


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    return [_worker_tokenizer.encode(text) for text in texts]


def _special_kind(path: Path) -> str:
    """What ``path`` is, which exists but is neither a regular file nor a directory ("a named pipe"...)."""
    if not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    mode = path.stat().st_mode
    kinds = {
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISSOCK: "a socket",
    }
    return next(
        (kind for test, kind in kinds.items() if test(mode)), "neither a regular file nor a directory"
    )


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input files in reading order: files as given, directories searched recursively in sorted order."""
    if not inputs:
        raise ConversionError("no inputs given; pass text, JSONL or Parquet files or directories.")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            files.extend(
                file
                for file in sorted(item.rglob("*"))
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(item).parts)
            )
        elif os.path.lexists(item):
            raise ConversionError(
                f"input {item} is {_special_kind(item)}; inputs are text, JSONL or Parquet files, or "
                "directories of them."
            )
        else:
            raise ConversionError(f"input {item}: no such file or directory.")
    if not files:
        raise ConversionError(f"inputs {[str(item) for item in inputs]}: the directories hold no files.")
    return files


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_texts(file: Path, *, text_column: str = "text", encoding_errors: str = "strict"):
    """Yield ``(text, bytes consumed)`` for each document of one input file, by its kind (see module doc).

    ``text`` is ``None`` on entries that only report progress (blank JSONL lines, row-group ends).
    """
    suffixes = file.suffixes[-2:] if file.suffix == ".gz" else file.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    if kind == ".parquet" and file.suffix != ".gz":
        yield from _read_parquet_texts(file, text_column)
        return
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as stream:
            if kind == ".jsonl":
                yield from _read_jsonl(file, stream, text_column, encoding_errors)
            else:
                data = stream.read()
                yield _decode(data, file, encoding_errors), file.stat().st_size
    except (OSError, EOFError) as exc:
        raise ConversionError(f"input {file}: cannot be read ({exc}).") from exc


def _decode(data: bytes, where, encoding_errors: str) -> str:
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        raise ConversionError(
            f"input {where}: not UTF-8 text (bad byte at offset {exc.start}); leave the file out or pass "
            f"`encoding_errors='replace'` (--encoding-errors replace)."
        ) from exc


def _read_jsonl(file: Path, stream, text_column: str, encoding_errors: str):
    compressed = file.suffix == ".gz"
    for number, line in enumerate(stream, start=1):
        consumed = 0 if compressed else len(line)
        if not line.strip():
            yield None, consumed
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(_decode(line, where, encoding_errors))
        except json.JSONDecodeError as exc:
            raise ConversionError(
                f"input {where}: not a JSON object ({exc}); fix or remove the line."
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConversionError(
                f"input {where}: no string field {text_column!r} (found {keys}); pass `text_column=` "
                f"(--text-column) naming the text field."
            )
        yield record[text_column], consumed
    if compressed:
        yield None, file.stat().st_size


def _read_parquet_texts(file: Path, text_column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        field = parquet.schema_arrow.field(text_column) if text_column in parquet.schema_arrow.names else None
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise ConversionError(
                f"input {file}: no string column {text_column!r} (columns: {parquet.schema_arrow}); pass "
                f"`text_column=` (--text-column) naming the text column."
            )
        per_group = file.stat().st_size // max(1, parquet.num_row_groups)
        for group in range(parquet.num_row_groups):
            texts = parquet.read_row_group(group, columns=[text_column]).column(0).to_pylist()
            for row, text in enumerate(texts):
                if text is None:
                    raise ConversionError(
                        f"input {file} (row group {group}, row {row}): {text_column!r} is null; drop or fill "
                        f"null rows before converting."
                    )
                yield text, 0
            yield None, per_group
    except (OSError, pa.ArrowException) as exc:
        raise ConversionError(f"input {file}: not a readable Parquet file ({exc}).") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tikmix convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="tokenize text/JSONL/Parquet inputs into an MDS, Parquet or memmap dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="text, JSONL or Parquet files, or directories"
    )
    parser.add_argument("--name", required=True, help="dataset name recorded in tikmix.json")
    parser.add_argument("--output", required=True, help="dataset directory to create")
    parser.add_argument("--format", choices=FORMATS, default="mds", help="storage format (default: mds)")
    parser.add_argument(
        "--tokenizer", default="bytes", help="'bytes' or PATH/tokenizer.json (default: bytes)"
    )
    parser.add_argument("--text-column", default="text", help="JSONL field / Parquet column (default: text)")
    parser.add_argument(
        "--encoding-errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help="what to do with text that is not UTF-8 (default: strict, i.e. fail)",
    )
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default: none)")
    parser.add_argument(
        "--max-doc-tokens",
        type=int,
        default=None,
        metavar="N",
        help="split documents longer than N tokens into pieces of at most N (default: no limit)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="tokenize on N processes; the output is the same for any N (default: 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    meta = convert(
        args.inputs,
        args.output,
        name=args.name,
        format=args.format,
        tokenizer=args.tokenizer,
        text_column=args.text_column,
        encoding_errors=args.encoding_errors,
        compression=args.compression,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        max_doc_tokens=args.max_doc_tokens,
        workers=args.workers,
    )
    print(
        f"wrote {args.output}: {meta.num_docs} documents, {meta.num_tokens} tokens ({meta.format}, "
        f"{meta.dtype}, tokenizer {meta.tokenizer}, vocab {meta.vocab_size}); "
        f"{meta.empty_docs_dropped} empty documents dropped, {meta.docs_split} split."
    )
    return 0
