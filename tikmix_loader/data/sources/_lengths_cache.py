"""An on-disk cache of per-document token counts, keyed by the identity of the files they were counted from.

MDS and Parquet store no document-length table, so a source scans every document once when it is first
opened. The result is saved as ``<cache>/lengths/<key>.npy`` where ``key`` hashes each input file's
resolved path, size, mtime and inode plus the reader options. Any change to a file changes the key, so a
stale entry is never read back; re-opening an unchanged dataset skips the scan.

The cache root is ``$TIKMIX_CACHE_DIR`` when set, else ``~/.cache/tikmix``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

CACHE_ENV = "TIKMIX_CACHE_DIR"


def cache_root() -> Path:
    """The tikmix cache directory: ``$TIKMIX_CACHE_DIR`` or ``~/.cache/tikmix``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tikmix"


def file_fingerprint(files: Iterable[str | os.PathLike], **options) -> str:
    """A hex key that changes whenever any of ``files`` (path, size, mtime, inode) or ``options`` changes."""
    entries = []
    for name in files:
        stat = os.stat(name)
        entries.append([str(Path(name).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    payload = json.dumps({"files": entries, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_lengths(key: str) -> np.ndarray | None:
    """The cached lengths stored under ``key``, or ``None`` when absent or unreadable (then recounted)."""
    path = cache_root() / "lengths" / f"{key}.npy"
    try:
        lengths = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return lengths if lengths.ndim == 1 and lengths.dtype == np.int64 else None


def save_lengths(key: str, lengths: np.ndarray) -> None:
    """Store ``lengths`` under ``key`` atomically; a cache that cannot be written only costs a rescan."""
    directory = cache_root() / "lengths"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, np.asarray(lengths, dtype=np.int64))
        os.replace(temp_name, directory / f"{key}.npy")
    except OSError as exc:
        warnings.warn(
            f"cannot write the document-length cache in {directory} ({exc}); the next open rescans. "
            f"Set {CACHE_ENV} to a writable directory.",
            stacklevel=3,
        )
