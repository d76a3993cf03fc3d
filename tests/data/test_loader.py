"""MixtureLoader: batch layout, proportions, weight changes, exhaustion, exact resume, ranks, bad input."""

import json

import numpy as np
import pytest
import torch
from testkit.domains import write_domains
from testkit.resume import assert_resumes_exactly

from tikmix_loader import (
    ConfigError,
    Domain,
    DomainError,
    MixtureLoader,
    MixtureWeightError,
    ShardError,
    StateError,
)
from tikmix_loader.data.planner import MixturePlanner
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.data.stream import DomainStream

SIZES = {"code": 60, "web": 150, "math": 30}


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("domains"), SIZES, max_len=120)


def _loader(domains, **options):
    options = {"batch_size": 8, "seq_len": 16, "seed": 7, "num_workers": 0, **options}
    return MixtureLoader(domains, **options)


def _same_batch(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_batches_have_the_documented_layout(domains):
    loader = _loader(domains)
    batch = loader.next_batch()
    assert set(batch) == {"input_ids", "labels", "label_shift", "domain"}
    assert batch["label_shift"].tolist() == [1] * 8  # the default "shifted" convention, recorded per row
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["domain"].dtype == torch.long
    # Labels are the inputs shifted by one within each packed window.
    np.testing.assert_array_equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert batch["domain"].max() < len(loader.domain_names)


def test_default_weights_are_natural_token_shares(domains):
    loader = _loader(domains)
    tokens = np.array([d.num_tokens for d in domains], dtype=float)
    np.testing.assert_allclose(list(loader.weights.values()), tokens / tokens.sum())


def test_realized_shares_track_changing_weights_within_one_sample(domains):
    loader = _loader(domains, batch_size=13)
    names = loader.domain_names
    schedule = {0: [0.2, 0.5, 0.3], 17: [0.9, 0.05, 0.05], 40: [0.0, 0.0, 1.0], 55: [1 / 3, 1 / 3, 1 / 3]}
    counts, implied = np.zeros(3), np.zeros(3)
    for step in range(80):
        if step in schedule:
            loader.set_weights(dict(zip(names, schedule[step])))
        weights = np.array(list(loader.weights.values()))
        batch = loader.next_batch()
        counts += np.bincount(batch["domain"].numpy(), minlength=3)
        implied += weights * 13
        assert np.all(np.abs(counts - implied) <= 1 + 1e-9), (step, counts, implied)
    stats = loader.stats()
    assert sum(s["samples"] for s in stats.values()) == 80 * 13
    assert stats["math"]["target_share"] == pytest.approx(1 / 3)


def test_weight_change_applies_to_the_next_batch_and_zero_weight_domains_never_block(domains):
    loader = _loader(domains, num_workers=2, prefetch=2)
    loader.next_batch()
    loader.set_weights({"code": 0, "web": 0, "math": 1})
    for _ in range(20):  # 160 samples: far more than the 2 buffered for the idle domains
        assert (loader.next_batch()["domain"] == loader.domain_names.index("math")).all()
    loader.close()


def test_threaded_prefetch_gives_the_same_stream_as_reading_on_demand(domains):
    threaded = _loader(domains, num_workers=2, prefetch=5)
    on_demand = _loader(domains, num_workers=0)
    for step in range(40):
        if step == 10:
            for loader in (threaded, on_demand):
                loader.set_weights([0.7, 0.1, 0.2])
        assert _same_batch(threaded.next_batch(), on_demand.next_batch())
    threaded.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_at_midpoints_across_epochs_and_weight_changes(domains, num_workers):
    # 'math' is small: at these rates it wraps its epoch several times within 60 batches.
    actions = {
        5: lambda loader: loader.set_weights({"code": 0.2, "web": 0.2, "math": 0.6}),
        23: lambda loader: loader.set_weights([0.0, 0.5, 0.5]),
        41: lambda loader: loader.set_weights([1, 1, 1]),
    }
    probe = _loader(domains)
    math_epoch = probe._streams[2].samples_per_epoch
    assert 60 * 8 * 0.5 > 2 * math_epoch, "the test must cross epoch boundaries"
    assert_resumes_exactly(
        lambda: _loader(domains, num_workers=num_workers),
        lambda loader, i: loader.next_batch(),
        total=60,
        midpoints=[1, 5, 6, 23, 37, 59],
        actions=actions,
        equal=_same_batch,
    )


def test_elastic_resume_under_another_world_size_continues_the_global_stream(domains):
    def global_batch(loaders):
        parts = [loader.next_batch() for loader in loaders]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    class Ranks:
        """Several ranks' loaders stepping together, saved and restored through rank 0's state."""

        def __init__(self, world_size):
            self.loaders = [
                _loader(domains, batch_size=12 // world_size, rank=r, world_size=world_size)
                for r in range(world_size)
            ]

        def state_dict(self):
            states = [loader.state_dict() for loader in self.loaders]
            assert all(state == states[0] for state in states)
            return states[0]

        def load_state_dict(self, state):
            for loader in self.loaders:
                loader.load_state_dict(state)

    assert_resumes_exactly(
        lambda: Ranks(1),
        lambda ranks, i: global_batch(ranks.loaders),
        total=30,
        midpoints=[7, 19],
        actions={3: lambda ranks: [loader.set_weights([0.1, 0.1, 0.8]) for loader in ranks.loaders]},
        equal=_same_batch,
        make_resumed=lambda: Ranks(3),
    )


def test_ranks_are_disjoint_and_cover_the_global_batch(domains):
    single = _loader(domains, batch_size=12)
    ranks = [_loader(domains, batch_size=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(10):
        whole = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])


@pytest.fixture
def tokens_read(monkeypatch):
    """Counts the tokens every ``DomainStream`` hands out (a spy on ``read_at``, which ``read`` also uses)."""
    counter = {"tokens": 0}
    original = DomainStream.read_at

    def counting(self, indices):
        tokens, valid = original(self, indices)
        counter["tokens"] += tokens.size
        return tokens, valid

    monkeypatch.setattr(DomainStream, "read_at", counting)
    return counter


@pytest.mark.parametrize("world_size", [2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_reads_only_its_share_and_the_ranks_form_the_global_batch(
    domains, tokens_read, world_size, num_workers
):
    batches, per_rank = 12, 24 // world_size
    single = _loader(domains, batch_size=24)
    whole = [single.next_batch() for _ in range(batches)]
    parts, reads = [], []
    for rank in range(world_size):
        loader = _loader(
            domains,
            batch_size=per_rank,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            prefetch=4,
        )
        tokens_read["tokens"] = 0
        parts.append([loader.next_batch() for _ in range(batches)])
        loader.close()
        reads.append(tokens_read["tokens"])
    for step in range(batches):
        for key in whole[step]:
            assert torch.equal(torch.cat([part[step][key] for part in parts]), whole[step][key])
    share = batches * per_rank * (16 + 1)
    lookahead = -(-4 * len(domains) // per_rank) * per_rank * (16 + 1)  # rows planned ahead, at most
    for read in reads:
        assert share <= read <= share + (lookahead if num_workers else 0), (read, share)


def test_plan_next_and_read_batch_give_the_stream_of_next_batch(domains):
    reference = _loader(domains, batch_size=3, rank=1, world_size=4)
    loader = _loader(domains, batch_size=3, rank=1, world_size=4)
    for step in range(15):
        if step == 6:
            for each in (reference, loader):
                each.set_weights([0.0, 0.3, 0.7])
        plan = loader.plan_next()
        assert plan.index == step and loader.batches_seen == step + 1
        assert _same_batch(loader.read_batch(plan), reference.next_batch())


def test_weight_changes_with_threads_read_ahead_give_the_on_demand_stream(domains):
    threaded = _loader(domains, batch_size=2, rank=3, world_size=4, num_workers=2, prefetch=6)
    on_demand = _loader(domains, batch_size=2, rank=3, world_size=4)
    rng = np.random.default_rng(0)
    for step in range(60):
        if step % 7 == 3:
            weights = rng.dirichlet(np.ones(3)) * (rng.random(3) > 0.3)
            weights = weights if weights.sum() > 0 else np.ones(3)
            for loader in (threaded, on_demand):
                loader.set_weights(weights.tolist())
        assert _same_batch(threaded.next_batch(), on_demand.next_batch()), step
    threaded.close()


def test_exhaustion_repeat_reshuffles_each_epoch(tmp_path):
    # Document mode makes an epoch a permutation of the documents, so two epochs hold the same samples.
    domains = write_domains(tmp_path, {"a": 20, "b": 37}, mode="document", max_len=12)
    loader = _loader(domains, weights={"a": 0, "b": 1}, batch_size=1)  # no in-batch reordering
    per_epoch = loader._streams[1].samples_per_epoch
    rows = torch.cat([loader.next_batch()["input_ids"] for _ in range(2 * per_epoch)])
    first, second = rows[:per_epoch], rows[per_epoch : 2 * per_epoch]
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))
    assert not torch.equal(first, second)
    assert loader.stats()["b"]["epochs"] >= 2
    assert any(
        event["event"] == "epoch" and event["domain"] == "b" for event in loader.state_dict()["events"]
    )


def test_exhaustion_drop_removes_the_domain_and_renormalises(domains):
    loader = _loader(domains, weights=[0.0, 0.5, 0.5], exhaustion="drop")
    math_samples = loader._streams[2].samples_per_epoch
    seen = 0
    for _ in range(2 * math_samples // 8 + 5):
        batch = loader.next_batch()
        seen += int((batch["domain"] == 2).sum())
        assert batch["input_ids"].shape[0] == 8
    assert seen == math_samples  # every sample of its one epoch, then nothing more
    assert any(e["event"] == "drop" and e["domain"] == "math" for e in loader.state_dict()["events"])


@pytest.mark.parametrize("exhaustion", ["repeat", "drop"])
@pytest.mark.parametrize(
    ("epoch_size", "expected"),
    [
        # 4 samples per batch. Epoch 1 starts inside batch 2 (sample 10); epoch 2 would start after batch 4
        # (sample 20), but the domain has only 2 epochs, so it starts none and is dropped at batch 5, which
        # leaves no domain with weight.
        (10, [(2, "epoch", "a"), (5, "drop", "a"), (5, "stop", None)]),
        # Batch 1 ends exactly on epoch 0's end (sample 8): epoch 1 starts with batch 2, not in batch 1.
        (8, [(2, "epoch", "a"), (4, "drop", "a"), (4, "stop", None)]),
    ],
)
def test_epoch_events_name_the_batch_that_starts_the_epoch_and_none_after_the_last(
    exhaustion, epoch_size, expected
):
    planner = MixturePlanner(
        names=["a", "b"],
        samples_per_epoch=[epoch_size, 1000],
        global_batch_size=4,
        weights=np.array([1.0, 0.0]),
        seed=0,
        exhaustion=exhaustion,
        max_epochs=np.array([2.0, np.inf]),
    )
    for _ in range(6):
        planner.plan()
    events = [(event["batch"], event["event"], event["domain"]) for event in planner.events]
    assert events == expected


def test_exhaustion_stop_ends_iteration(domains):
    loader = _loader(domains, weights=[0.0, 0.0, 1.0], exhaustion="stop")
    batches = list(loader)
    assert len(batches) == loader._streams[2].samples_per_epoch // 8
    assert loader.next_batch() is None


def test_max_epochs_per_domain_with_repeat(domains):
    loader = _loader(domains, weights=[0.0, 0.5, 0.5], max_epochs={"math": 2})
    for _ in range(loader._streams[2].samples_per_epoch):  # wants ~2x the cap of math
        loader.next_batch()
    assert loader.stats()["math"]["samples"] == 2 * loader._streams[2].samples_per_epoch


def test_sample_domain_does_not_disturb_the_training_stream(domains):
    reference = _loader(domains)
    expected = [reference.next_batch() for _ in range(6)]
    loader = _loader(domains, num_workers=2)
    got = [loader.next_batch() for _ in range(3)]
    state = loader.state_dict()
    observation = loader.sample_domain("web", 10)
    assert (observation["domain"] == loader.domain_names.index("web")).all()
    assert observation["input_ids"].shape == (10, 16)
    assert loader.state_dict() == state
    got += [loader.next_batch() for _ in range(3)]
    assert all(_same_batch(a, b) for a, b in zip(expected, got))
    assert _same_batch(loader.sample_domain("web", 10, seed=4), loader.sample_domain("web", 10, seed=4))
    loader.close()


def test_sample_batches_cuts_the_same_sample_into_batches(domains):
    loader = _loader(domains)
    batches = loader.sample_batches("web", 10, batch_size=4, seed=3)
    assert [len(batch["input_ids"]) for batch in batches] == [4, 4, 2]
    whole = loader.sample_domain("web", 10, seed=3)
    for key, value in whole.items():
        assert torch.equal(torch.cat([batch[key] for batch in batches]), value)
    with pytest.raises(ConfigError, match="`batch_size`"):
        loader.sample_batches("web", 10, batch_size=0)
    loader.close()


def test_document_mode_masks_padding(tmp_path):
    domains = write_domains(tmp_path, {"short": 40}, mode="document", max_len=10)
    batch = _loader(domains, seq_len=32).next_batch()
    assert "attention_mask" in batch
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == -100).all()
    # The last real input predicts padding, so its label is masked too.
    lengths = real.sum(1)
    assert (batch["labels"][torch.arange(8), lengths - 1] == -100).all()


def test_state_is_flat_json(domains):
    loader = _loader(domains)
    loader.next_batch()
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"code": float("nan"), "web": 1, "math": 1}, "finite and >= 0.*code=nan"),
        ([1, -0.5, 1], "finite and >= 0.*web=-0.5"),
        ([1, float("inf"), 1], "finite and >= 0.*web=inf"),
        ([0, 0, 0], r"all zero \(\{'code': 0.0, 'web': 0.0, 'math': 0.0\}\)"),
        ({"code": 1, "poetry": 1}, "Unknown domain.*poetry"),
        ([1, 2], "has 2 entries but there are 3 domains"),
        ("code", r"a dict by domain name or one number per domain \['code', 'web', 'math'\], got 'code'"),
        (0.5, "a dict by domain name or one number per domain .*got 0.5"),
        (np.array(0.5), r"one number per domain .*got array\(0.5\)"),  # iterable by type, yet a lone number
        (torch.tensor(0.5), r"one number per domain .*got tensor\(0.5000\)"),
    ],
)
def test_bad_weights_are_rejected_with_the_domain_named(domains, weights, match):
    with pytest.raises(MixtureWeightError, match=match):
        _loader(domains, weights=weights)
    loader = _loader(domains)
    with pytest.raises(MixtureWeightError, match=match):
        loader.set_weights(weights)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"seq_len": 0}, "`seq_len` must be a positive int"),
        ({"batch_size": -2}, "`batch_size` must be a positive int"),
        ({"batch_size": 2.5}, "`batch_size` must be a positive int"),
        ({"exhaustion": "loop"}, "`exhaustion` must be one of"),
        ({"rank": 2, "world_size": 2}, "`rank` must be in"),
        ({"max_epochs": 0}, "`max_epochs` for domain 'code'"),
    ],
)
def test_bad_options_are_rejected(domains, options, match):
    with pytest.raises(ConfigError, match=match):
        _loader(domains, **options)


