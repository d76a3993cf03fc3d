"""Shards of a remote MDS dataset made resident on demand: fetched when first read, prefetched ahead of the
read position, and evicted coldest-first so the local copies stay under ``cache_limit``.

Downloading, decompressing (the compressed copy is dropped once the raw shard exists), download-time hash
checks and eviction are mosaicml-streaming's own: ``Stream.prepare_shard``, ``Stream.set_up_local`` and
``Reader.evict``. Only the bookkeeping ``StreamingDataset`` keeps in shared memory for its own epoch order
(which shards are resident, when each was last read) is kept here, per process, because the mixture loader
reads each domain by random access rather than in streaming's order. The eviction rule is streaming's:
the least recently read shard goes first (``StreamingDataset._evict_coldest_shard``).

The bookkeeping is per process: loader worker processes that share ``local`` each count against their own
``cache_limit`` (so together they may hold up to that many times it), and a shard another process evicted
is fetched again when next read; a read racing such an eviction fails with a ``ShardError``. Threads of one
process (the loader's prefetch threads) share one bookkeeping safely.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from tikmix_loader.errors import ConfigError, ShardError

DOWNLOAD_RETRIES = 2


class RemoteShards:
    """Residency of the shards of one remote MDS dataset in its local cache directory.

    Args:
        remote (str): The streaming remote (``s3://…``, ``file://…``, a local directory, …).
        local (str): The cache directory; the readers' ``dirname``.
        readers (list): Streaming shard readers of the dataset, in index order.
        cache_limit (int, optional): Bytes of shard files allowed in ``local`` (``index.json`` and the
            length index are not counted). ``None``: no limit, nothing is evicted.
        prefetch_shards (int): Shards after the one being read that a background thread fetches ahead.
        download_timeout (float): Seconds allowed per downloaded file.
        validate_hash (str, optional): Streaming hash algorithm that downloaded files are checked with.
    """

    def __init__(
        self,
        *,
        remote: str,
        local: str,
        readers: list,
        cache_limit: int | None,
        prefetch_shards: int,
        download_timeout: float,
        validate_hash: str | None,
    ):
        from streaming.base.stream import Stream

        if prefetch_shards < 0:
            raise ConfigError(f"`prefetch_shards` must be >= 0, got {prefetch_shards}.")
        largest = max((reader.get_max_size() for reader in readers), default=0)
        if cache_limit is not None and cache_limit < largest:
            raise ConfigError(
                f"{remote}: `cache_limit`={cache_limit} bytes cannot hold the largest shard with its "
                f"compressed copy ({largest} bytes); raise `cache_limit` to at least {largest}."
            )
        self.remote, self.local, self.readers = remote, local, readers
        self.cache_limit = cache_limit
        self.prefetch_shards = prefetch_shards
        self._stream = Stream(remote=remote, local=local, download_timeout=download_timeout, keep_zip=False)
        self._stream.apply_default(
            {
                "split": None,
                "download_retry": DOWNLOAD_RETRIES,
                "download_timeout": download_timeout,
                "validate_hash": validate_hash,
                "keep_zip": False,
            }
        )
        self.usage = np.zeros(len(readers), dtype=np.int64)  # bytes each shard holds in ``local``
        self._stream.set_up_local(readers, self.usage)
        for shard, reader in enumerate(readers):
            if self.usage[shard] and not os.path.isfile(self.raw_file(shard)):
                reader.evict()  # a compressed copy left by an interrupted run: refetched when needed
                self.usage[shard] = 0
        self._reset_threads()

    def __getstate__(self) -> dict:
        # Threads and locks stay in the process that made them; a spawned worker starts its own.
        state = self.__dict__.copy()
        for name in ("_lock", "_executor", "_pending", "_owner"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_threads()

    def _reset_threads(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._owner = os.getpid()
        self._last_read = np.zeros(len(self.readers), dtype=np.int64)  # 0: never read since fetched
        self._clock = 0
        self._in_use = np.zeros(len(self.readers), dtype=np.int64)  # threads now reading each shard

    @property
    def cached_bytes(self) -> int:
        """Bytes of shard files now in the local cache."""
        return int(self.usage.sum())

    def is_resident(self, shard: int) -> bool:
        """Whether shard ``shard`` is in the local cache, ready to read."""
        return bool(self.usage[shard])

    def raw_file(self, shard: int) -> str:
        """Where the uncompressed shard ``shard`` lives once resident."""
        return os.path.join(self.local, self.readers[shard].raw_data.basename)

    @contextmanager
    def reading(self, shard: int) -> Iterator[None]:
        """Keep ``shard`` resident while the block reads it (fetching it now if needed); prefetch the next."""
        if self._owner != os.getpid():  # a forked loader worker: the parent's threads did not come along
            self._reset_threads()
        with self._lock:
            self._in_use[shard] += 1  # before the fetch, so no other thread's fetch evicts it meanwhile
        try:
            self._ensure(shard)
            yield
        finally:
            with self._lock:
                self._in_use[shard] -= 1

    def _ensure(self, shard: int) -> None:
        # Every fetch, a prefetch or a reader's, is registered in ``_pending`` for as long as it runs: room is
        # reserved in ``usage`` before the bytes arrive, so a shard counts as resident only when it has
        # usage and no fetch in flight. A reader that finds a fetch in flight waits for it and looks again,
        # since a prefetch that gave way to a full cache leaves the shard absent.
        while True:
            with self._lock:
                future = self._pending.get(shard)
                if future is not None and future.done():  # its owner forgets it next; do not wait for that
                    del self._pending[shard]
                    future = None
                if future is None:
                    if self.usage[shard] and not os.path.isfile(self.raw_file(shard)):
                        self.usage[shard] = 0  # evicted by another process sharing this cache directory
                    if self.usage[shard]:
                        break
                    future = self._pending[shard] = Future()
                    fetch_here = True
                else:
                    fetch_here = False
            if not fetch_here:
                future.result()
                continue
            try:
                self._load(shard, demand=True)
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                raise
            finally:
                self._forget(shard, future)
            break
        with self._lock:
            self._clock += 1
            self._last_read[shard] = self._clock
        for ahead in range(shard + 1, min(shard + 1 + self.prefetch_shards, len(self.readers))):
            self._prefetch(ahead)

    def _prefetch(self, shard: int) -> None:
        with self._lock:
            if self.usage[shard] or shard in self._pending:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tikmix-mds-prefetch")
            future = self._executor.submit(self._load, shard, demand=False)
            self._pending[shard] = future
        future.add_done_callback(lambda done: self._forget(shard, done))

    def _forget(self, shard: int, future: Future) -> None:
        with self._lock:
            if self._pending.get(shard) is future:  # a reader may have dropped it and registered its own
                del self._pending[shard]

    def _load(self, shard: int, *, demand: bool) -> None:
        """Fetch ``shard`` after evicting colder ones; a prefetch that would evict needed shards gives up."""
        reader = self.readers[shard]
        with self._lock:
            if self.usage[shard]:
                return
        if not self._reserve(shard, demand=demand):
            if not demand:
                return
            with self._lock:
                # Room held by prefetches is evictable once they finish, so wait for those. Not for fetches of
                # shards being read: their room stays held while read, and their reader may be waiting here
                # for this fetch in turn (two readers waiting on each other would hang).
                in_flight = [
                    future
                    for other, future in self._pending.items()
                    if other != shard and not self._in_use[other]
                ]
            for future in in_flight:
                future.exception()
            if not self._reserve(shard, demand=True):
                busy = int((self._in_use > 0).sum())
                raise ShardError(
                    f"{self.remote}: cannot make room for shard {reader.raw_data.basename} within "
                    f"`cache_limit`={self.cache_limit} bytes while {busy} shards are being read; raise "
                    f"`cache_limit` to hold one shard per thread reading at once."
                )
        try:
            self._stream.prepare_shard(reader)
        except Exception as exc:  # each cloud client and codec raises its own error types
            with self._lock:
                self.usage[shard] = 0
            reader.evict()
            message = str(exc)
            if message.startswith("Checksum failure"):
                raise ShardError(
                    f"{message.split(': ', 1)[-1]}: checksum failure after download from {self.remote}; the "
                    f"remote copy is corrupt. Re-upload it."
                ) from exc
            raise ShardError(
                f"{self.remote}: cannot fetch shard {reader.raw_data.basename} into {self.local} "
                f"({type(exc).__name__}: {exc}); check `remote=` and credentials."
            ) from exc
        with self._lock:
            self.usage[shard] = reader.get_persistent_size(keep_zip=False)

    def _reserve(self, shard: int, *, demand: bool) -> bool:
        """Claim room for ``shard`` (counted before the download, so no other load takes it)."""
        needed = self.readers[shard].get_max_size()
        with self._lock:
            if self.usage[shard]:
                return True
            if not self._make_room(needed, shard, demand=demand):
                return False
            self.usage[shard] = needed
            return True

    def _make_room(self, needed: int, shard: int, *, demand: bool) -> bool:
        """Evict the least recently read shards until ``needed`` more bytes fit (call with the lock held).

        Shards being read are never evicted. A prefetch also spares shards fetched ahead but not read yet,
        and gives up rather than evict them.
        """
        if self.cache_limit is None:
            return True
        while self.cached_bytes + needed > self.cache_limit:
            candidates = [
                index
                for index in np.flatnonzero(self.usage)
                if index != shard
                and index not in self._pending
                and not self._in_use[index]
                and (demand or self._last_read[index] > 0)
            ]
            if not candidates:
                return False
            coldest = min(candidates, key=lambda index: self._last_read[index])
            self.readers[coldest].evict()
            self.usage[coldest] = 0
            self._last_read[coldest] = 0
        return True
