"""Quality sampling inside the loader: epoch multisets, index math, set_quality, resume, ranks, accounting."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
from testkit.domains import write_domains
from testkit.resume import assert_resumes_exactly

from tikmix_loader import (
    ConfigError,
    Domain,
    DomainError,
    MixtureController,
    MixtureLedger,
    MixtureLoader,
    StateError,
)
from tikmix_loader.data.shuffle import WITHIN_BLOCK, BlockShuffle, rng_for
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.data.stream import DomainStream
from tikmix_loader.errors import ScoreError
from tikmix_loader.ledger import load_records, verify
from tikmix_loader.quality import QualityConfig, QualityParams, QualitySampler, write_scores

CRITERIA = {"ref_ppl": "lower", "clean": "higher"}
# Keeps the better ~60% of tokens, up to 2 ** 1.5 copies of the best; the rest get 0 or 1 (eps 0.3).
PARAMS = QualityParams(alpha=(0.7, 0.3), lam=8.0, omega=0.6, eta=1.5, eps=0.3)
STRICT = QualityParams(alpha=(1.0, 0.0), lam=4.0, omega=0.4, eta=1.0, eps=0.0)


def _score(domain, seed):
    rng = np.random.default_rng(seed)
    for name in CRITERIA:
        write_scores(domain.path, name, rng.normal(size=domain.num_docs), num_docs=domain.num_docs)
    return domain


def _labelled_domain(directory, name, num_docs, *, mode="packed", seed=0):
    """Document ``i`` is ``i`` repeated (1..30 times), EOS is ``num_docs``: every token names its document."""
    rng = np.random.default_rng(seed)
    documents = [np.full(int(rng.integers(1, 31)), i) for i in range(num_docs)]
    path = write_memmap(directory / f"{name}.bin", documents, vocab_size=num_docs + 1, eos_id=num_docs)
    return _score(Domain(name, path, mode=mode), seed)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    found = write_domains(tmp_path_factory.mktemp("q"), {"a": 60, "b": 90, "c": 40}, max_len=30)
    return [_score(domain, index) for index, domain in enumerate(found)]


def _loader(domains, params=None, **options):
    quality = QualityConfig(CRITERIA, {"a": PARAMS, "b": STRICT} if params is None else params)
    options = {"batch_size": 6, "seq_len": 8, "seed": 3, "num_workers": 0, "quality": quality, **options}
    return MixtureLoader(domains, **options)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_without_quality_the_stream_is_bit_identical_to_before(tmp_path):
    # Digests of the stream before quality sampling existed (commit 129fc1f): epochs of fixed size must
    # read exactly as they did.
    digest = hashlib.sha256()
    for mode in ("packed", "document"):
        (tmp_path / mode).mkdir()
        (domain,) = write_domains(tmp_path / mode, {"g": 150}, mode=mode, max_len=40)
        stream = DomainStream(domain, seq_len=8, seed=7, block_docs=16, shuffle_window=8)
        tokens, valid = stream.read(0, 3 * stream.samples_per_epoch + 3)
        digest.update(tokens.tobytes())
        digest.update(valid.tobytes())
    assert digest.hexdigest() == "164142cce5392afa1f7b458fd3f3587555d658d6d1a12c119cd5481bdec0bbab"
    (tmp_path / "mix").mkdir()
    loader = MixtureLoader(
        write_domains(tmp_path / "mix", {"a": 60, "b": 90}, max_len=30),
        batch_size=4,
        seq_len=8,
        seed=3,
        num_workers=0,
    )
    digest = hashlib.sha256()
    for _ in range(40):
        batch = loader.next_batch()
        digest.update(batch["input_ids"].numpy().tobytes())
        digest.update(batch["domain"].numpy().tobytes())
    assert digest.hexdigest() == "7fa6b91feb10e0169d41627d91d4164c83c18f1cb57059649471ca8ac675b55d"


def _expected_order(domain, stream, epoch, copies):
    """The epoch's document order built from the shuffle keys directly: blocks expanded by copies."""
    shuffle = BlockShuffle(domain.num_docs, stream.block_docs, stream.seed, stream.domain_key, epoch)
    order = []
    for block in shuffle.block_order:
        start, stop = shuffle.block_range(block)
        ids = np.repeat(np.arange(start, stop), copies[start:stop])
        order.append(
            ids[rng_for(stream.seed, stream.domain_key, epoch, WITHIN_BLOCK, block).permutation(len(ids))]
        )
    return np.concatenate(order)


