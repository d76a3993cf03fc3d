"""Background threads that read, ahead of use, the samples this rank was planned to take from each domain.

Threads rather than processes: a sample is a slice of an already-read token block, so the work is I/O and
numpy copies that release the GIL, and threads share the block caches and need no pickling. (The loader
benchmark measures the result against mosaicml-streaming with process workers.)

The loader plans batches ahead and requests, per domain, the stream indices of this rank's samples; a rank
of many needs a sparse subset of each domain's stream, so the queues hold requested indices rather than a
contiguous run. A sample depends only on its stream index, so a request planned under weights that change
before it is used is never wrong, only possibly unused: what is still needed is taken, and what falls
behind a domain's read position is dropped.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from tikmix_loader.data.stream import DomainStream
from tikmix_loader.errors import TikmixError


class DomainPrefetcher:
    """Per-domain stores of requested samples, filled by ``num_workers`` threads.

    Each domain is read by one thread only (domains are shared among threads round-robin), since a
    ``DomainStream``'s block caches are not safe to share between threads.

    Args:
        streams (list[DomainStream]): One stream per domain.
        num_workers (int): Producer threads, at least 1.
    """

    def __init__(self, streams: list[DomainStream], *, num_workers: int):
        self.streams = streams
        self._rows: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in streams]
        self._wanted: list[set[int]] = [set() for _ in streams]  # requested, not yet taken
        self._todo: list[deque[np.ndarray]] = [deque() for _ in streams]  # requests not yet read
        self._floor = [0] * len(streams)  # indices below are never needed again
        self._failed: list[tuple[set[int], BaseException] | None] = [None] * len(streams)
        self._condition = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(
                target=self._produce,
                args=(list(range(worker, len(streams), num_workers)),),
                name=f"tikmix-prefetch-{worker}",
                daemon=True,
            )
            for worker in range(min(num_workers, len(streams)))
        ]
        for thread in self._threads:
            thread.start()

    def request(self, domain: int, indices: np.ndarray) -> None:
        """Read samples ``indices`` of ``domain`` in the background (those already requested are skipped)."""
        with self._condition:
            wanted = self._wanted[domain]
            fresh = [
                index for index in map(int, indices) if index >= self._floor[domain] and index not in wanted
            ]
            if fresh:
                wanted.update(fresh)
                self._todo[domain].append(np.asarray(fresh, dtype=np.int64))
                self._condition.notify_all()

    def take(self, domain: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` of ``domain`` as ``(tokens, valid)``; waits for them requesting any missing."""
        self.request(domain, indices)
        keys = [int(index) for index in indices]
        rows = self._rows[domain]
        with self._condition:
            while not all(key in rows for key in keys):
                failed = self._failed[domain]
                if failed is not None and not failed[0].isdisjoint(keys):
                    raise failed[1]
                self._condition.wait()
            picked = [rows.pop(key) for key in keys]
            self._wanted[domain].difference_update(keys)
        return np.stack([row[0] for row in picked]), np.array([row[1] for row in picked], dtype=np.int64)

    def release_below(self, domain: int, start: int) -> None:
        """Forget samples of ``domain`` before stream index ``start``: no later batch needs them."""
        with self._condition:
            if start <= self._floor[domain]:
                return
            self._floor[domain] = start
            rows, wanted = self._rows[domain], self._wanted[domain]
            for key in [key for key in rows if key < start]:
                del rows[key]
            wanted.difference_update([key for key in wanted if key < start])

    def close(self) -> None:
        """Stop the producer threads and drop everything buffered."""
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _produce(self, domains: list[int]) -> None:
        turn = 0
        while True:
            with self._condition:
                while not self._stop and not any(self._todo[domain] for domain in domains):
                    self._condition.wait()
                if self._stop:
                    return
                # Round-robin over this thread's domains, so one busy domain cannot starve the others.
                domain = next(
                    domains[(turn + step) % len(domains)]
                    for step in range(len(domains))
                    if self._todo[domains[(turn + step) % len(domains)]]
                )
                turn = domains.index(domain) + 1
                # Every pending request of the domain in one read: fewer, larger reads (whole chunks).
                todo = self._todo[domain]
                indices = np.sort(np.concatenate([todo.popleft() for _ in range(len(todo))]))
                indices = indices[indices >= self._floor[domain]]
            if len(indices) == 0:
                continue
            result = self._read(domain, indices)
            with self._condition:
                if isinstance(result, BaseException):
                    self._failed[domain] = (set(indices.tolist()), result)
                else:
                    tokens, valid = result
                    floor, wanted, rows = self._floor[domain], self._wanted[domain], self._rows[domain]
                    for row, index in enumerate(indices.tolist()):
                        if index >= floor and index in wanted:
                            rows[index] = (tokens[row], int(valid[row]))
                self._condition.notify_all()

    def _read(self, domain: int, indices: np.ndarray):
        try:
            return self.streams[domain].read_at(indices)
        except TikmixError as error:
            return error
        except Exception as error:  # surfaced in the consumer with the domain named
            name = self.streams[domain].domain.name
            wrapped = RuntimeError(
                f"reading domain {name!r} at samples {indices[0]}..{indices[-1]} failed: {error}"
            )
            wrapped.__cause__ = error
            return wrapped
