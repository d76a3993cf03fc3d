"""The static baseline: the same user-given mixture at every decision."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tikmix_loader.data.planner import normalize_weights
from tikmix_loader.errors import MixtureWeightError
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option


@dataclass(frozen=True)
class StaticConfig(MixerConfig):
    """Options of :class:`StaticMixer`."""

    weights: dict | tuple = option((), "{domain: weight} or one weight per domain; normalised to sum 1")

    def __post_init__(self):
        values = self.weights.values() if isinstance(self.weights, dict) else self.weights
        bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
        if bad or not values:
            raise MixtureWeightError(
                f"Static `weights` must be non-empty, finite and >= 0, got {self.weights!r} (bad: {bad})."
            )
        if not isinstance(self.weights, dict):
            object.__setattr__(self, "weights", tuple(float(v) for v in self.weights))


class StaticMixer(Mixer):
    """Always proposes ``weights``: a dict by domain name (missing names get 0) or a sequence in domain order.
    Unknown names, NaN, negative or all-zero weights raise ``MixtureWeightError``."""

    name = "static"
    Config = StaticConfig

    def propose(self, context: MixingContext) -> MixtureSolution:
        weights = normalize_weights(self.config.weights, list(context.domains))
        return MixtureSolution(weights, "fixed", "static mixture from the config")
