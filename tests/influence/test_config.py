"""Settings, layer selection, the influence matrix container and every argument error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from influence_cases import batches

from tikmix_loader.errors import ConfigError, DomainError, StateError, TrackingError
from tikmix_loader.influence import (
    PRECONDITIONERS,
    GroupInfluence,
    InfluenceConfig,
    InfluenceMatrix,
    get_preconditioner,
)


def test_config_round_trips_and_reports_changed_fields():
    config = InfluenceConfig(k=(16, 32), layers=["blocks.*"], exclude="*.proj", half_life=10)
    assert config.k_pair == (16, 32) and config.layers == ("blocks.*",) and config.exclude == ("*.proj",)
    assert InfluenceConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.decay == pytest.approx(0.5**0.1) and InfluenceConfig().decay == 1.0
    with pytest.raises(StateError, match=r"damping: saved 0.1 != current 0.2"):
        InfluenceConfig(damping=0.2).check_same(InfluenceConfig().to_dict(), what="load")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"`k` must be a positive int"),
        ({"k": (8, 8, 8)}, r"`k` must be"),
        ({"k": True}, r"`k` must be"),
        (
            {"preconditioner": "newton"},
            r"unknown `preconditioner` 'newton'; valid: \['adam', 'ekfac', 'identity', 'kfac'\]",
        ),
        ({"damping": 0.0}, r"`damping` must be a finite float > 0"),
        ({"layers": ()}, r"`layers` is empty; pass None"),
        ({"layers": [""]}, r"`layers` must hold non-empty name patterns"),
        ({"seed": 1.5}, r"`seed` must be an int"),
        ({"backend": 3}, r"`backend` must be a string"),
        ({"half_life": -1}, r"`half_life` must be a finite number of steps > 0"),
    ],
)
def test_bad_settings_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InfluenceConfig(**kwargs)


def test_preconditioner_registry_lists_valid_names():
    assert sorted(PRECONDITIONERS) == ["adam", "ekfac", "identity", "kfac"]
    assert get_preconditioner("kfac").name == "kfac"
    with pytest.raises(
        ConfigError, match=r"unknown preconditioner 'shampoo'; valid: \['adam', 'ekfac', 'identity', 'kfac'\]"
    ):
        get_preconditioner("shampoo")


def test_layer_selection_defaults_to_every_linear_and_clamps_k(micro):
    gi = GroupInfluence(micro, k=64)
    linears = [name for name, m in micro.named_modules() if isinstance(m, torch.nn.Linear)]
    assert gi.layer_names == linears and len(linears) == 9
    widths = {layer.name: (layer.d_in, layer.k_in, layer.d_out, layer.k_out) for layer in gi.layers}
    # k = 64 is clamped to d_in = 32: that side stays unprojected (the identity, exact); d_out is projected.
    assert widths["blocks.0.mlp.fc"] == (32, 32, 128, 64)
    assert widths["lm_head"] == (32, 32, 258, 64)
    assert widths["blocks.0.mlp.proj"] == (128, 64, 32, 32)


def test_layer_patterns_that_match_nothing_raise(micro):
    with pytest.raises(
        TrackingError,
        match=r"`layers` pattern 'decoder\.\*' matches no trackable module; trackable modules: \[",
    ):
        GroupInfluence(micro, layers=["decoder.*"])
    with pytest.raises(TrackingError, match=r"`exclude` pattern 'nothing' matches no trackable module"):
        GroupInfluence(micro, exclude="nothing")
    with pytest.raises(TrackingError, match=r"leaves no layer"):
        GroupInfluence(micro, layers=["lm_head"], exclude=["lm_*"])
    with pytest.raises(
        TrackingError, match=r"the model \(Sequential\) has no trackable module \(nn.Linear or transformers"
    ):
        GroupInfluence(torch.nn.Sequential(torch.nn.ReLU()))
    assert issubclass(TrackingError, ConfigError)  # code catching the old ConfigError still does


def test_compute_argument_errors(micro):
    good = {"a": batches("alpha", 1)}
    gi = GroupInfluence(micro, k=8)
    with pytest.raises(ConfigError, match=r"`domains` must be a non-empty dict"):
        gi.compute({}, good)
    with pytest.raises(ConfigError, match=r"`targets` names must be non-empty strings"):
        gi.compute(good, {"": batches("alpha", 1)})
    with pytest.raises(DomainError, match=r"domains \['empty'\] have no loss tokens"):
        gi.compute({"a": batches("alpha", 1), "empty": []}, good)
    masked = batches("alpha", 1)[0]
    masked["labels"][:] = -100
    with pytest.raises(DomainError, match=r"targets \['masked'\] have no loss tokens"):
        gi.compute(good, {"masked": [masked]})
    with pytest.raises(ConfigError, match=r"must return a per-token \[B, T\] or per-row \[B\] loss"):
        gi.compute(good, good, loss_fn=lambda model, batch: torch.zeros(()))
    with pytest.raises(ConfigError, match=r"returned shape \(4, 31\) but the batch's labels imply \(4, 32\)"):
        gi.compute(good, good, loss_fn=lambda model, batch: torch.zeros(4, 31, requires_grad=True))
    with pytest.raises(ConfigError, match=r"no tracked layer ran with gradients"):
        gi.compute(good, good, loss_fn=lambda model, batch: torch.zeros(4, 32, requires_grad=True))


def test_per_row_losses_use_rows_as_the_unit(micro):
    from tikmix_loader.models import per_token_loss

    domains = {"a": batches("alpha", 1), "d": batches("digits", 1)}
    targets = {"t": batches("alpha", 1, seed=5)}
    row_mean = lambda model, batch: per_token_loss(model, batch).mean(1)
    per_row = GroupInfluence(micro, k=None, preconditioner="identity").compute(
        domains, targets, loss_fn=row_mean
    )
    per_token = GroupInfluence(micro, k=None, preconditioner="identity").compute(domains, targets)
    assert per_row.domain_tokens.tolist() == [4.0, 4.0]
    # Every row has 32 loss tokens, so the mean of row means equals the token mean.
    np.testing.assert_allclose(per_row.values, per_token.values, rtol=1e-5)


def test_influence_matrix_validates_and_round_trips():
    S = InfluenceMatrix(
        values=np.arange(6.0).reshape(2, 3),
        targets=("t0", "t1"),
        domains=("a", "b", "c"),
        domain_tokens=[1, 2, 3],
        target_tokens=[4, 5],
        processed_tokens=7,
        preconditioner="ekfac",
        k=(8, 16),
    )
    assert S.value("t1", "b") == 4.0
    assert InfluenceMatrix.from_dict(json.loads(json.dumps(S.to_dict()))).to_dict() == S.to_dict()
    with pytest.raises(DomainError, match=r"unknown domain 'z'; known domains: \['a', 'b', 'c'\]"):
        S.value("t0", "z")
    with pytest.raises(DomainError, match=r"unknown target 'x'"):
        S.value("x", "a")
    with pytest.raises(
        ConfigError, match=r"`values` has shape \(3, 2\) but there are 2 targets and 3 domains"
    ):
        InfluenceMatrix(
            values=np.zeros((3, 2)),
            targets=("t0", "t1"),
            domains="abc",
            domain_tokens=[1, 2, 3],
            target_tokens=[1, 2],
        )
    with pytest.raises(ConfigError, match=r"token counts have shapes"):
        InfluenceMatrix(
            values=np.zeros((2, 3)),
            targets=("t0", "t1"),
            domains="abc",
            domain_tokens=[1, 2],
            target_tokens=[1, 2],
        )
