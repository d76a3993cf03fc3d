"""The DataLoader face: the loader's batches, exact state and resume with and without worker processes."""

import pickle

import pytest
import torch
from testkit.domains import write_domains
from testkit.resume import assert_resumes_exactly

from tikmix_loader import ConfigError, MixtureLoader

BATCH_SIZE = 4
# A change after 2 delivered batches, one after 7; an iterator restart at 5 (persistent workers keep theirs).
WEIGHT_CHANGES = {2: [0.0, 0.0, 1.0], 7: [1.0, 1.0, 0.0]}
RESTART_AT = 5
TOTAL = 10


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("domains"), {"a": 20, "b": 30, "c": 15}, max_len=40)


def _loader(domains, **options):
    return MixtureLoader(domains, batch_size=BATCH_SIZE, seq_len=8, seed=3, num_workers=0, **options)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class DataLoaderRun:
    """One DataLoader over a fresh loader, stepped batch by batch, with the DataLoader's own state."""

    def __init__(self, domains, **dataloader_options):
        self.loader = _loader(domains)
        self.dataloader = self.loader.as_dataloader(**dataloader_options)
        self.iterator = None

    def next(self):
        if self.iterator is None:
            self.iterator = iter(self.dataloader)
        return next(self.iterator)

    def restart(self):
        self.iterator = None  # the next batch comes from a new iterator (the old one is dropped)

    def state_dict(self):
        return self.dataloader.state_dict()

    def load_state_dict(self, state):
        self.dataloader.load_state_dict(state)

    def close(self):
        self.iterator = None


def _actions(restart: bool):
    actions = {
        step: lambda run, w=weights: run.loader.set_weights(w) for step, weights in WEIGHT_CHANGES.items()
    }
    if restart:
        actions[RESTART_AT] = DataLoaderRun.restart
    return actions


def _assert_resumes(domains, *, midpoints, states_from_reference=False, restart=True, **dataloader_options):
    assert_resumes_exactly(
        lambda: DataLoaderRun(domains, **dataloader_options),
        lambda run, i: run.next(),
        total=TOTAL,
        midpoints=midpoints,
        actions=_actions(restart),
        equal=_equal,
        states_from_reference=states_from_reference,
    )


# -- without worker processes -------------------------------------------------------------------------


def test_dataloader_without_workers_yields_the_loader_batches_and_resumes_from_dataset_state(domains):
    reference = _loader(domains)
    expected = [reference.next_batch() for _ in range(12)]

    loader = _loader(domains)
    dataloader = loader.as_dataloader()
    iterator = iter(dataloader)
    got = [next(iterator) for _ in range(7)]
    # Composer's protocol: the dataset reports its state at the last delivered batch ...
    state = dataloader.dataset.state_dict(num_samples=7 * BATCH_SIZE, from_beginning=True)
    # ... and a new run loads it instead of replaying batches.
    resumed = _loader(domains).as_dataloader()
    resumed.dataset.load_state_dict(state)
    got += [batch for _, batch in zip(range(5), resumed)]
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_without_workers_a_weight_change_applies_from_the_next_batch(domains):
    loader = _loader(domains)
    iterator = iter(loader.as_dataloader())
    next(iterator)
    loader.set_weights([0.0, 0.0, 1.0])
    assert (next(iterator)["domain"] == 2).all()


# -- worker processes: the defects of issue 15, each as it was reproduced ----------------------------


def _set_weights_after(loader, dataloader, delivered, weights):
    """Batches from ``dataloader`` with ``weights`` set after ``delivered`` of them (iterator kept alive)."""
    iterator = iter(dataloader)
    batches = [next(iterator) for _ in range(delivered)]
    loader.set_weights(weights)
    return iterator, batches


def test_workers_a_change_applies_after_the_batches_in_flight_and_shows_at_once(domains):
    num_workers, prefetch_factor = 2, 2
    in_flight = num_workers * prefetch_factor
    loader = _loader(domains)
    before = loader.weights
    dataloader = loader.as_dataloader(num_workers=num_workers, prefetch_factor=prefetch_factor)
    iterator, got = _set_weights_after(loader, dataloader, 3, [0.0, 0.0, 1.0])
    # Defect 3: `weights` and the state show the change right away (the ledger's weights_after).
    assert loader.weights == {"a": 0.0, "b": 0.0, "c": 1.0} != before
    assert loader.state_dict()["weight_history"][-1] == [3 + in_flight, [0.0, 0.0, 1.0]]
    got += [next(iterator) for _ in range(9)]
    # It takes effect at the first batch not yet planned: deterministic, the same as a loader told so.
    reference = _loader(domains)
    expected = []
    for index in range(12):
        if index == 3 + in_flight:
            reference.set_weights([0.0, 0.0, 1.0])
        expected.append(reference.next_batch())
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=True))
    assert (got[-1]["domain"] == 2).all() and not (got[3 + in_flight - 1]["domain"] == 2).all()
    assert loader.state_dict() == reference.state_dict()


def test_workers_a_scheduled_change_is_in_the_state_and_a_resume_keeps_it(domains):
    # Defect 2: the change set after 3 batches lands at batch 7; a checkpoint at 3 must carry it.
    loader = _loader(domains)
    dataloader = loader.as_dataloader(num_workers=2, prefetch_factor=2)
    iterator, _ = _set_weights_after(loader, dataloader, 3, [0.0, 0.0, 1.0])
    state = dataloader.state_dict()
    expected = [next(iterator) for _ in range(6)]
    resumed = _loader(domains).as_dataloader(num_workers=2, prefetch_factor=2)
    resumed.load_state_dict(state)
    got = [batch for _, batch in zip(range(6), resumed)]
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=True))
    assert (got[-1]["domain"] == 2).all()