def test_domain_too_small_for_seq_len_and_duplicates_and_empty(domains, tmp_path):
    math_stream = domains[2].num_tokens + domains[2].num_docs
    assert all(d.num_tokens > math_stream for d in domains[:2])
    with pytest.raises(DomainError, match="'math'.*too few for one sample"):
        _loader(domains, seq_len=math_stream)
    with pytest.raises(DomainError, match="unique.*'code'"):
        _loader([domains[0], domains[0]])
    with pytest.raises(DomainError, match="`domains` is empty"):
        _loader([])
    path = write_memmap(tmp_path / "empty.bin", [], vocab_size=258)
    with pytest.raises(DomainError, match="'empty'.*is empty"):
        Domain("empty", path)


def test_truncated_memmap_names_the_file(tmp_path):
    path = write_memmap(tmp_path / "t.bin", [np.arange(100)], vocab_size=258)
    with open(path, "r+b") as handle:
        handle.truncate(50)
    with pytest.raises(ShardError, match=r"t\.bin.*truncated"):
        Domain("t", path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_out_of_vocabulary_tokens_fail_at_read_time_naming_the_file(tmp_path, num_workers):
    good = write_memmap(tmp_path / "good.bin", [np.arange(200) % 256], vocab_size=258)
    bad = write_memmap(tmp_path / "bad.bin", [np.full(200, 300)], vocab_size=258)
    loader = MixtureLoader(
        [Domain("good", good), Domain("bad", bad)], batch_size=4, seq_len=8, num_workers=num_workers
    )
    with pytest.raises(ShardError, match=r"bad\.bin.*\[300, 300\].*vocabulary"):
        for _ in range(5):
            loader.next_batch()
    loader.close()


def test_loading_state_of_other_domains_fails(domains):
    loader = _loader(domains)
    other = _loader(domains[:2])
    with pytest.raises(StateError, match="saved for domains"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(StateError, match="seed=7"):
        _loader(domains, seed=8).load_state_dict(loader.state_dict())


@pytest.mark.parametrize(
    ("saved", "resumed", "match"),
    [
        ({"seq_len": 16}, {"seq_len": 8}, r"seq_len=16 in the state but seq_len=8 in this loader"),
        ({"block_docs": 256}, {"block_docs": 16}, r"block_docs=256 in the state but block_docs=16"),
        (
            {"shuffle_window": 256},
            {"shuffle_window": 32},
            r"shuffle_window=256 in the state but shuffle_window=32",
        ),
        ({"batch_size": 8}, {"batch_size": 4}, r"global_batch_size=8 in the state but global_batch_size=4"),
        (
            {"batch_size": 4, "world_size": 2},
            {"batch_size": 4},
            r"global_batch_size=8 .* global_batch_size=4",
        ),
        (
            {"seq_len": 16, "block_docs": 256},
            {"seq_len": 12, "block_docs": 64},
            r"seq_len=16 in the state but seq_len=12.*block_docs=256 in the state but block_docs=64",
        ),
    ],
)
def test_a_state_saved_under_other_settings_is_refused_naming_each_change(domains, saved, resumed, match):
    # Each of these used to load silently and then duplicate or skip data (e.g. seq_len 64 -> 32).
    source = _loader(domains, **saved)
    source.next_batch()
    target = _loader(domains, **resumed)
    before = target.state_dict()
    with pytest.raises(StateError, match=match):
        target.load_state_dict(json.loads(json.dumps(source.state_dict())))
    assert target.state_dict() == before


def test_a_state_saved_with_another_eos_or_mode_is_refused(domains, tmp_path):
    state = _loader(domains).state_dict()
    other_eos = [Domain(d.name, d.path, eos_id=3) for d in domains]
    with pytest.raises(StateError, match=r"eos_ids=\[256, 256, 256\] in the state but eos_ids=\[3, 3, 3\]"):
        _loader(other_eos).load_state_dict(state)
    documents = [Domain(d.name, d.path, mode="document") for d in domains]
    with pytest.raises(StateError, match=r"modes=\['packed', 'packed', 'packed'\] in the state"):
        _loader(documents).load_state_dict(state)


def _edited(state, **changes):
    state = json.loads(json.dumps(state))
    for key, value in changes.items():
        if value is _DELETE:
            del state[key]
        else:
            state[key] = value
    return state


_DELETE = object()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"carry": _DELETE}, r"missing key 'carry'"),
        ({"consumed": [1, 2]}, r"key 'consumed' must be a list of 3 ints >= 0.*got \[1, 2\]"),
        ({"consumed": ["a", 1, 2]}, r"key 'consumed' must be a list of 3 ints"),
        ({"batch_index": "7"}, r"key 'batch_index' must be an int >= 0, got '7'"),
        ({"carry": [0.0, None, 0.0]}, r"key 'carry' must be a list of 3 finite numbers"),
        ({"active": [1, 1, 1]}, r"key 'active' must be a list of 3 booleans"),
        ({"finished": "no"}, r"key 'finished' must be true or false"),
        ({"weight_history": [[0, [1.0]]]}, r"key 'weight_history' must be a list of \[batch, weights\]"),
        ({"events": None}, r"key 'events' must be a list of event dicts"),
        ({"domains": _DELETE}, r"missing key 'domains'"),
        ({"seq_len": _DELETE}, r"missing key\(s\) \['seq_len'\]"),
        ({"version": 99}, r"version 99 is not 2"),
    ],
)
def test_a_malformed_state_is_a_state_error_naming_the_key(domains, changes, match):
    loader = _loader(domains)
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(StateError, match=match):
        _loader(domains).load_state_dict(_edited(state, **changes))
    with pytest.raises(StateError, match="must be a dict"):
        _loader(domains).load_state_dict(None)


