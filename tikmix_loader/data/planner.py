"""``MixturePlanner``: which samples of which domain make up each global batch, as a pure state machine.

The planner never touches data. From the current weights it computes each global batch's per-domain
quotas (``quota.allocate_quota``), the positions of those samples in every domain's endless stream
(``stream.DomainStream``), and a seeded order that mixes them across the batch before ranks take their
slices. Exhaustion is decided here too, from counts alone, so every rank and every DataLoader worker that
replays the same weight history plans exactly the same batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tikmix_loader.data.quota import allocate_quota
from tikmix_loader.data.shuffle import BATCH_ORDER, rng_for
from tikmix_loader.errors import ConfigError, MixtureWeightError, StateError

logger = logging.getLogger(__name__)

EXHAUSTION_POLICIES = ("repeat", "drop", "stop")
STATE_VERSION = 1


@dataclass(frozen=True)
class BatchPlan:
    """One global batch: ``quota[d]`` samples of domain ``d`` starting at stream index ``starts[d]``.

    The batch is the concatenation of the domains' samples in domain order, permuted by ``order``:
    position ``i`` of the global batch is concatenated sample ``order[i]``.
    """

    index: int
    quota: np.ndarray
    starts: np.ndarray
    order: np.ndarray


def normalize_weights(weights, names: list[str]) -> np.ndarray:
    """Validate weights (a dict by name or a sequence); return them as a float64 array summing to 1."""
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise MixtureWeightError(f"Unknown domain(s) {unknown} in `weights`; the domains are {names}.")
        values = np.array([float(weights.get(name, 0.0)) for name in names])
    else:
        values = np.asarray(list(weights), dtype=np.float64)
        if values.shape != (len(names),):
            raise MixtureWeightError(
                f"`weights` has {values.size} entries but there are {len(names)} domains {names}; pass one "
                f"weight per domain or a dict by name."
            )
    bad = [f"{name}={value}" for name, value in zip(names, values) if not np.isfinite(value) or value < 0]
    if bad:
        raise MixtureWeightError(f"Mixture weights must be finite and >= 0; got {', '.join(bad)}.")
    if values.sum() <= 0:
        raise MixtureWeightError(
            f"Mixture weights are all zero ({dict(zip(names, values))}); give some domain weight."
        )
    return values / values.sum()


class MixturePlanner:
    """Deterministic quota and sample-position planning for a mixture of domains.

    Args:
        names (list[str]): Domain names, in domain-index order.
        samples_per_epoch (np.ndarray): Samples in one epoch of each domain.
        global_batch_size (int): Samples per global batch (``batch_size * world_size``).
        weights (np.ndarray): Initial normalised weights.
        seed (int): Seed of the in-batch order.
        exhaustion (str): ``"repeat"``, ``"drop"`` or ``"stop"``; what happens when a domain has used all of
            its epochs (see ``MixtureLoader``).
        max_epochs (np.ndarray): Epochs each domain may be read (``inf`` for unlimited).
    """

    def __init__(self, *, names, samples_per_epoch, global_batch_size, weights, seed, exhaustion, max_epochs):
        if exhaustion not in EXHAUSTION_POLICIES:
            raise ConfigError(f"`exhaustion` must be one of {EXHAUSTION_POLICIES}, got {exhaustion!r}.")
        self.names = list(names)
        self.samples_per_epoch = np.asarray(samples_per_epoch, dtype=np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.exhaustion = exhaustion
        self.capacity = np.asarray(max_epochs, dtype=np.float64) * self.samples_per_epoch
        num_domains = len(self.names)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.batch_index = 0
        self.consumed = np.zeros(num_domains, dtype=np.int64)
        self.carry = np.zeros(num_domains, dtype=np.float64)
        self.active = np.ones(num_domains, dtype=bool)
        self.finished = False
        self.weight_history: list[tuple[int, list[float]]] = [(0, self.weights.tolist())]
        self.events: list[dict] = []

    # -- weights ----------------------------------------------------------------------------------

    def set_weights(self, weights: np.ndarray, *, at_batch: int | None = None) -> None:
        """Use ``weights`` (already normalised) from batch ``at_batch`` on (default: the next planned batch).

        A later ``at_batch`` schedules the change: it is kept in ``weight_history`` (so it is part of the
        state) and applied when that batch is planned. The newest call wins: changes scheduled at or after
        ``at_batch`` by earlier calls are dropped.
        """
        at_batch = self.batch_index if at_batch is None else int(at_batch)
        if at_batch < self.batch_index:
            raise StateError(
                f"Cannot schedule weights at batch {at_batch}: batch {self.batch_index} is already planned; "
                f"pass `at_batch` >= {self.batch_index}."
            )
        weights = np.asarray(weights, dtype=np.float64)
        self.weight_history = [entry for entry in self.weight_history if entry[0] < at_batch]
        self.weight_history.append((at_batch, weights.tolist()))
        self.weights = self._weights_at(self.batch_index)

    @property
    def latest_weights(self) -> np.ndarray:
        """The most recently set weights, including a change scheduled for a later batch."""
        return np.asarray(self.weight_history[-1][1], dtype=np.float64)

    def _weights_at(self, batch: int) -> np.ndarray:
        due = [weights for index, weights in self.weight_history if index <= batch]
        return np.asarray(due[-1], dtype=np.float64)

    def effective_weights(self) -> np.ndarray:
        """Current weights with exhausted domains removed and the rest renormalised."""
        weights = np.where(self.active, self.weights, 0.0)
        total = weights.sum()
        return weights / total if total > 0 else weights

    # -- planning ---------------------------------------------------------------------------------

    def plan(self) -> BatchPlan | None:
        """Plan the next global batch and advance; ``None`` once the mixture is exhausted."""
        if self.finished:
            return None
        self.weights = self._weights_at(self.batch_index)  # a scheduled change may be due
        size = self.global_batch_size
        fixed = np.zeros(len(self.names), dtype=np.int64)  # samples of domains that ran out in this batch
        while True:
            weights = self.effective_weights()
            if not self.active.any() or weights.sum() == 0:
                return self._finish("no domain with positive weight has samples left")
            quota, carry = allocate_quota(weights, self.carry, size - int(fixed.sum()))
            remaining = self.capacity - self.consumed - fixed
            short = np.flatnonzero(self.active & (quota > remaining))
            if len(short) == 0:
                break
            domain = int(short[0])
            if self.exhaustion == "stop":
                return self._finish(f"domain {self.names[domain]!r} used all of its epochs")
            fixed[domain] = int(remaining[domain])
            self.active[domain] = False
            self._event("drop", domain, "used all of its epochs; dropped, the others renormalised")
        quota = quota + fixed
        starts = self.consumed.copy()
        order = rng_for(self.seed, BATCH_ORDER, self.batch_index).permutation(size)
        plan = BatchPlan(index=self.batch_index, quota=quota, starts=starts, order=order)
        self.carry = carry
        self.consumed = self.consumed + quota
        self.batch_index += 1
        self._log_epoch_transitions(starts)
        return plan

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.events.append({"batch": self.batch_index, "event": "stop", "domain": None, "detail": reason})
        logger.info("mixture loader stops at batch %d: %s", self.batch_index, reason)
        return None

    def _event(self, kind: str, domain: int, detail: str) -> None:
        self.events.append(
            {"batch": self.batch_index, "event": kind, "domain": self.names[domain], "detail": detail}
        )
        logger.info("batch %d: domain %r %s", self.batch_index, self.names[domain], detail)

    def _log_epoch_transitions(self, starts: np.ndarray) -> None:
        before = starts // self.samples_per_epoch
        after = self.consumed // self.samples_per_epoch
        for domain in np.flatnonzero(after > before):
            self._event("epoch", int(domain), f"starts epoch {int(after[domain])} (new shuffle)")

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Flat JSON-able state: enough to continue the exact same plan."""
        return {
            "version": STATE_VERSION,
            "domains": list(self.names),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "batch_index": self.batch_index,
            "consumed": self.consumed.tolist(),
            "carry": self.carry.tolist(),
            "weights": self.weights.tolist(),
            "active": self.active.tolist(),
            "finished": self.finished,
            "weight_history": [[index, list(weights)] for index, weights in self.weight_history],
            "events": list(self.events),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; the domains and seed must match."""
        if state.get("version") != STATE_VERSION:
            raise StateError(f"Loader state version {state.get('version')!r} is not {STATE_VERSION}.")
        if list(state["domains"]) != self.names:
            raise StateError(
                f"Loader state was saved for domains {state['domains']}, but this loader has {self.names}; "
                f"build the loader with the same domains in the same order."
            )
        if int(state["seed"]) != self.seed:
            raise StateError(
                f"Loader state was saved with seed={state['seed']}, but this loader has seed={self.seed}."
            )
        self.batch_index = int(state["batch_index"])
        self.consumed = np.asarray(state["consumed"], dtype=np.int64)
        self.carry = np.asarray(state["carry"], dtype=np.float64)
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.active = np.asarray(state["active"], dtype=bool)
        self.finished = bool(state["finished"])
        self.weight_history = [(int(index), list(weights)) for index, weights in state["weight_history"]]
        self.events = list(state["events"])
