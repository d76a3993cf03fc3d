"""On-disk token formats, one module each, and ``open_source`` which picks one by name or by sniffing."""

from __future__ import annotations

import os
from pathlib import Path

from tikmix_loader.data.sources.base import TokenSource
from tikmix_loader.data.sources.mds import MDSSource
from tikmix_loader.data.sources.memmap import MemmapSource
from tikmix_loader.data.sources.parquet import ParquetSource
from tikmix_loader.errors import DomainError, UnknownFormatError

SOURCES: dict[str, type[TokenSource]] = {
    "mds": MDSSource,
    "memmap": MemmapSource,
    "parquet": ParquetSource,
}


def detect_format(path: str | os.PathLike) -> str:
    """Name of the format stored at ``path`` (``mds``, ``parquet`` or ``memmap``).

    Raises:
        UnknownFormatError: ``path`` looks like none of them.
    """
    path = Path(path)
    if path.is_dir():
        # Shards without their index are still MDS, so the reader can say the index is missing.
        if (path / "index.json").exists() or any(path.glob("*.mds*")):
            return "mds"
        if any(path.rglob("*.parquet")):
            return "parquet"
        if any(path.glob("*.bin")):
            return "memmap"
    elif path.suffix == ".parquet":
        return "parquet"
    elif path.suffix == ".bin":
        return "memmap"
    raise UnknownFormatError(
        f"{path}: cannot tell the format (expected an MDS directory with index.json, Parquet files, or a "
        f".bin memmap with its .json sidecar); raw text, JSONL or Parquet text must first be tokenized with "
        f"`tikmix convert`.",
        sorted(SOURCES),
    )


def open_source(path: str | os.PathLike, format: str = "auto", **options) -> TokenSource:
    """Open ``path`` with the reader for ``format`` (``"auto"`` sniffs it); ``options`` go to the reader.

    With a ``remote=`` option the local path may not exist yet; only MDS reads from remotes, so ``"auto"``
    means ``"mds"`` then.
    """
    if format == "auto":
        name = "mds" if options.get("remote") is not None else detect_format(path)
    else:
        name = format
    if name not in SOURCES:
        raise DomainError(
            f"{path}: unknown `format` {name!r}; valid formats are {sorted(SOURCES)} or 'auto'."
        )
    return SOURCES[name](path, **options)


__all__ = [
    "SOURCES",
    "MDSSource",
    "MemmapSource",
    "ParquetSource",
    "TokenSource",
    "detect_format",
    "open_source",
]
