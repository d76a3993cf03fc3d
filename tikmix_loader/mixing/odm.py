"""ODM: online data mixing as an EXP3 bandit rewarded by per-domain training loss.

Albalak, Pan, Raffel and Wang, "Efficient Online Data Mixing For Language Model Pre-Training" (2023,
arXiv 2312.02406). Each domain is an arm; its reward is the training loss on it (a high loss means there is
still something to learn). After t training batches (K domains)::

    eps_t   = min(1 / K, sqrt(ln K / (K t)))
    pi_t(d) = (1 - K eps_t) * softmax(eps_{t-1} * R)_d + eps_t
    R_d    <- smooth * R_d + (1 - smooth) * L_d / pi_{t-1}(d)        (importance-weighted, EXP3)

Ours: the paper samples one domain per batch and updates after every batch, so t counts batches. Here the
mixer decides every few steps, and t is still the batch count, ``context.step + 1``: counting decisions
instead would keep ``eps_t = 1/K`` (the uniform policy) for the first ``K / ln K``-ish decisions, i.e. for
most of a run that decides every 100 steps. Batches mix domains, so the
controller passes the mean training loss of every domain seen since the last decision
(``context.domain_losses``) and every observed arm is updated with the same importance-weighted rule; a
NaN loss marks an arm that was not observed and keeps its estimate. The policy that was in force (and so
weighs the reward) is this mixer's previous proposal, or ``context.w_prior`` at the first call. ODM draws no
random numbers, so it is deterministic; ``seed`` is kept only for interface symmetry with the other mixers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from tikmix_loader.errors import ConfigError, StateError
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution, option


def exploration_rate(num_domains: int, update: int) -> float:
    """``eps_t = min(1/K, sqrt(ln K / (K t)))`` after ``t`` batches; ``eps_0 = 1/K``."""
    if update <= 0:
        return 1.0 / num_domains
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * update)))


@dataclass(frozen=True)
class ODMConfig(MixerConfig):
    """Options of :class:`ODMMixer`."""

    smoothing: float = option(0.9, "EMA factor of the reward estimates (paper's alpha)")
    seed: int = option(0, "unused: ODM is deterministic; kept so every mixer accepts a seed")

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"ODM `smoothing` must be in [0, 1), got {self.smoothing}.")


class ODMMixer(Mixer):
    """EXP3 over domains on per-domain training loss (see the module docstring). Needs
    ``context.domain_losses`` from the second decision on; the first decision, with no losses yet, is the
    uniform-reward policy (uniform weights)."""

    name = "odm"
    Config = ODMConfig
    STATE_KEYS = ("domains", "update", "batches", "rewards", "policy")

    def __init__(self, **options):
        super().__init__(**options)
        self.domains: list[str] | None = None
        self.update = 0
        self.batches = 0  # t of the last update
        self.rewards: np.ndarray | None = None
        self.policy: np.ndarray | None = None

    def propose(self, context: MixingContext) -> MixtureSolution:
        num_domains = context.num_domains
        if self.domains is None:
            self.domains = list(context.domains)
            self.rewards = np.zeros(num_domains)
        elif self.domains != list(context.domains):
            raise ConfigError(
                f"ODM was started on domains {self.domains}, now called with {list(context.domains)}."
            )
        behaviour = context.w_prior if self.policy is None else self.policy
        observed = 0
        if context.domain_losses is not None:
            seen = np.isfinite(context.domain_losses) & (behaviour > 0)
            observed = int(seen.sum())
            weighted = context.domain_losses[seen] / behaviour[seen]
            self.rewards[seen] = (
                self.config.smoothing * self.rewards[seen] + (1 - self.config.smoothing) * weighted
            )
        eps_prev = exploration_rate(num_domains, self.batches)
        self.update += 1
        self.batches = max(int(context.step) + 1, self.batches + 1)
        eps = exploration_rate(num_domains, self.batches)
        self.policy = (1 - num_domains * eps) * softmax(eps_prev * self.rewards) + eps
        terms = {"exploration": eps, "observed_domains": observed, "max_reward": float(self.rewards.max())}
        return MixtureSolution(
            self.policy / self.policy.sum(),
            "online",
            f"EXP3 update {self.update} on {observed} observed domain losses",
            None,
            terms,
        )

    def _get_state(self) -> dict:
        as_list = lambda array: None if array is None else array.tolist()
        return {
            "domains": self.domains,
            "update": self.update,
            "batches": self.batches,
            "rewards": as_list(self.rewards),
            "policy": as_list(self.policy),
        }

    def _set_state(self, state: dict) -> None:
        rewards, policy = state["rewards"], state["policy"]
        if state["domains"] is not None and (rewards is None or len(rewards) != len(state["domains"])):
            raise StateError(f"ODM state has {state['domains']} domains but rewards {rewards}.")
        self.domains = state["domains"]
        self.update = int(state["update"])
        self.batches = int(state["batches"])
        self.rewards = None if rewards is None else np.asarray(rewards, dtype=np.float64)
        self.policy = None if policy is None else np.asarray(policy, dtype=np.float64)
