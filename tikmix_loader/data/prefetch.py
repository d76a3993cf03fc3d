"""Background threads that keep a bounded queue of upcoming samples full for every domain.

Threads rather than processes: a sample is a slice of an already-read token block, so the work is I/O and
numpy copies that release the GIL, and threads share the block caches and need no pickling. (The loader
benchmark measures the result against mosaicml-streaming with process workers.) Each domain's samples are
produced strictly in stream order from a start index, so a queue's content is fully determined by
that index, and restarting from a checkpoint just means restarting the queues at the saved indices.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from tikmix_loader.data.stream import DomainStream
from tikmix_loader.errors import TikmixError

_POLL_SECONDS = 0.05


class _ProducerError:
    """Carries an exception from a producer thread to the consumer, which re-raises it."""

    def __init__(self, error: BaseException):
        self.error = error


class DomainPrefetcher:
    """Per-domain bounded queues of samples, filled by ``num_workers`` threads (0 = read on demand).

    Args:
        streams (list[DomainStream]): One stream per domain.
        starts (np.ndarray): Stream index of the first sample each queue must produce.
        num_workers (int): Producer threads; domains are shared among them round-robin.
        prefetch (int): Samples buffered per domain.
        group (int): Samples read per call (amortises Python overhead).
    """

    def __init__(
        self,
        streams: list[DomainStream],
        starts: np.ndarray,
        *,
        num_workers: int,
        prefetch: int,
        group: int = 8,
    ):
        self.streams = streams
        self.group = max(1, min(group, prefetch))
        self.next_index = [int(start) for start in starts]  # next index the consumer will take
        self.buffers: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in streams]
        self.num_workers = num_workers
        self._stop = threading.Event()
        self._space = threading.Event()
        self._queues = [queue.Queue(maxsize=max(1, prefetch // self.group)) for _ in streams]
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

    def take(self, domain: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``count`` samples of ``domain`` as ``(tokens, valid)``."""
        if count == 0:
            width = self.streams[domain].seq_len + 1
            return np.empty((0, width), np.int64), np.empty(0, np.int64)
        if not self._threads:
            result = self.streams[domain].read(self.next_index[domain], count)
            self.next_index[domain] += count
            return result
        pieces_tokens, pieces_valid, have = [], [], 0
        buffer = self.buffers[domain]
        while have < count:
            if not buffer:
                item = self._queues[domain].get()
                self._space.set()
                if isinstance(item, _ProducerError):
                    raise item.error
                buffer.append(item)
            tokens, valid = buffer[0]
            need = count - have
            pieces_tokens.append(tokens[:need])
            pieces_valid.append(valid[:need])
            have += min(need, len(tokens))
            if need >= len(tokens):
                buffer.pop(0)
            else:
                buffer[0] = (tokens[need:], valid[need:])
        self.next_index[domain] += count
        return np.concatenate(pieces_tokens), np.concatenate(pieces_valid)

    def close(self) -> None:
        """Stop the producer threads and drop everything buffered."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _produce(self, domains: list[int]) -> None:
        cursors = {domain: self.next_index[domain] for domain in domains}
        pending: dict[int, object] = {}
        while domains and not self._stop.is_set():
            progressed = False
            for domain in list(domains):
                if domain not in pending:
                    pending[domain] = self._read_group(domain, cursors[domain])
                    cursors[domain] += self.group
                try:
                    self._queues[domain].put_nowait(pending[domain])
                except queue.Full:
                    continue
                progressed = True
                if isinstance(pending.pop(domain), _ProducerError):
                    domains.remove(domain)  # the consumer will raise; nothing after it is valid
            if not progressed:
                # Every queue is full: sleep until the consumer takes something (or a short timeout).
                self._space.wait(_POLL_SECONDS)
                self._space.clear()

    def _read_group(self, domain: int, start: int):
        try:
            return self.streams[domain].read(start, self.group)
        except TikmixError as error:
            return _ProducerError(error)
        except Exception as error:  # surfaced in the consumer with the domain named
            name = self.streams[domain].domain.name
            wrapped = RuntimeError(f"reading domain {name!r} at sample {start} failed: {error}")
            wrapped.__cause__ = error
            return _ProducerError(wrapped)
