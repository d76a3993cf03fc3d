"""The temperature baseline: token shares raised to ``tau``, renormalised (``tau`` = 1 natural, 0 uniform)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tikmix_loader.errors import ConfigError
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option
from tikmix_loader.mixing.natural import token_shares


@dataclass(frozen=True)
class TemperatureConfig(MixerConfig):
    """Options of :class:`TemperatureMixer`."""

    tau: float = option(0.5, "exponent on the token shares: 1 = natural, 0 = uniform over non-empty domains")

    def __post_init__(self):
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ConfigError(f"Temperature `tau` must be finite and >= 0, got {self.tau}.")


class TemperatureMixer(Mixer):
    """Proposes ``p^tau / sum(p^tau)`` with ``p`` the token shares; empty domains stay at 0."""

    name = "temperature"
    Config = TemperatureConfig

    def propose(self, context: MixingContext) -> MixtureSolution:
        shares = token_shares(context, self.name)
        tempered = np.where(shares > 0, shares**self.config.tau, 0.0)
        return MixtureSolution(tempered / tempered.sum(), "fixed", f"token shares ** {self.config.tau}")
