"""The mixer interface: what a mixer sees (``MixingContext``), returns (``MixtureSolution``), and ``Mixer``.

Every strategy in ``tikmix_loader.mixing`` (TiKMiX-D, TiKMiX-M, RegMix, ODM and the fixed baselines) is a
``Mixer`` subclass with a frozen ``Config`` dataclass of its options. The controller calls
``mixer.propose(context)`` at each decision point and writes the returned solution to the ledger
(``MixtureSolution.to_dict()`` has exactly the ledger's ``solver`` keys). Mixers that carry state between
decisions (ODM's reward estimates, TiKMiX-M's RNG position, RegMix's fitted mixture) expose it as a flat,
JSON-able dict with constant keys, in the style of ``torchdata.nodes``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tikmix_loader.data.planner import normalize_weights
from tikmix_loader.errors import ConfigError, DomainError, MixtureWeightError, StateError


def _frozen_array(values, dtype=np.float64) -> np.ndarray:
    array = np.array(values, dtype=dtype, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class MixtureSolution:
    """One mixer decision.

    Attributes:
        weights (np.ndarray): float64 ``[n_domains]`` on the simplex in the context's domain order; never NaN.
        status (str): ``"optimal"`` (a solver converged), ``"fallback"`` (the prior weights were kept; see
            ``reason``), ``"fixed"`` (a baseline that optimises nothing), ``"surrogate"`` (TiKMiX-M / RegMix
            chose the weights from a fitted regressor) or ``"online"`` (ODM's bandit update).
        reason (str): Human-readable why: the solver message, the degeneracy found, or what a baseline did.
        objective (float | None): The objective at ``weights`` (lower is better for TiKMiX-D); None when the
            mixer has none.
        terms (dict[str, float]): Named parts of the objective and diagnostics, e.g. ``std``, ``sum``,
            ``entropy``, ``prior_objective`` for TiKMiX-D. Values are finite floats or None.
        iterations (int): Solver iterations spent (0 for mixers without a solver).
        fallback (bool): True when the prior weights were returned because the solve could not be trusted.
    """

    weights: np.ndarray
    status: str
    reason: str = ""
    objective: float | None = None
    terms: dict = field(default_factory=dict)
    iterations: int = 0
    fallback: bool = False

    def __post_init__(self):
        weights = _frozen_array(self.weights)
        if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise MixtureWeightError(
                f"MixtureSolution `weights` must be finite, >= 0 and 1-D; got {weights}."
            )
        if not math.isclose(float(weights.sum()), 1.0, abs_tol=1e-6):
            raise MixtureWeightError(f"MixtureSolution `weights` must sum to 1, got sum {weights.sum()!r}.")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "terms", {str(k): _finite_or_none(v) for k, v in dict(self.terms).items()})
        object.__setattr__(self, "objective", _finite_or_none(self.objective))

    def weights_by_name(self, domains: Sequence[str]) -> dict[str, float]:
        """``{domain: weight}`` for the domain names in the context's order."""
        if len(domains) != len(self.weights):
            raise DomainError(
                f"{len(domains)} domain names given for {len(self.weights)} weights: {list(domains)}."
            )
        return {name: float(value) for name, value in zip(domains, self.weights, strict=True)}

    def to_dict(self) -> dict:
        """The ledger's ``solver`` record: ``status, reason, objective, terms, iterations, fallback``."""
        return {
            "status": self.status,
            "reason": self.reason,
            "objective": self.objective,
            "terms": dict(self.terms),
            "iterations": int(self.iterations),
            "fallback": bool(self.fallback),
        }


def _finite_or_none(value):
    """JSON has no NaN: a missing or non-finite number is stored as None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _optional_vector(value, name: str, num_domains: int) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        array = np.full(num_domains, float(array))
    if array.shape != (num_domains,):
        raise ConfigError(
            f"MixingContext `{name}` must have one entry per domain ({num_domains}), got {array.shape}."
        )
    return _frozen_array(array)


@dataclass(frozen=True, eq=False, kw_only=True)
class MixingContext:
    """Everything a mixer may use for one decision; fields a mixer does not need may stay None.

    Args:
        domains (tuple[str, ...]): Domain names; every per-domain array below follows this order.
        w_prior (array | dict): Current mixture (a sequence in domain order or ``{name: weight}``); validated
            and normalised to sum 1. NaN, negative, all-zero or unknown names raise ``MixtureWeightError``.
        influence (ndarray | InfluenceMatrix | None): Group Influence ``S`` ``[n_targets, n_domains]``
            (positive = helpful, docs/methods.md §3). An object with ``.values``, ``.targets`` and
            ``.domains``
            (the influence engine's ``InfluenceMatrix``) is accepted and its columns are reordered to
            ``domains``. Default: None.
        targets (tuple[str, ...]): Target names for the rows of ``influence``. Default: taken from the
            influence object, or ``target0, target1, ...``.
        domain_tokens (array | None): Tokens in each domain (natural shares for ``natural``, ``temperature``
            and RegMix). Default: None.
        domain_losses (array | None): Mean per-token training loss of each domain since the last decision
            (ODM's reward); NaN marks a domain not seen. Default: None.
        available_tokens (array | None): Tokens each domain can still supply per epoch (availability caps).
            Default: None (no caps).
        remaining_tokens (float | None): Training tokens still to be consumed. Default: None.
        max_epochs (float | array | None): Epochs allowed per domain for the caps. Default: None (1 epoch
            when caps are active).
        step (int): Training step of the decision. Default: 0.
        tokens_seen (int): Training tokens consumed so far. Default: 0.
    """

    domains: tuple
    w_prior: Any
    influence: Any = None
    targets: tuple = ()
    domain_tokens: Any = None
    domain_losses: Any = None
    available_tokens: Any = None
    remaining_tokens: float | None = None
    max_epochs: Any = None
    step: int = 0
    tokens_seen: int = 0

    def __post_init__(self):
        domains = tuple(self.domains)
        if (
            not domains
            or len(set(domains)) != len(domains)
            or not all(isinstance(d, str) and d for d in domains)
        ):
            raise DomainError(f"MixingContext `domains` must be unique non-empty names, got {list(domains)}.")
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("domains", domains)
        set_("w_prior", _frozen_array(normalize_weights(self.w_prior, list(domains))))
        if self.influence is not None:
            values, targets = self._influence_in_domain_order()
            set_("influence", _frozen_array(values))
            set_("targets", targets)
        for name in ("domain_tokens", "domain_losses", "available_tokens", "max_epochs"):
            set_(name, _optional_vector(getattr(self, name), name, len(domains)))
        if self.domain_tokens is not None and (
            np.any(~np.isfinite(self.domain_tokens)) or np.any(self.domain_tokens < 0)
        ):
            raise ConfigError(
                f"MixingContext `domain_tokens` must be finite and >= 0, got {self.domain_tokens}."
            )

    def _influence_in_domain_order(self) -> tuple[np.ndarray, tuple]:
        matrix = self.influence
        if hasattr(matrix, "values") and hasattr(matrix, "domains"):
            values = np.asarray(matrix.values, dtype=np.float64)
            source_domains = list(matrix.domains)
            missing = sorted(set(self.domains) - set(source_domains))
            if missing or len(source_domains) != len(self.domains):
                raise DomainError(
                    f"Influence matrix domains {source_domains} do not match the context's domains "
                    f"{list(self.domains)} (missing {missing}); observe every domain of the mixture."
                )
            values = values[:, [source_domains.index(name) for name in self.domains]]
            targets = tuple(self.targets) or tuple(getattr(matrix, "targets", ()))
        else:
            values = np.asarray(matrix, dtype=np.float64)
            targets = tuple(self.targets)
        if values.ndim != 2 or values.shape[1] != len(self.domains) or values.shape[0] == 0:
            raise ConfigError(
                f"MixingContext `influence` must be [n_targets >= 1, n_domains={len(self.domains)}], "
                f"got shape {values.shape}."
            )
        targets = targets or tuple(f"target{i}" for i in range(values.shape[0]))
        if len(targets) != values.shape[0]:
            raise ConfigError(
                f"{len(targets)} target names {list(targets)} for {values.shape[0]} influence rows."
            )
        return values, targets

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def require(self, *names: str, mixer: str) -> None:
        """Raise ``ConfigError`` naming the mixer and the fields it needs that are None."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ConfigError(
                f"Mixer {mixer!r} needs MixingContext field(s) {missing}; pass them to the context."
            )


@dataclass(frozen=True)
class MixerConfig:
    """Base of every mixer's frozen options dataclass; subclasses add fields with ``help`` metadata."""

    def to_dict(self) -> dict:
        """JSON-able options (tuples become lists), saved with checkpoints and ledgers."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def option(default, help: str, **kwargs):
    """A dataclass field with a default and a one-line ``help`` (shown in docs and error messages)."""
    return field(default=default, metadata={"help": help}, **kwargs)


class Mixer(abc.ABC):
    """Base of every mixing strategy.

    Subclasses set ``name`` (the registry key), ``Config`` (a frozen ``MixerConfig`` subclass) and implement
    ``propose``. Stateful subclasses list their state keys in ``STATE_KEYS`` and implement ``_get_state`` /
    ``_set_state``; the base adds the mixer name and config to the state and checks both on load, so a
    resume with other options fails and names the changed ones.

    Args:
        **options: Fields of ``Config``. Unknown names raise ``ConfigError`` listing the valid ones.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MixerConfig]] = MixerConfig
    STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        valid = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"Mixer {self.name!r} has no option(s) {unknown}; valid options are {valid}.")
        self.config = self.Config(**options)

    @abc.abstractmethod
    def propose(self, context: MixingContext) -> MixtureSolution:
        """Return the mixture to use from now on, given what the controller knows at this decision."""

    def state_dict(self) -> dict:
        """Flat JSON-able state: ``mixer``, ``config`` and the subclass's ``STATE_KEYS``."""
        state = {"mixer": self.name, "config": self.config.to_dict()}
        own = self._get_state()
        if set(own) != set(self.STATE_KEYS):
            raise StateError(
                f"Mixer {self.name!r} produced state keys {sorted(own)}, expected {self.STATE_KEYS}."
            )
        state.update(own)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()`` output; other keys, mixer or options raise ``StateError``."""
        expected = {"mixer", "config", *self.STATE_KEYS}
        if set(state) != expected:
            raise StateError(
                f"Mixer {self.name!r} state has keys {sorted(state)}, expected {sorted(expected)}; "
                "was it saved by another mixer or version?"
            )
        if state["mixer"] != self.name:
            raise StateError(f"State was saved by mixer {state['mixer']!r}, not {self.name!r}.")
        ours = self.config.to_dict()
        changed = sorted(k for k in set(ours) | set(state["config"]) if ours.get(k) != state["config"].get(k))
        if changed:
            diff = {k: (state["config"].get(k), ours.get(k)) for k in changed}
            raise StateError(
                f"Mixer {self.name!r} was saved with other options {diff} (saved, current); resume with the "
                "saved options or start a new run."
            )
        self._set_state({key: state[key] for key in self.STATE_KEYS})

    def _get_state(self) -> dict:
        return {}

    def _set_state(self, state: dict) -> None:
        """Stateless mixers have nothing to restore (``state`` is empty: ``STATE_KEYS`` is)."""
        return None