def test_a_version_1_state_loads_with_a_warning_for_the_settings_it_lacks(domains, caplog):
    loader = _loader(domains)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    legacy = {key: value for key, value in state.items() if key not in loader._planner.settings}
    legacy.update(version=1, domains=state["domains"], seed=7, global_batch_size=8)
    resumed = _loader(domains)
    resumed.load_state_dict(legacy)
    assert "does not record" in caplog.text and "seq_len" in caplog.text
    assert _same_batch(resumed.next_batch(), loader.next_batch())
    with pytest.raises(StateError, match="global_batch_size=8 in the state but global_batch_size=4"):
        _loader(domains, batch_size=4).load_state_dict(legacy)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"code": 1, "web": 1}, r"no weight for domain\(s\) \['math'\].*missing=\"zero\""),
        ({"code": "0.5", "web": 1, "math": 1}, r"domain 'code' must be a number, got '0.5'"),
        ({"code": None, "web": 1, "math": 1}, r"domain 'code' must be a number, got None"),
        ([1, True, 1], r"domain 'web' must be a number, got True"),
        ([1, [2], 1], r"domain 'web' must be a number"),
    ],
)
def test_partial_and_non_numeric_weights_are_rejected_naming_the_domain(domains, weights, match):
    loader = _loader(domains)
    with pytest.raises(MixtureWeightError, match=match):
        loader.set_weights(weights)
    with pytest.raises(MixtureWeightError, match=match):
        _loader(domains, weights=weights)


