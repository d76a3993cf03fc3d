"""Fixtures for the influence tests: small models and a briefly trained byte-level LM."""

from __future__ import annotations

import pytest
import torch
from influence_cases import train

from tikmix_loader.models import TinyGPT


@pytest.fixture
def micro():
    """An untrained micro GPT (2 blocks, d_model 32, untied head so ``lm_head`` is a tracked Linear too)."""
    torch.manual_seed(0)
    return TinyGPT.from_preset("micro", seed=0, tie_head=False)


@pytest.fixture(scope="session")
def trained_micro():
    """A micro GPT trained for 150 steps on an equal mix of the ``alpha`` and ``digits`` domains."""
    torch.manual_seed(0)
    model = TinyGPT.from_preset("micro", seed=1)
    return train(model, ("alpha", "digits"), steps=150)
