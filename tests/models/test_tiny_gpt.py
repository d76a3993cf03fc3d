"""The byte-level TinyGPT: shapes, causality, parameter and FLOPs counts, per-token loss, config errors."""

from __future__ import annotations

import pytest
import torch

from tikmix_loader.errors import ConfigError
from tikmix_loader.losses import mark_labels
from tikmix_loader.models import (
    PRESETS,
    GPTConfig,
    TinyGPT,
    count_parameters,
    estimate_flops,
    flops_per_token,
    per_token_loss,
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tie_head", [True, False])
def test_parameter_count_matches_the_module(preset, tie_head):
    config = GPTConfig.preset(preset, tie_head=tie_head, bias=preset != "small")
    model = TinyGPT(config, seed=0)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(
        p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("wte", "wpe", "lm_head")
    )
    assert count_parameters(config, embeddings=True) == total
    assert count_parameters(config) == total - embeddings
    assert isinstance(model.lm_head, torch.nn.Linear) != tie_head


def test_presets_have_the_sizes_the_protocol_names():
    assert 0.7e6 < count_parameters(GPTConfig.preset("tiny"), embeddings=True) < 0.9e6  # CPU protocol
    assert 20e6 < count_parameters(GPTConfig.preset("medium"), embeddings=True) < 50e6  # GPU protocol


def test_logits_are_causal_and_seeded():
    model = TinyGPT.from_preset("micro", seed=3)
    assert torch.equal(TinyGPT.from_preset("micro", seed=3).wte.weight, model.wte.weight)
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 258
    logits, other = model(ids), model(changed)
    assert logits.shape == (2, 20, 258)
    torch.testing.assert_close(logits[:, :12], other[:, :12])
    assert not torch.allclose(logits[:, 12:], other[:, 12:])


def test_per_token_loss_zeroes_masked_positions_and_matches_cross_entropy():
    model = TinyGPT.from_preset("micro", seed=0)
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    labels[0, 4:] = -100
    loss = per_token_loss(model, mark_labels({"input_ids": ids, "labels": labels}, "shifted"))
    assert loss.shape == (3, 10) and loss.dtype == torch.float32
    assert torch.all(loss[0, 4:] == 0)
    mean = torch.nn.functional.cross_entropy(
        model(ids).reshape(-1, 258), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss.sum() / (labels != -100).sum(), mean)


def test_flops_follow_kaplan_six_n():
    config = GPTConfig.preset("tiny")
    n = count_parameters(config)
    forward = (
        2 * n + 2 * config.n_layer * config.seq_len * config.d_model + 2 * config.d_model * config.vocab_size
    )
    assert flops_per_token(config, training=False) == forward
    assert flops_per_token(config) == 3 * forward
    assert estimate_flops(config, 1000) == 3 * forward * 1000
    assert flops_per_token(config, seq_len=64) < flops_per_token(config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "n_head": 4}, r"`n_head`=4 must divide `d_model`=30"),
        ({"n_layer": 0}, r"`n_layer` must be a positive int, got 0"),
        ({"vocab_size": True}, r"`vocab_size` must be a positive int"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**kwargs)


def test_unknown_preset_and_long_input_raise():
    with pytest.raises(
        ConfigError, match=r"unknown preset 'huge'; valid presets: \['medium', 'micro', 'small', 'tiny'\]"
    ):
        GPTConfig.preset("huge")
    model = TinyGPT.from_preset("micro")
    with pytest.raises(ConfigError, match=r"input has 65 positions but `seq_len`=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    assert GPTConfig.preset("micro").to_dict()["d_model"] == 32