def test_workers_resumed_at_an_odd_batch_yield_batches_in_order(domains):
    # Defect 1: resumed at batch 3 with 2 workers, batches came as [4, 3, 6, 5].
    expected = [batch for _, batch in zip(range(8), _loader(domains).as_dataloader())]
    first = _loader(domains).as_dataloader(num_workers=2)
    head = [batch for _, batch in zip(range(3), first)]
    resumed = _loader(domains).as_dataloader(num_workers=2)
    resumed.load_state_dict(first.state_dict())
    tail = [batch for _, batch in zip(range(5), resumed)]
    assert all(_equal(a, b) for a, b in zip(expected, head + tail, strict=True))


def test_persistent_workers_a_second_iterator_continues_at_the_delivered_batch(domains):
    # Defect 5: a second iterator after 16 batches yielded batch 20 onwards while the state said 16.
    expected = [batch for _, batch in zip(range(20), _loader(domains).as_dataloader())]
    loader = _loader(domains)
    dataloader = loader.as_dataloader(num_workers=2, persistent_workers=True)
    got = [batch for _, batch in zip(range(16), dataloader)]
    assert loader.state_dict()["batch_index"] == 16
    got += [batch for _, batch in zip(range(4), dataloader)]
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_the_dataset_pickles_for_spawned_workers_while_an_iterator_plans_ahead(domains):
    # Defect 4: spawn/forkserver failed pickling a local closure set on the loader during iteration.
    loader = _loader(domains)
    dataloader = loader.as_dataloader(num_workers=1)
    iterator = iter(dataloader)
    next(iterator)
    copy = pickle.loads(pickle.dumps(dataloader.dataset))
    plan = loader.plan_ahead().plan()  # the next batch after the one delivered and those in flight
    assert _equal(copy[plan], loader.read_batch(plan))


def test_as_dataloader_rejects_batching_arguments_it_owns(domains):
    with pytest.raises(ConfigError, match=r"\['batch_size', 'shuffle'\] are set by the MixtureLoader"):
        _loader(domains).as_dataloader(batch_size=8, shuffle=True)


# -- the shared resume check over DataLoader classes, worker counts, start methods and persistence -----

FORK_CASES = [(0, False), (1, False), (1, True), (2, False), (2, True)]


@pytest.mark.parametrize("stateful", [False, True], ids=["DataLoader", "StatefulDataLoader"])
@pytest.mark.parametrize(("num_workers", "persistent"), FORK_CASES, ids=lambda case: str(case))
def test_resumes_exactly_with_fork_workers_and_weight_changes(domains, stateful, num_workers, persistent):
    options = {"num_workers": num_workers, "stateful": stateful}
    if num_workers:
        options.update(multiprocessing_context="fork", persistent_workers=persistent)
    _assert_resumes(domains, midpoints=(3, 6), **options)


# Spawned workers import torch (seconds each on a small VM), so spawn runs the pairwise cover of
# {DataLoader, StatefulDataLoader} x {1, 2 workers} x {persistent or not}, one odd midpoint, and takes the
# checkpoint from the uninterrupted run: two DataLoaders per case. The iterator restart (which starts new
# workers unless they persist) runs where workers persist; the fork cases cover it without.
# forkserver workers are forked from a fresh server process, so they unpickle the dataset as spawned ones
# do; two one-worker cases (the spawn cases cover two workers) cover both DataLoader classes, persistent
# or not.
SPAWN_CASES = [(False, 1, False), (False, 2, True), (True, 1, True), (True, 2, False)]
FORKSERVER_CASES = [(False, 1, False), (True, 1, True)]
CASES = [("spawn", *case) for case in SPAWN_CASES] + [("forkserver", *case) for case in FORKSERVER_CASES]


@pytest.mark.parametrize(
    ("context", "stateful", "num_workers", "persistent"), CASES, ids=lambda case: str(case)
)
def test_resumes_exactly_with_spawned_workers_and_weight_changes(
    domains, context, stateful, num_workers, persistent
):
    _assert_resumes(
        domains,
        midpoints=(3,),
        states_from_reference=True,
        restart=persistent,
        stateful=stateful,
        num_workers=num_workers,
        multiprocessing_context=context,
        persistent_workers=persistent,
    )


def test_held_batches_the_state_excludes_batches_fetched_ahead_and_keeps_later_weight_changes(domains):
    # A trainer that fetches one batch ahead (Lightning) trained on 5 of the 6 delivered batches.
    expected = [batch for _, batch in zip(range(9), _loader(domains).as_dataloader())]
    loader = _loader(domains)
    dataloader = loader.as_dataloader()
    dataloader.held_batches = 1
    iterator = iter(dataloader)
    got = [next(iterator) for _ in range(6)][:5]
    loader.set_weights([0.0, 0.0, 1.0])  # decided after training batch 4: applies from batch 6
    state = dataloader.state_dict()
    assert state["batch_index"] == 5 and state["weight_history"][-1] == [6, [0.0, 0.0, 1.0]]
    resumed = _loader(domains).as_dataloader()
    resumed.load_state_dict(state)
    tail = [batch for _, batch in zip(range(4), resumed)]
    assert all(_equal(a, b) for a, b in zip(expected[5:6], tail[:1], strict=True))  # the held batch
    assert all((batch["domain"] == 2).all() for batch in tail[1:])
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=False))