def _copies(domain, stream, params, epoch):
    sampler = QualitySampler(
        domain.name,
        {n: np.load(f"{domain.path[:-4]}.quality/{n}.npy") for n in CRITERIA},
        domain.doc_lengths,
        CRITERIA,
        params,
    )
    return sampler.copies(stream.seed, stream.domain_key, epoch)


@pytest.mark.parametrize("epoch", [0, 3])
def test_a_document_mode_epoch_serves_each_document_its_copies(tmp_path, epoch):
    domain = _labelled_domain(tmp_path, "d", 200, mode="document")
    stream = DomainStream(domain, seq_len=40, seed=2, block_docs=16, criteria=CRITERIA)
    stream.set_segments(((0, 0, PARAMS),))
    copies = _copies(domain, stream, PARAMS, epoch)
    assert (copies == 0).any() and (copies >= 2).any()  # the case is not trivial
    start = sum(stream.epoch_samples(e) for e in range(epoch))
    tokens, _ = stream.read(start, int(copies.sum()))
    np.testing.assert_array_equal(tokens[:, 0], _expected_order(domain, stream, epoch, copies))
    np.testing.assert_array_equal(np.bincount(tokens[:, 0], minlength=200), copies)
    epochs, _ = stream.locate(np.array([start, start + int(copies.sum())]))
    assert epochs.tolist() == [epoch, epoch + 1]


def test_a_packed_epoch_is_the_packed_stream_of_the_expanded_documents(tmp_path):
    domain = _labelled_domain(tmp_path, "d", 150)
    stream = DomainStream(domain, seq_len=8, seed=5, block_docs=16, shuffle_window=10, criteria=CRITERIA)
    stream.set_segments(((0, 0, PARAMS),))
    copies = _copies(domain, stream, PARAMS, 0)
    order = _expected_order(domain, stream, 0, copies)
    packed = np.concatenate([np.append(np.full(domain.doc_lengths[i], i), 150) for i in order])
    count = (len(packed) - 1) // 8
    assert stream.epoch_samples(0) == count
    tokens, _ = stream.read(0, count)
    expected = {tuple(packed[i * 8 : i * 8 + 9]) for i in range(count)}
    assert {tuple(row) for row in tokens} == expected


def test_sparse_reads_equal_dense_reads_and_no_read_touches_a_document_without_copies(tmp_path, monkeypatch):
    domain = _labelled_domain(tmp_path, "d", 300)
    make = lambda: DomainStream(
        domain, seq_len=8, seed=1, block_docs=32, shuffle_window=64, criteria=CRITERIA
    )  # noqa: E731
    dense = make()
    dense.set_segments(((0, 0, STRICT),))
    dense.set_segments(((0, 0, STRICT), (500, dense.next_epoch(500), PARAMS)))
    everything, _ = dense.read(0, 1500)
    sparse = make()
    sparse.set_segments(dense.segments)
    wanted = np.arange(0, 1500, 37)  # one window per chunk: the sparse path
    tokens, _ = sparse.read_at(wanted)
    np.testing.assert_array_equal(tokens, everything[wanted])
    # Dense and sparse reads of epoch 0 read only documents that epoch serves.
    never = set(np.flatnonzero(_copies(domain, dense, STRICT, 0) == 0).tolist())
    original = domain.read_docs
    read = []
    monkeypatch.setattr(domain, "read_docs", lambda a, b: read.extend(range(a, b)) or original(a, b))
    ranges = domain.read_doc_ranges  # sparse reads take token ranges of documents
    monkeypatch.setattr(domain, "read_doc_ranges", lambda d, a, b: read.extend(d.tolist()) or ranges(d, a, b))
    for wanted in (np.arange(0, dense.epoch_samples(0)), np.arange(0, dense.epoch_samples(0), 37)):
        read.clear()
        fresh = make()
        fresh.set_segments(dense.segments)
        fresh.read_at(wanted)
        assert len(never) > 50 and len(read) > 10 and not never & set(read)


def test_loader_batches_are_the_streams_samples_and_skip_what_quality_removes(domains):
    loader = _loader(domains, params={"b": STRICT})
    batches = [loader.next_batch() for _ in range(30)]
    stream = loader._streams[1]
    copies = stream.epoch_copies(0)
    assert (copies == 0).sum() > 20
    consumed = loader.state_dict()["consumed"][1]
    expected, _ = stream.read(0, consumed)
    got = torch.cat([batch["input_ids"][batch["domain"] == 1] for batch in batches])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected[:, :-1].tolist()))


