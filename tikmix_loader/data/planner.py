"""``MixturePlanner``: which samples of which domain make up each global batch, as a pure state machine.

The planner never touches data. From the current weights it computes each global batch's per-domain
quotas (``quota.allocate_quota``), the positions of those samples in every domain's endless stream
(``stream.DomainStream``), and a seeded order that mixes them across the batch before ranks take their
slices. Exhaustion is decided here too, from counts alone, so every rank and every DataLoader worker that
replays the same weight history plans exactly the same batches.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from tikmix_loader.data.quota import allocate_quota
from tikmix_loader.data.shuffle import BATCH_ORDER, keyed_permutation
from tikmix_loader.errors import ConfigError, MixtureWeightError, ScoreError, StateError
from tikmix_loader.quality.sampler import QualityParams

logger = logging.getLogger(__name__)

EXHAUSTION_POLICIES = ("repeat", "drop", "stop")
STATE_VERSION = 2  # 2 adds the settings (seq_len, block_docs, ...); version 1 states still load
LEGACY_STATE_VERSION = 1  # states without the settings: loaded with a warning that they went unchecked


@dataclass(frozen=True)
class BatchPlan:
    """One global batch: ``quota[d]`` samples of domain ``d`` starting at stream index ``starts[d]``.

    The batch is the concatenation of the domains' samples in domain order, permuted by ``order``:
    position ``i`` of the global batch is concatenated sample ``order[i]``. ``segments`` (under quality
    sampling) are the domains' quality segments the plan was made under (see ``DomainStream``), so that a
    DataLoader worker process reading the plan reads the same samples.
    """

    index: int
    quota: np.ndarray
    starts: np.ndarray
    order: np.ndarray
    segments: tuple | None = None

    def samples(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain and stream index of the samples at global-batch positions ``start .. stop-1``.

        Returns ``(domains, indices)``, int64 arrays in position order: position ``start + i`` holds sample
        ``indices[i]`` of domain ``domains[i]``'s stream. Ranks call this with their slice and read only
        those samples.
        """
        concatenated = self.order[start:stop]
        offsets = np.concatenate(([0], np.cumsum(self.quota)))
        domains = np.searchsorted(offsets, concatenated, side="right") - 1
        return domains, self.starts[domains] + concatenated - offsets[domains]


MISSING_POLICIES = ("error", "zero")


def normalize_weights(weights, names: list[str], *, missing: str = "zero") -> np.ndarray:
    """Validate weights (a dict by name or a sequence); return them as a float64 array summing to 1.

    Args:
        weights (Mapping[str, float] | Sequence[float]): One weight per domain, by name or in domain order.
        names (list[str]): The domain names, in domain order.
        missing (str): What a dict that leaves out domains means: ``"error"`` (raise
            ``MixtureWeightError`` naming them) or ``"zero"`` (they get weight 0). Default: ``"zero"``, what
            mixer configs and priors document; ``MixtureLoader`` passes ``"error"`` unless told otherwise.
    """
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"`missing` must be one of {MISSING_POLICIES}, got {missing!r}.")
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise MixtureWeightError(f"Unknown domain(s) {unknown} in `weights`; the domains are {names}.")
        absent = [name for name in names if name not in weights]
        if absent and missing == "error":
            raise MixtureWeightError(
                f"`weights` gives no weight for domain(s) {absent}; give every domain a weight, or pass "
                f'`missing="zero"` to give them 0.'
            )
        raw = [weights.get(name, 0.0) for name in names]
    elif (
        isinstance(weights, (str, bytes))
        or not isinstance(weights, Iterable)
        or getattr(weights, "ndim", None) == 0  # a 0-d numpy array or torch tensor: iterable by type only
    ):
        raise MixtureWeightError(
            f"`weights` must be a dict by domain name or one number per domain {names}, got {weights!r}."
        )
    else:
        raw = list(weights)
        if len(raw) != len(names):
            raise MixtureWeightError(
                f"`weights` has {len(raw)} entries but there are {len(names)} domains {names}; pass one "
                f"weight per domain or a dict by name."
            )
    values = np.array([_as_weight(name, value) for name, value in zip(names, raw)], dtype=np.float64)
    bad = [f"{name}={value}" for name, value in zip(names, values) if not np.isfinite(value) or value < 0]
    if bad:
        raise MixtureWeightError(f"Mixture weights must be finite and >= 0; got {', '.join(bad)}.")
    if values.sum() <= 0:
        raise MixtureWeightError(
            f"Mixture weights are all zero ({dict(zip(names, values.tolist()))}); give some domain weight."
        )
    return values / values.sum()