def test_missing_zero_gives_left_out_domains_no_weight(domains):
    loader = _loader(domains)
    loader.set_weights({"math": 2.0}, missing="zero")
    assert loader.weights == {"code": 0.0, "web": 0.0, "math": 1.0}
    assert (loader.next_batch()["domain"] == 2).all()
    with pytest.raises(ConfigError, match="`missing` must be one of"):
        loader.set_weights({"math": 1.0}, missing="ignore")


@pytest.mark.parametrize("convention", ["shifted", "hf"])
@pytest.mark.parametrize("rows", [1, 6])
def test_samples_to_batch_masks_exactly_the_positions_past_each_sample(convention, rows):
    from tikmix_loader.data.loader import samples_to_batch
    from tikmix_loader.losses import IGNORE_INDEX

    rng = np.random.default_rng(rows)
    tokens = rng.integers(0, 258, size=(rows, 9))
    valid = np.full(rows, 9)
    valid[rows // 2 :] = rng.integers(1, 9, size=rows - rows // 2)  # some padded rows (document mode)
    batch = samples_to_batch(tokens.copy(), valid, np.zeros(rows), True, label_convention=convention)
    shift = 1 if convention == "shifted" else 0
    for row in range(rows):
        for t in range(8):
            target = t + shift
            expected = tokens[row, target] if 1 <= target < valid[row] else IGNORE_INDEX
            assert batch["labels"][row, t] == expected
            assert batch["input_ids"][row, t] == tokens[row, t]  # never overwritten through a shared view
            assert batch["attention_mask"][row, t] == (t < valid[row])