def test_set_quality_starts_a_fresh_epoch_at_the_next_unplanned_sample(domains):
    loader = _loader(domains)
    reference = _loader(domains)
    for _ in range(5):
        loader.next_batch()
        reference.next_batch()
    start = loader.state_dict()["consumed"][2]
    epoch_before = loader._streams[2].locate(np.array([start - 1]))[0][0]
    loader.set_quality({"c": PARAMS, "a": None})
    assert loader.quality_params == {"b": STRICT, "c": PARAMS}
    stream = loader._streams[2]
    assert stream.locate(np.array([start]))[0][0] == epoch_before + 1
    assert stream.locate(np.array([start]))[1][0] == 0
    # Samples before the change are unchanged; after it domain c follows its new epochs.
    np.testing.assert_array_equal(stream.read(0, start)[0], reference._streams[2].read(0, start)[0])
    loader.set_quality({"b": STRICT})  # unchanged: its epoch goes on
    assert len(loader.state_dict()["quality_segments"][1]) == 1
    assert loader.state_dict()["quality_segments"][2] == [
        [0, 0, None],
        [start, epoch_before + 1, PARAMS.to_dict()],
    ]


def test_resumes_exactly_with_quality_and_a_mid_run_set_quality(domains):
    actions = {
        4: lambda loader: loader.set_quality({"c": PARAMS, "b": None}),
        9: lambda loader: (loader.set_weights([0.2, 0.3, 0.5]), loader.set_quality({"b": STRICT})),
    }
    assert_resumes_exactly(
        lambda: _loader(domains, num_workers=2),
        lambda loader, step: loader.next_batch(),
        total=14,
        midpoints=(3, 4, 10),
        actions=actions,
        equal=_equal,
    )