def _as_weight(name: str, value) -> float:
    """``value`` as a float, or a ``MixtureWeightError`` naming the domain (no silent ``True`` -> 1.0)."""
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise MixtureWeightError(f"Mixture weight of domain {name!r} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise MixtureWeightError(
            f"Mixture weight of domain {name!r} must be a number, got {value!r} ({error})."
        ) from None


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
        settings (dict, optional): Further JSON-able settings the sample positions depend on (the loader
            passes ``seq_len``, ``block_docs``, ``shuffle_window`` and each domain's mode and token ids).
            They are saved in the state with ``domains``, ``seed`` and ``global_batch_size``, and a state
            saved under other values is refused. Default: ``None``.
    """

    def __init__(
        self,
        *,
        names,
        samples_per_epoch,
        global_batch_size,
        weights,
        seed,
        exhaustion,
        max_epochs,
        settings=None,
        quality_segments=None,
    ):
        if exhaustion not in EXHAUSTION_POLICIES:
            raise ConfigError(f"`exhaustion` must be one of {EXHAUSTION_POLICIES}, got {exhaustion!r}.")
        self.names = list(names)
        self.samples_per_epoch = np.asarray(samples_per_epoch, dtype=np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.exhaustion = exhaustion
        self.max_epochs = np.asarray(max_epochs, dtype=np.float64)
        self.capacity = self.max_epochs * self.samples_per_epoch
        self.settings = {
            "domains": list(self.names),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            **(settings or {}),
        }
        self._logs = True
        num_domains = len(self.names)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.batch_index = 0
        self.consumed = np.zeros(num_domains, dtype=np.int64)
        self.carry = np.zeros(num_domains, dtype=np.float64)
        self.active = np.ones(num_domains, dtype=bool)
        self.finished = False
        self.weight_history: list[tuple[int, list[float]]] = [(0, self.weights.tolist())]
        self.events: list[dict] = []
        self.quality_segments = None if quality_segments is None else tuple(map(tuple, quality_segments))

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

    def set_quality_segment(self, domain: int, start: int, epoch: int, params: QualityParams | None) -> None:
        """Read ``domain`` from stream index ``start`` (not yet planned) on as epochs ``epoch``,
        ``epoch + 1``, ... under ``params``; segments from ``start`` on set by earlier calls are dropped."""
        if start < self.consumed[domain]:
            raise StateError(
                f"Cannot change the quality of domain {self.names[domain]!r} at sample {start}: samples up "
                f"to {int(self.consumed[domain])} are already planned."
            )
        segments = list(self.quality_segments)
        kept = tuple(segment for segment in segments[domain] if segment[0] < start)
        segments[domain] = (*kept, (int(start), int(epoch), params))
        self.quality_segments = tuple(segments)

    def set_capacity(self, capacity) -> None:
        """Samples each domain may supply in all, for epochs of varying size (quality sampling): where its
        epoch ``max_epochs`` would start."""
        self.capacity = np.asarray(capacity, dtype=np.float64)

    @property
    def latest_weights(self) -> np.ndarray:
        """The most recently set weights, including a change scheduled for a later batch."""
        return np.asarray(self.weight_history[-1][1], dtype=np.float64)

    def _weights_at(self, batch: int) -> np.ndarray:
        # The last entry due, searched from the end: the history grows with every weight change and the
        # answer is almost always its last or second-to-last entry, so planning stays O(1) per batch.
        due = next(weights for index, weights in reversed(self.weight_history) if index <= batch)
        return np.asarray(due, dtype=np.float64)

    def effective_weights(self) -> np.ndarray:
        """Current weights with exhausted domains removed and the rest renormalised."""
        weights = np.where(self.active, self.weights, 0.0)
        total = weights.sum()
        return weights / total if total > 0 else weights

    def fork(self) -> MixturePlanner:
        """A silent copy at the same position, for planning ahead without moving this planner.

        It plans exactly the batches this planner will plan under the same weights; it logs nothing and
        records no events.
        """
        fork = copy.copy(self)
        fork.active = self.active.copy()
        fork.events = []
        fork._logs = False
        return fork

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
            if not weights.any():  # no active domain, or none with weight (weights are >= 0)
                return self._finish("no domain with positive weight has samples left")
            quota, carry = allocate_quota(weights, self.carry, size - int(fixed.sum()))
            remaining = self.capacity - self.consumed - fixed
            short = self.active & (quota > remaining)
            if not short.any():
                break
            domain = int(np.flatnonzero(short)[0])
            if self.exhaustion == "stop":
                return self._finish(f"domain {self.names[domain]!r} used all of its epochs")
            fixed[domain] = int(remaining[domain])
            self.active[domain] = False
            self._event("drop", domain, "used all of its epochs; dropped, the others renormalised")
        quota = quota + fixed
        starts = self.consumed.copy()
        order = keyed_permutation(self.seed, BATCH_ORDER, self.batch_index, n=size)
        plan = BatchPlan(
            index=self.batch_index, quota=quota, starts=starts, order=order, segments=self.quality_segments
        )
        self.carry = carry
        self.consumed = self.consumed + quota
        self.batch_index += 1
        self._log_epoch_transitions(starts)
        return plan

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.events.append({"batch": self.batch_index, "event": "stop", "domain": None, "detail": reason})
        if self._logs:
            logger.info("mixture loader stops at batch %d: %s", self.batch_index, reason)
        return None

    def _event(self, kind: str, domain: int, detail: str, batch: int | None = None) -> None:
        batch = self.batch_index if batch is None else batch
        self.events.append({"batch": batch, "event": kind, "domain": self.names[domain], "detail": detail})
        if self._logs:
            logger.info("batch %d: domain %r %s", batch, self.names[domain], detail)

    def _log_epoch_transitions(self, starts: np.ndarray) -> None:
        """Record each domain whose next epoch begins in the batch just planned (``batch_index - 1``) or,
        when that batch ended exactly on the epoch's end, in the next one. A domain that reached its
        capacity (its last epoch, or dropped) starts none."""
        # Python ints: called for every planned batch, on a few domains.
        sizes, capacities = self.samples_per_epoch.tolist(), self.capacity.tolist()
        ends = self.consumed.tolist()
        for domain, (start, end, size, capacity) in enumerate(zip(starts.tolist(), ends, sizes, capacities)):
            segments = None if self.quality_segments is None else self.quality_segments[domain]
            if segments is not None and (len(segments) > 1 or segments[0][2] is not None):
                continue  # quality-sampled epochs vary in size: no epoch events
            epoch = end // size
            if epoch > start // size and end < capacity:
                first_sample = epoch * size
                batch = self.batch_index - 1 if first_sample < end else self.batch_index
                self._event("epoch", domain, f"starts epoch {epoch} (new shuffle)", batch)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Flat JSON-able state: the settings it was taken under and enough to continue the same plan."""
        return {
            "version": STATE_VERSION,
            **self.settings,
            "batch_index": self.batch_index,
            "consumed": self.consumed.tolist(),
            "carry": self.carry.tolist(),
            "weights": self.weights.tolist(),
            "active": self.active.tolist(),
            "finished": self.finished,
            "weight_history": [[index, list(weights)] for index, weights in self.weight_history],
            "events": list(self.events),
            **({} if self.quality_segments is None else {"quality_segments": self._segments_state()}),
        }

    def _segments_state(self) -> list:
        return [
            [
                [start, epoch, None if params is None else params.to_dict()]
                for start, epoch, params in segments
            ]
            for segments in self.quality_segments
        ]

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output after checking its form and that it was saved under these settings.

        Raises:
            StateError: The state is not a dict, misses a key, holds a value of the wrong type or length, or
                was saved under other settings (every changed setting is named with both values). Nothing is
                changed then.
        """
        if not isinstance(state, Mapping):
            raise StateError(
                f"Loader state must be a dict (from `state_dict()`), got {type(state).__name__}."
            )
        version = state.get("version")
        if version not in (LEGACY_STATE_VERSION, STATE_VERSION):
            raise StateError(
                f"Loader state version {version!r} is not {STATE_VERSION}; it was not written by this loader."
            )
        num_domains = len(self.names)
        domains = _checked(state, "domains", "names", num_domains)
        if list(domains) != self.names:
            raise StateError(
                f"Loader state was saved for domains {domains}, but this loader has {self.names}; build the "
                f"loader with the same domains in the same order."
            )
        values = {key: _checked(state, key, kind, num_domains) for key, kind in _STATE_FORM.items()}
        segments = self._checked_segments(state)
        self._check_settings(state, version)
        self.batch_index = values["batch_index"]
        self.consumed = np.asarray(values["consumed"], dtype=np.int64)
        self.carry = np.asarray(values["carry"], dtype=np.float64)
        self.weights = np.asarray(values["weights"], dtype=np.float64)
        self.active = np.asarray(values["active"], dtype=bool)
        self.finished = values["finished"]
        self.weight_history = [(int(index), list(weights)) for index, weights in values["weight_history"]]
        self.events = list(values["events"])
        self.quality_segments = segments

    def _checked_segments(self, state: Mapping) -> tuple | None:
        """The state's quality segments as tuples of ``(start, epoch, QualityParams | None)`` per domain."""
        if self.quality_segments is None:
            if "quality_segments" in state:
                raise StateError(
                    "Loader state `quality_segments` was saved with quality sampling on, but this loader has "
                    "no `quality=`; build it with the saved quality configuration to resume."
                )
            return None
        if "quality_segments" not in state:
            raise StateError(
                "Loader state has no `quality_segments`: it was saved without quality sampling, but this "
                "loader has `quality=`; build it without quality to resume."
            )
        value = state["quality_segments"]
        try:
            if not isinstance(value, (list, tuple)) or len(value) != len(self.names):
                raise ValueError(f"expected one list per domain ({len(self.names)})")
            segments = tuple(
                tuple(
                    (
                        _index(start),
                        _index(epoch),
                        None if params is None else QualityParams.from_dict(params),
                    )
                    for start, epoch, params in domain
                )
                for domain in value
            )
            for domain in segments:
                starts = [start for start, _, _ in domain]
                if not domain or domain[0][:2] != (0, 0) or starts != sorted(set(starts)):
                    raise ValueError("each domain's segments must start at (0, 0) with increasing starts")
        except (ValueError, TypeError, ScoreError) as error:
            shown = repr(value)
            raise StateError(
                f"Loader state key 'quality_segments' must hold, per domain, [start, epoch, params] "
                f"segments; got {shown if len(shown) <= 80 else shown[:77] + '...'} ({error}); the state is "
                f"corrupt or was edited."
            ) from None
        return segments

    def _check_settings(self, state: Mapping, version: int) -> None:
        unchecked = [key for key in self.settings if key not in state]
        if version == STATE_VERSION and unchecked:
            raise StateError(
                f"Loader state is missing key(s) {unchecked}; it is truncated or was edited. Save it again "
                f"with `state_dict()`."
            )
        if unchecked:  # a version-1 state predates these settings: load it, but say what went unchecked
            logger.warning(
                "loader state version %d does not record %s; assuming they equal this loader's (%s)",
                LEGACY_STATE_VERSION,
                unchecked,
                {key: self.settings[key] for key in unchecked},
            )
        changed = [
            f"{key}={state[key]!r} in the state but {key}={value!r} in this loader"
            for key, value in self.settings.items()
            if key in state and key != "domains" and _jsonable(state[key]) != _jsonable(value)
        ]
        if changed:
            raise StateError(
                "Loader state was saved under other settings, so its cursors would point at other samples "
                f"(duplicating some and skipping others): {'; '.join(changed)}. Build the loader with the "
                "saved values to resume, or start the data stream afresh without this state."
            )


# The form of every key a state must hold besides "domains" (a list of names): "int" (>= 0), "bool",
# "domain_ints", "domain_floats", "domain_bools" (one value per domain), "history" ([[batch, weights], ...])
# or "events" (a list of dicts).
_STATE_FORM = {
    "batch_index": "int",
    "consumed": "domain_ints",
    "carry": "domain_floats",
    "weights": "domain_floats",
    "active": "domain_bools",
    "finished": "bool",
    "weight_history": "history",
    "events": "events",
}


def _checked(state: Mapping, key: str, kind: str, num_domains: int):
    """``state[key]`` if it has the form ``kind``; otherwise a ``StateError`` naming the key and the value."""
    if key not in state:
        raise StateError(
            f"Loader state is missing key {key!r}; it is truncated or was edited. Save it again with "
            f"`state_dict()`."
        )
    value = state[key]
    if not _has_form(value, kind, num_domains):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise StateError(
            f"Loader state key {key!r} must be {_FORM_HELP[kind].format(n=num_domains)}, got {shown}; the "
            f"state is corrupt or was edited."
        )
    return value


def _index(value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{value!r} is not an int >= 0")
    return int(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and bool(np.isfinite(value))


def _is_vector(value, num_domains: int, check) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == num_domains and all(map(check, value))


def _has_form(value, kind: str, num_domains: int) -> bool:
    if kind == "int":
        return _is_int(value) and value >= 0
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "names":
        return isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value)
    if kind == "domain_ints":
        return _is_vector(value, num_domains, lambda item: _is_int(item) and item >= 0)
    if kind == "domain_floats":
        return _is_vector(value, num_domains, _is_number)
    if kind == "domain_bools":
        return _is_vector(value, num_domains, lambda item: isinstance(item, bool))
    if kind == "history":
        return isinstance(value, (list, tuple)) and all(
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and _is_int(entry[0])
            and _is_vector(entry[1], num_domains, _is_number)
            for entry in value
        )
    return isinstance(value, (list, tuple)) and all(isinstance(event, Mapping) for event in value)


_FORM_HELP = {
    "int": "an int >= 0",
    "bool": "true or false",
    "names": "a list of domain names",
    "domain_ints": "a list of {n} ints >= 0 (one per domain)",
    "domain_floats": "a list of {n} finite numbers (one per domain)",
    "domain_bools": "a list of {n} booleans (one per domain)",
    "history": "a list of [batch, weights] pairs with {n} finite weights each",
    "events": "a list of event dicts",
}


def _jsonable(value):
    """``value`` as JSON gives it back (tuples become lists), so saved and live settings compare equal."""
    return json.loads(json.dumps(value))
