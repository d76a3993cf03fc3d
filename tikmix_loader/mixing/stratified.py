"""The stratified baseline: the uniform mixture over domains (the baseline Aioli found hard to beat)."""

from __future__ import annotations

import numpy as np

from tikmix_loader.mixing.base import Mixer, MixingContext, MixtureSolution


class StratifiedMixer(Mixer):
    """Proposes ``1 / n_domains`` for every domain. No options, no state."""

    name = "stratified"

    def propose(self, context: MixingContext) -> MixtureSolution:
        n = context.num_domains
        return MixtureSolution(np.full(n, 1.0 / n), "fixed", f"uniform over {n} domains")