class _Ranks:
    """``world_size`` loaders as ranks of one job; a step yields the global batch (ranks concatenated)."""

    def __init__(self, domains, world_size):
        self.loaders = [
            _loader(domains, batch_size=12 // world_size, rank=rank, world_size=world_size)
            for rank in range(world_size)
        ]

    def set_quality(self, params):
        for loader in self.loaders:
            loader.set_quality(params)

    def next(self):
        batches = [loader.next_batch() for loader in self.loaders]
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    def state_dict(self):
        return self.loaders[0].state_dict()

    def load_state_dict(self, state):
        for loader in self.loaders:
            loader.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_take_disjoint_slices_of_the_one_process_stream_and_resume_elastically(domains, world_size):
    actions = {3: lambda ranks: ranks.set_quality({"c": PARAMS})}
    assert_resumes_exactly(
        lambda: _Ranks(domains, 1),
        lambda ranks, step: ranks.next(),
        total=8,
        midpoints=(5,),
        actions=actions,
        equal=_equal,
        make_resumed=lambda: _Ranks(domains, world_size),
    )


@pytest.mark.parametrize("context", ["fork"])
def test_dataloader_workers_follow_a_quality_change(domains, context):
    loader = _loader(domains)
    dataloader = loader.as_dataloader(num_workers=2, prefetch_factor=2, multiprocessing_context=context)
    iterator = iter(dataloader)
    got = [next(iterator) for _ in range(3)]
    loader.set_quality({"c": PARAMS, "a": STRICT})
    got += [next(iterator) for _ in range(8)]
    state = dataloader.state_dict()
    del iterator
    reference = _loader(domains)
    expected = []
    for index in range(11):
        if index == 3 + 4:  # applies after the 2 * 2 batches in flight
            reference.set_quality({"c": PARAMS, "a": STRICT})
        expected.append(reference.next_batch())
    assert all(_equal(a, b) for a, b in zip(expected, got, strict=True))
    assert state == reference.state_dict()


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_served_document_tokens_match_a_recount_of_the_served_samples(tmp_path, mode):
    names = ["x", "y"]
    found = [_labelled_domain(tmp_path, name, 70 + 20 * i, mode=mode, seed=i) for i, name in enumerate(names)]
    loader = MixtureLoader(
        found,
        batch_size=5,
        seq_len=8,
        seed=1,
        num_workers=0,
        block_docs=8,
        shuffle_window=16,
        quality=QualityConfig(CRITERIA, {"x": PARAMS}),
    )
    counted = [np.zeros(domain.num_docs, dtype=np.int64) for domain in found]
    for step in range(90):  # several epochs, a quality change mid-epoch, a partial shuffle chunk at the end
        if step == 40:
            loader.set_quality({"x": STRICT, "y": PARAMS})
        batch = loader.next_batch()
        for index, domain in enumerate(found):
            inputs = batch["input_ids"][batch["domain"] == index].numpy().ravel()
            inputs = inputs[inputs < domain.num_docs]  # EOS and padding name no document
            counted[index] += np.bincount(inputs, minlength=domain.num_docs)
    served = loader.served_document_tokens()
    assert loader.stats()["x"]["epochs"] > 2
    for name, expected in zip(names, counted):
        np.testing.assert_array_equal(served[name], expected)


def test_a_state_under_other_quality_settings_is_refused_naming_the_field(domains):
    state = _loader(domains).state_dict()
    other = QualityParams(alpha=(0.5, 0.5), lam=8.0, omega=0.6, eta=1.5, eps=0.3)
    with pytest.raises(StateError, match="quality_params"):
        _loader(domains, params={"a": other, "b": STRICT}).load_state_dict(state)
    changed = MixtureLoader(
        domains,
        batch_size=6,
        seq_len=8,
        seed=3,
        num_workers=0,
        quality=QualityConfig({"ref_ppl": "higher", "clean": "higher"}, {}),
    )
    with pytest.raises(StateError, match="quality_criteria"):
        changed.load_state_dict(state)
    plain = MixtureLoader(domains, batch_size=6, seq_len=8, seed=3, num_workers=0)
    with pytest.raises(StateError, match="quality_segments.*no `quality=`"):
        plain.load_state_dict(state)
    with pytest.raises(StateError, match="without quality sampling"):
        _loader(domains).load_state_dict(plain.state_dict())
    broken = {**state, "quality_segments": [[[0, 0, None]], [[0, 0, {"alpha": [1]}]], []]}
    loader = _loader(domains)
    before = loader.state_dict()
    with pytest.raises(StateError, match="quality_segments"):
        loader.load_state_dict(broken)
    assert loader.state_dict() == before


def test_bad_quality_configuration_is_refused_clearly(domains):
    with pytest.raises(DomainError, match=r"\['z'\]"):
        _loader(domains, params={"z": PARAMS})
    with pytest.raises(ScoreError, match="'a'.*1 weights but there are 2 criteria"):
        _loader(domains, params={"a": QualityParams(alpha=(1.0,), lam=1, omega=0.5, eta=1, eps=0)})
    with pytest.raises(ScoreError, match="less than one"):
        _loader(domains, params={"a": QualityParams(alpha=(1.0, 0.0), lam=1, omega=0.0, eta=1, eps=0)})
    with pytest.raises(ScoreError, match="no readable quality score 'missing'"):
        MixtureLoader(
            domains,
            batch_size=6,
            seq_len=8,
            num_workers=0,
            quality=QualityConfig(["missing"], {"a": QualityParams((1.0,), 1, 0.5, 1, 0)}),
        )
    plain = MixtureLoader(domains, batch_size=6, seq_len=8, num_workers=0)
    with pytest.raises(ConfigError, match="set_quality"):
        plain.set_quality({"a": PARAMS})
    loader = _loader(domains)
    with pytest.raises(DomainError, match="Unknown domain"):
        loader.set_quality({"nope": PARAMS})
    with pytest.raises(ScoreError, match="less than one"):
        loader.set_quality(
            {"a": STRICT, "c": QualityParams(alpha=(1.0, 0.0), lam=1, omega=0.0, eta=1, eps=0)}
        )
    assert loader.quality_params == {"a": PARAMS, "b": STRICT}  # nothing changed


def test_a_pickled_copy_from_before_a_change_reads_later_plans_like_the_loader(domains):
    # What a spawned DataLoader worker holds: a copy taken when the iterator started.
    loader = _loader(domains)
    worker = pickle.loads(pickle.dumps(loader))
    for _ in range(3):
        loader.plan_next()
    loader.set_quality({"c": PARAMS, "b": None})
    plans = [loader.plan_next() for _ in range(6)]
    for plan in plans:
        assert _equal(worker.read_batch(plan), loader.read_batch(plan))


def test_the_controller_records_a_quality_change_in_the_ledger(domains, tmp_path):
    loader = _loader(domains)
    controller = MixtureController(loader, "tikmix_d", ledger=MixtureLedger(tmp_path / "ledger.jsonl"))
    for _ in range(4):
        loader.next_batch()
    weights = loader.weights
    controller.set_quality({"c": PARAMS, "b": None}, step=3)
    (record,) = load_records(tmp_path / "ledger.jsonl")
    assert record["method"] == "quality" and record["step"] == 3 and record["tokens_seen"] == 4 * 6 * 8
    assert record["weights_before"] == record["weights_after"] == weights
    assert record["quality"] == {"a": PARAMS.to_dict(), "c": PARAMS.to_dict()}
    assert loader.quality_params == {"a": PARAMS, "c": PARAMS}
    assert verify(tmp_path / "ledger.jsonl").ok


def test_observation_samples_follow_the_current_quality(tmp_path):
    found = [_labelled_domain(tmp_path, "d", 120, mode="document")]
    loader = MixtureLoader(
        found, batch_size=4, seq_len=40, num_workers=0, quality=QualityConfig(CRITERIA, {"d": STRICT})
    )
    dropped = np.flatnonzero(loader._streams[0].sampler(STRICT).expected_copies == 0)
    assert len(dropped) > 30
    documents = loader.sample_domain("d", 200, seed=0)["input_ids"][:, 0].numpy()
    assert not set(documents.tolist()) & set(dropped.tolist())
    loader.set_quality({"d": None})
    documents = loader.sample_domain("d", 200, seed=0)["input_ids"][:, 0].numpy()
    assert set(documents.tolist()) & set(dropped.tolist())


@pytest.mark.parametrize("exhaustion", ["drop", "stop"])
def test_max_epochs_counts_quality_sampled_epochs(tmp_path, exhaustion):
    found = [_labelled_domain(tmp_path, name, 50, mode="document", seed=i) for i, name in enumerate("xy")]
    loader = MixtureLoader(
        found,
        batch_size=7,
        seq_len=40,
        seed=4,
        num_workers=0,
        exhaustion=exhaustion,
        max_epochs={"x": 2, "y": 3},
        weights={"x": 0.8, "y": 0.2},  # x runs out first
        quality=QualityConfig(CRITERIA, {"x": PARAMS}),
    )
    stream = loader._streams[0]
    copies = sum(_copies(found[0], stream, PARAMS, epoch) for epoch in (0, 1))
    counts = [np.zeros(50, dtype=np.int64), np.zeros(50, dtype=np.int64)]
    for batch in loader:
        for index in range(2):
            counts[index] += np.bincount(batch["input_ids"][batch["domain"] == index, 0], minlength=50)
    # x's budget is its two sampled epochs, y's three plain ones.
    assert stream.epoch_start(2) == copies.sum()
    assert (counts[1] <= 3).all()
    if exhaustion == "drop":  # x gives what it has left to its last batch, y goes on alone
        np.testing.assert_array_equal(counts[0], copies)
        assert 150 - 7 < counts[1].sum()  # until too few are left for a batch
    else:  # iteration ends at the first batch x cannot fill: less than its quota short
        assert (counts[0] <= copies).all() and copies.sum() - 7 < counts[0].sum()
        assert counts[1].sum() < 100


def test_resumes_exactly_when_quality_sampled_domains_run_out(domains):
    actions = {6: lambda loader: loader.set_quality({"c": PARAMS})}
    make = lambda: _loader(domains, exhaustion="drop", max_epochs=1)  # noqa: E731
    assert_resumes_exactly(
        make,
        lambda loader, step: loader.next_batch(),
        total=30,
        midpoints=(5, 17),
        actions=actions,
        equal=_equal,
    )
    loader = make()
    for step in range(30):
        if step in actions:
            actions[step](loader)
        loader.next_batch()
    assert {event["domain"] for event in loader.state_dict()["events"] if event["event"] == "drop"} >= {
        "b",
        "c",
    }


def test_quality_config_validates_and_converts():
    config = QualityConfig(["ref_ppl", "clean"], {"a": PARAMS.to_dict(), "b": None})
    assert config.criteria == {"ref_ppl": "lower", "clean": "lower"}
    assert config.params == {"a": PARAMS, "b": None}
    assert config.to_dict()["params"] == {"a": PARAMS.to_dict(), "b": None}
    for criteria, message in [("ref_ppl", "list or a dict"), ([], "empty"), ({"x": "best"}, "orientation")]:
        with pytest.raises(ScoreError, match=message):
            QualityConfig(criteria)
    with pytest.raises(ScoreError, match="not usable as a file name"):
        QualityConfig(["../x"])
    with pytest.raises(ScoreError, match="'a'.*must be QualityParams"):
        QualityConfig(["x"], {"a": 0.5})
