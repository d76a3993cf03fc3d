"""Pin the BLAS thread pools to one thread while a small solve runs, so a busy machine cannot stall it.

The mixture solves work on matrices of at most a few hundred columns, where a multi-threaded BLAS only adds
synchronisation: with other processes on the cores, OpenBLAS threads spin-wait for each other and one
matrix-vector product can take 50x longer. ``threadpoolctl`` limits every BLAS loaded in the process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController


@functools.lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    # Scanning the loaded libraries is slow (milliseconds); once per process is enough.
    return ThreadpoolController()


@contextmanager
def blas_threads(limit: int = 1) -> Iterator[None]:
    """Limit every loaded BLAS to ``limit`` threads inside the block and restore the previous counts after.

    Args:
        limit (int): Threads per BLAS pool. Default: 1.
    """
    with _controller().limit(limits=limit, user_api="blas"):
        yield
