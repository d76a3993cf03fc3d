"""Two gloo processes: disjoint, complete coverage of the global stream and synchronised weight changes."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit.distributed import run_on_ranks
from testkit.domains import write_domains

from tikmix_loader import Domain, MixtureLoader

STEPS, CHANGE_AT, BATCH = 12, 5, 4


def _worker(rank, world_size, directory, results):
    domains = write_domains(directory, {"a": 30, "b": 50}, max_len=80) if rank == 0 else None
    dist.barrier()
    if rank != 0:
        domains = [Domain(name, os.path.join(directory, f"{name}.bin")) for name in ("a", "b")]
    loader = MixtureLoader(domains, batch_size=BATCH, seq_len=10, seed=11, num_workers=1)
    assert (loader.rank, loader.world_size) == (rank, world_size)
    batches = []
    for step in range(STEPS):
        if step == CHANGE_AT:
            # Rank 0 decides; every rank applies the broadcast weights at the same step.
            decided = [[0.9, 0.1] if rank == 0 else None]
            dist.broadcast_object_list(decided, src=0)
            loader.set_weights(decided[0])
        batches.append(loader.next_batch())
    loader.close()
    results[rank] = {
        "input_ids": torch.stack([b["input_ids"] for b in batches]),
        "domain": torch.stack([b["domain"] for b in batches]),
        "state": loader.state_dict(),
    }


def test_two_ranks_see_disjoint_slices_of_the_single_process_stream(tmp_path):
    results = mp.Manager().dict()
    run_on_ranks(_worker, 2, tmp_path, str(tmp_path), results)
    domains = [Domain(name, tmp_path / f"{name}.bin") for name in ("a", "b")]
    single = MixtureLoader(domains, batch_size=2 * BATCH, seq_len=10, seed=11, num_workers=0)
    for step in range(STEPS):
        if step == CHANGE_AT:
            single.set_weights([0.9, 0.1])
        whole = single.next_batch()
        parts = [results[rank]["input_ids"][step] for rank in range(2)]
        assert torch.equal(torch.cat(parts), whole["input_ids"])
        assert torch.equal(torch.cat([results[r]["domain"][step] for r in range(2)]), whole["domain"])
    assert results[0]["state"] == results[1]["state"] == single.state_dict()
