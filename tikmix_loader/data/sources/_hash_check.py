"""Shard hash checks under a ``verify_hashes`` policy, with a per-machine record of files already verified.

``"first_open"`` hashes a file the first time this machine opens that exact file (resolved path, size,
mtime and inode, see ``file_fingerprint``) and records it under ``<cache>/verified/``; ``"every_open"``
hashes on every open; ``"never"`` trusts the files.
"""

from __future__ import annotations

from pathlib import Path

from tikmix_loader.data.sources._lengths_cache import cache_root, file_fingerprint
from tikmix_loader.errors import ConfigError, ShardError

VERIFY_MODES = ("first_open", "every_open", "never")
INDEX_FILE = "index.json"


def check_verify_mode(value: str) -> str:
    """``value`` when it is one of ``VERIFY_MODES``; raises ``ConfigError`` otherwise."""
    if value not in VERIFY_MODES:
        raise ConfigError(f"`verify_hashes` must be one of {VERIFY_MODES}, got {value!r}.")
    return value


def pick_algorithm(requested: str, hashes: dict[str, str], file: Path) -> str | None:
    """The algorithm to check ``file`` with: ``"auto"`` takes the first listed (``None`` when none is)."""
    if requested == "auto":
        return next(iter(hashes), None)
    if requested not in hashes:
        raise ShardError(
            f"{file}: `hash_algorithm={requested!r}` but {INDEX_FILE} records only {sorted(hashes)} for "
            f"this shard; pass one of those or 'auto'."
        )
    return requested


def check_hash(file: Path, algorithm: str, expected: str, data: bytes | None = None) -> None:
    """Raise ``ShardError`` naming ``file`` unless its bytes (or ``data``) hash to ``expected``."""
    from streaming.base.hashing import get_hash

    actual = get_hash(algorithm, file.read_bytes() if data is None else data)
    if actual != expected:
        raise ShardError(
            f"{file}: {algorithm} checksum failure ({INDEX_FILE} records {expected}, the file hashes to "
            f"{actual}); the shard is corrupt. Re-convert or re-download it."
        )


def verify_file(file: Path, algorithm: str | None, expected: str | None, mode: str) -> None:
    """Check ``file`` against ``expected`` as ``mode`` says; ``algorithm`` ``None`` means nothing to check."""
    if mode == "never" or algorithm is None:
        return
    marker = cache_root() / "verified" / file_fingerprint([file], algorithm=algorithm, expected=expected)
    if mode == "first_open" and marker.exists():
        return
    check_hash(file, algorithm, expected)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # an unwritable cache only means hashing again next time
        pass
