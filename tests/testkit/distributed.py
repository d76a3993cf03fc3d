"""Runs a test function on several gloo ranks of this machine, one spawned process per rank."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(fn: Callable[..., None], world_size: int, directory: Path, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ranks 0..world_size-1 of one gloo process group.

    ``fn`` must be a module-level function (spawned processes import it by name). The group rendezvous
    through a file in ``directory`` (a fresh test folder), so no port can be taken by another process.
    Returns when every rank has finished; an exception on any rank fails the call.
    """
    init_file = Path(directory) / "gloo-rendezvous"
    mp.spawn(_rank_main, args=(world_size, str(init_file), fn, args), nprocs=world_size, join=True)


def _rank_main(rank: int, world_size: int, init_file: str, fn: Callable[..., None], args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
