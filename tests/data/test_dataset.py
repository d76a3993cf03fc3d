"""The DataLoader face: same batches as the loader, Composer's dataset-state protocol, worker processes."""

import pytest
import torch
from testkit.domains import write_domains

from tikmix_loader import MixtureLoader


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("domains"), {"a": 40, "b": 90, "c": 25}, max_len=100)


def _loader(domains, **options):
    return MixtureLoader(domains, batch_size=6, seq_len=12, seed=3, num_workers=0, **options)


def _equal(a, b):
    return all(torch.equal(a[key], b[key]) for key in a)


def test_dataloader_without_workers_yields_the_loader_batches_and_resumes_from_dataset_state(domains):
    reference = _loader(domains)
    expected = [reference.next_batch() for _ in range(12)]

    loader = _loader(domains)
    dataloader = loader.as_dataloader()
    iterator = iter(dataloader)
    got = [next(iterator) for _ in range(7)]
    # Composer's protocol: the dataset reports its state at the last delivered batch ...
    state = dataloader.dataset.state_dict(num_samples=7 * 6, from_beginning=True)
    # ... and a new run loads it instead of replaying batches.
    resumed = _loader(domains).as_dataloader()
    resumed.dataset.load_state_dict(state)
    got += [batch for _, batch in zip(range(5), resumed)]
    assert all(_equal(a, b) for a, b in zip(expected, got))


def test_worker_processes_give_a_deterministic_stream_with_scheduled_weight_changes(domains):
    num_workers, prefetch_factor = 2, 2
    margin = num_workers * prefetch_factor + 1
    loader = _loader(domains)
    dataloader = loader.as_dataloader(num_workers=num_workers, prefetch_factor=prefetch_factor)
    got = []
    for index, batch in zip(range(16), dataloader):
        got.append(batch)
        if index == 2:  # after 3 delivered batches
            loader.set_weights([0.0, 0.0, 1.0])
    # The change lands at batch 3 + margin in every worker; the main process's plan follows it exactly.
    reference = _loader(domains)
    expected = []
    for index in range(16):
        if index == 3 + margin:
            reference.set_weights([0.0, 0.0, 1.0])
        expected.append(reference.next_batch())
    assert all(_equal(a, b) for a, b in zip(expected, got))
    assert (got[-1]["domain"] == 2).all() and not (got[3]["domain"] == 2).all()
    assert loader.state_dict()["consumed"] == reference.state_dict()["consumed"]
    assert loader.state_dict()["weight_history"] == reference.state_dict()["weight_history"]
