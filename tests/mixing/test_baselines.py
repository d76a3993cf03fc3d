"""Fixed baselines: static, stratified, natural and temperature."""

import numpy as np
import pytest

from tikmix_loader.errors import ConfigError, MixtureWeightError
from tikmix_loader.mixing import MixingContext, get_mixer

DOMAINS = ("code", "web", "math", "books")
TOKENS = np.array([100.0, 600.0, 50.0, 250.0])


@pytest.fixture
def context():
    return MixingContext(domains=DOMAINS, w_prior=[0.25] * 4, domain_tokens=TOKENS)


def test_static_by_name_and_by_position(context):
    by_name = get_mixer("static", weights={"web": 3.0, "code": 1.0}).propose(context)
    np.testing.assert_allclose(by_name.weights, [0.25, 0.75, 0.0, 0.0])
    assert by_name.status == "fixed" and by_name.objective is None
    by_position = get_mixer("static", weights=[1, 1, 2, 0]).propose(context)
    np.testing.assert_allclose(by_position.weights, [0.25, 0.25, 0.5, 0.0])


@pytest.mark.parametrize(
    "weights,match",
    [
        ({"code": float("nan")}, "finite and >= 0"),
        ([1.0, -1.0, 1.0, 1.0], "finite and >= 0"),
        ([], "non-empty"),
    ],
)
def test_static_bad_weights_raise_at_construction(weights, match):
    with pytest.raises(MixtureWeightError, match=match):
        get_mixer("static", weights=weights)


@pytest.mark.parametrize(
    "weights,match",
    [
        ({"cooking": 1.0, "code": 1.0}, r"Unknown domain\(s\) \['cooking'\]"),
        ([1.0, 1.0], "has 2 entries but there are 4 domains"),
        ({"code": 0.0}, "all zero"),
    ],
)
def test_static_weights_that_do_not_fit_the_domains_raise(context, weights, match):
    with pytest.raises(MixtureWeightError, match=match):
        get_mixer("static", weights=weights).propose(context)


def test_stratified_natural_temperature(context):
    np.testing.assert_allclose(get_mixer("stratified").propose(context).weights, 0.25)
    np.testing.assert_allclose(get_mixer("natural").propose(context).weights, TOKENS / TOKENS.sum())
    tempered = get_mixer("temperature").propose(context).weights
    np.testing.assert_allclose(tempered, np.sqrt(TOKENS) / np.sqrt(TOKENS).sum())
    np.testing.assert_allclose(
        get_mixer("temperature", tau=1.0).propose(context).weights, TOKENS / TOKENS.sum()
    )
    np.testing.assert_allclose(get_mixer("temperature", tau=0.0).propose(context).weights, 0.25)


def test_token_based_baselines_need_tokens():
    bare = MixingContext(domains=DOMAINS, w_prior=[0.25] * 4)
    for name in ("natural", "temperature"):
        with pytest.raises(ConfigError, match=r"needs MixingContext field\(s\) \['domain_tokens'\]"):
            get_mixer(name).propose(bare)
    empty = MixingContext(domains=DOMAINS, w_prior=[0.25] * 4, domain_tokens=[0, 0, 0, 0])
    with pytest.raises(ConfigError, match="every domain has 0 tokens"):
        get_mixer("natural").propose(empty)
    with pytest.raises(ConfigError, match="`tau` must be finite and >= 0"):
        get_mixer("temperature", tau=-1.0)
