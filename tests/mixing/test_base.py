"""The mixer interface: registry, context checks, solution records and one resume check for every mixer."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tikmix_loader.errors import ConfigError, DomainError, MixtureWeightError, StateError
from tikmix_loader.ledger import SOLVER_KEYS
from tikmix_loader.mixing import MIXERS, MixingContext, MixtureSolution, get_mixer, sample_regmix_mixtures

DOMAINS = ("code", "web", "math", "books")


def test_unknown_mixer_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"Unknown mixer 'doremi'; valid mixers are \['natural', 'odm', "):
        get_mixer("doremi")
    assert sorted(MIXERS) == [
        "natural",
        "odm",
        "regmix",
        "static",
        "stratified",
        "temperature",
        "tikmix_d",
        "tikmix_m",
    ]


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"no option\(s\) \['temp'\]; valid options are \['tau'\]"):
        get_mixer("temperature", temp=0.3)


@pytest.mark.parametrize(
    "w_prior,match",
    [
        ([0.5, np.nan, 0.25, 0.25], "finite and >= 0"),
        ([0.5, -0.1, 0.3, 0.3], "finite and >= 0"),
        ({"code": 1.0, "poetry": 1.0}, r"Unknown domain\(s\) \['poetry'\]"),
        ([0.0, 0.0, 0.0, 0.0], "all zero"),
    ],
)
def test_context_rejects_bad_prior_weights(w_prior, match):
    with pytest.raises(MixtureWeightError, match=match):
        MixingContext(domains=DOMAINS, w_prior=w_prior)


def test_context_normalises_prior_and_reorders_an_influence_object():
    matrix = SimpleNamespace(
        values=np.array([[1.0, 2.0, 3.0, 4.0]]), targets=["wiki"], domains=["books", "math", "web", "code"]
    )
    context = MixingContext(domains=DOMAINS, w_prior={"code": 2.0, "web": 2.0}, influence=matrix)
    np.testing.assert_allclose(context.w_prior, [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(context.influence, [[4.0, 3.0, 2.0, 1.0]])
    assert context.targets == ("wiki",)
    with pytest.raises(ValueError):
        context.w_prior[0] = 1.0  # read-only


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"domains": ("a", "a")}, DomainError, "unique non-empty names"),
        ({"influence": np.ones((2, 3))}, ConfigError, r"\[n_targets >= 1, n_domains=4\]"),
        ({"influence": np.ones((2, 4)), "targets": ("x",)}, ConfigError, "1 target names"),
        (
            {"influence": SimpleNamespace(values=np.ones((1, 4)), domains=["a", "b", "c", "d"])},
            DomainError,
            "do not match the context's domains",
        ),
        ({"domain_tokens": [1.0, 2.0]}, ConfigError, "one entry per domain"),
        ({"domain_tokens": [1.0, -2.0, 1.0, 1.0]}, ConfigError, "finite and >= 0"),
    ],
)
def test_context_validation(kwargs, error, match):
    arguments = {"domains": DOMAINS, "w_prior": [0.25] * 4, **kwargs}
    arguments["w_prior"] = [1.0] * len(arguments["domains"])
    with pytest.raises(error, match=match):
        MixingContext(**arguments)


def test_solution_record_matches_the_ledger_and_is_strict_json():
    solution = MixtureSolution(
        np.array([0.25, 0.75]),
        "optimal",
        "ok",
        float("nan"),
        {"std": np.float64(0.5), "gap": float("inf")},
        3,
        False,
    )
    record = solution.to_dict()
    assert tuple(record) == SOLVER_KEYS
    assert record["objective"] is None and record["terms"] == {"std": 0.5, "gap": None}
    json.dumps(record, allow_nan=False)
    assert solution.weights_by_name(["a", "b"]) == {"a": 0.25, "b": 0.75}
    with pytest.raises(MixtureWeightError, match="must sum to 1"):
        MixtureSolution(np.array([0.5, 0.6]), "optimal")
    with pytest.raises(MixtureWeightError, match="finite, >= 0"):
        MixtureSolution(np.array([np.nan, 1.0]), "optimal")


def _label(weights):
    return -np.sum((weights - np.array([0.4, 0.3, 0.2, 0.1])) ** 2, axis=1)


def _mixers():
    """One instance factory per registered mixer, with small options."""
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    mixtures = sample_regmix_mixtures(shares, 64, seed=0)
    losses = np.sum((mixtures - 0.25) ** 2, axis=1)
    return {
        "natural": lambda: get_mixer("natural"),
        "odm": lambda: get_mixer("odm", smoothing=0.5),
        "regmix": lambda: get_mixer(
            "regmix", mixtures=mixtures, losses=losses, model="ridge", num_simulations=2000
        ),
        "static": lambda: get_mixer("static", weights={"code": 1.0, "web": 3.0}),
        "stratified": lambda: get_mixer("stratified"),
        "temperature": lambda: get_mixer("temperature", tau=0.3),
        "tikmix_d": lambda: get_mixer("tikmix_d", gamma=0.5),
        "tikmix_m": lambda: get_mixer(
            "tikmix_m", label_fn=_label, num_candidates=48, num_samples=128, rounds=2, top_k=8, num_rounds=50
        ),
    }


def _contexts(count):
    rng = np.random.default_rng(0)
    w_prior = np.full(4, 0.25)
    for step in range(count):
        influence = rng.gamma(2.0, 1.0, (3, 4)) + 0.1
        yield MixingContext(
            domains=DOMAINS,
            w_prior=w_prior,
            influence=influence,
            step=step,
            domain_tokens=[4e9, 3e9, 2e9, 1e9],
            domain_losses=rng.uniform(1.0, 3.0, 4),
        )


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("midpoint", [0, 2])
def test_every_mixer_resumes_exactly_from_a_json_state(name, midpoint):
    """Stop after ``midpoint`` decisions, reload from JSON, continue: the decisions match a straight run."""
    factory = _mixers()[name]
    contexts = list(_contexts(3))
    straight = factory()
    expected = [straight.propose(c) for c in contexts]
    first = factory()
    for c in contexts[:midpoint]:
        first.propose(c)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = factory()
    resumed.load_state_dict(state)
    for want, c in zip(expected[midpoint:], contexts[midpoint:], strict=True):
        got = resumed.propose(c)
        np.testing.assert_array_equal(got.weights, want.weights)
        assert got.to_dict() == want.to_dict()


def test_state_with_other_options_or_keys_is_refused():
    state = get_mixer("temperature", tau=0.3).state_dict()
    with pytest.raises(StateError, match=r"other options \{'tau': \(0.3, 0.5\)\}"):
        get_mixer("temperature").load_state_dict(state)
    with pytest.raises(StateError, match="saved by mixer 'temperature', not 'natural'"):
        get_mixer("natural").load_state_dict({**state, "config": {}})
    with pytest.raises(StateError, match="state has keys"):
        get_mixer("odm").load_state_dict(state)
