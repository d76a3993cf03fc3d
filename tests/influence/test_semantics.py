"""Semantics on a briefly trained byte LM: matching data helps most, noise less, and size is irrelevant."""

from __future__ import annotations

import numpy as np
import pytest
from influence_cases import batches

from tikmix_loader.influence import GroupInfluence


@pytest.fixture(scope="module")
def groups():
    alpha = batches("alpha", 2, seed=201)
    domains = {
        "alpha": alpha,
        "digits": batches("digits", 2, seed=202),
        "random": batches("random", 2, seed=203),
        "alpha_twice": alpha + alpha,
    }
    targets = {"alpha_val": batches("alpha", 1, seed=211), "digits_val": batches("digits", 1, seed=212)}
    return domains, targets


@pytest.mark.parametrize("preconditioner", ["identity", "kfac", "ekfac"])
def test_influence_ranks_domains_by_relevance(trained_micro, groups, preconditioner):
    domains, targets = groups
    S = GroupInfluence(trained_micro, preconditioner=preconditioner).compute(domains, targets)
    value = S.value
    for target, own, other in (("alpha_val", "alpha", "digits"), ("digits_val", "digits", "alpha")):
        row = S.values[S.targets.index(target)]
        assert S.domains[int(np.argmax(row))] in (own, "alpha_twice" if own == "alpha" else own), S.values
        assert value(target, own) > 0, S.values
        assert value(target, "random") < value(target, own), S.values
        assert value(target, other) < value(target, own), S.values
    # Duplicating a domain's data changes nothing: phi is a per-token mean (the factors are shared).
    np.testing.assert_allclose(S.values[:, 3], S.values[:, 0], rtol=1e-5)
    assert S.domain_tokens[3] == 2 * S.domain_tokens[0]
