"""The natural baseline: each domain weighted by its share of the corpus tokens."""

from __future__ import annotations

import numpy as np

from tikmix_loader.errors import ConfigError
from tikmix_loader.mixing.base import Mixer, MixingContext, MixtureSolution


def token_shares(context: MixingContext, mixer: str) -> np.ndarray:
    """``domain_tokens / sum(domain_tokens)``; ``ConfigError`` when absent or all zero."""
    context.require("domain_tokens", mixer=mixer)
    total = float(context.domain_tokens.sum())
    if total <= 0:
        raise ConfigError(f"Mixer {mixer!r}: every domain has 0 tokens ({context.domain_tokens.tolist()}).")
    return context.domain_tokens / total


class NaturalMixer(Mixer):
    """Proposes the token shares ``p_d`` from ``context.domain_tokens``. No options, no state."""

    name = "natural"

    def propose(self, context: MixingContext) -> MixtureSolution:
        return MixtureSolution(token_shares(context, self.name), "fixed", "natural token shares")
