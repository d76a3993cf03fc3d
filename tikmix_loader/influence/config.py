"""``InfluenceConfig``: the frozen, validated settings of a ``GroupInfluence`` engine."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

from tikmix_loader.errors import ConfigError, StateError

PRECONDITIONER_NAMES = ("adam", "ekfac", "identity", "kfac")


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class InfluenceConfig:
    """Settings of a ``GroupInfluence`` engine (saved with its state so a resume under other settings fails).

    Args:
        k (int | tuple[int, int] | None): Projection width: one int for both sides, a ``(k_in, k_out)`` pair,
            or None for no projection (exact gradients; for tests and small models). A side whose k is at
            least the layer's width is not projected (the identity is exact and no wider). Default: 64.
        preconditioner (str): ``"identity"``, ``"kfac"``, ``"ekfac"`` or ``"adam"`` (the training optimizer's
            step sizes; the engine needs the optimizer) (docs/methods.md §3). Default: ``"kfac"``.
        damping (float): Damping relative to the unprojected layer's mean eigenvalue: K-FAC adds ``damping *
            trace(A) / d_in`` to A and ``damping * trace(B) / d_out`` to B; EK-FAC adds ``damping *
            sum(Lambda) / (d_out d_in)`` to Lambda (traces survive projection, so the shift is the same for
            every k). Default: 0.1.
        layers (tuple[str, ...] | None): fnmatch patterns over module names selecting the tracked
            layers (``nn.Linear`` or HF ``Conv1D``); None tracks every one the task lists. Default: None.
        exclude (tuple[str, ...]): fnmatch patterns of layers to drop from the selection. Default: ().
        seed (int): Seed of the random projections. Default: 0.
        backend (str): Kernel backend passed to ``tikmix_loader.ops`` (``"auto"``, ``"torch"``, ...).
            Default: ``"auto"``.
        half_life (float | None): Online mode: the EMA half-life in ``observe`` steps; None keeps a plain
            running sum (every step weighs the same). Default: None.
    """

    k: int | tuple[int, int] | None = field(
        default=64, metadata={"help": "projection width, (k_in, k_out) or None"}
    )
    preconditioner: str = field(default="kfac", metadata={"help": "identity, kfac, ekfac or adam"})
    damping: float = field(
        default=0.1, metadata={"help": "damping relative to the unprojected mean eigenvalue"}
    )
    layers: tuple[str, ...] | None = field(
        default=None, metadata={"help": "fnmatch patterns of tracked layers"}
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "fnmatch patterns of layers to skip"})
    seed: int = field(default=0, metadata={"help": "seed of the random projections"})
    backend: str = field(default="auto", metadata={"help": "kernel backend (auto, torch, cpu, triton, cuda)"})
    half_life: float | None = field(
        default=None, metadata={"help": "online EMA half-life in steps; None = sum"}
    )

    def __post_init__(self):
        k = self.k
        if isinstance(k, list):
            object.__setattr__(self, "k", k := tuple(k))
        if not (
            k is None
            or _positive_int(k)
            or (isinstance(k, tuple) and len(k) == 2 and all(map(_positive_int, k)))
        ):
            raise ConfigError(
                "InfluenceConfig: `k` must be a positive int, a (k_in, k_out) pair of positive ints or None, "
                f"got {k!r}"
            )
        if self.preconditioner not in PRECONDITIONER_NAMES:
            raise ConfigError(
                f"InfluenceConfig: unknown `preconditioner` {self.preconditioner!r}; "
                f"valid: {list(PRECONDITIONER_NAMES)}"
            )
        damping = self.damping
        if not isinstance(damping, numbers.Real) or isinstance(damping, bool) or not 0 < damping < math.inf:
            raise ConfigError(f"InfluenceConfig: `damping` must be a finite float > 0, got {damping!r}")
        for name in ("layers", "exclude"):
            value = getattr(self, name)
            if value is None and name == "layers":
                continue
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            if not all(isinstance(pattern, str) and pattern for pattern in value):
                raise ConfigError(
                    f"InfluenceConfig: `{name}` must hold non-empty name patterns, got {value!r}"
                )
            object.__setattr__(self, name, value)
        if self.layers == ():
            raise ConfigError("InfluenceConfig: `layers` is empty; pass None to track every trackable layer")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ConfigError(f"InfluenceConfig: `seed` must be an int, got {self.seed!r}")
        if not isinstance(self.backend, str):
            raise ConfigError(f"InfluenceConfig: `backend` must be a string, got {self.backend!r}")
        half_life = self.half_life
        if half_life is not None and (
            not isinstance(half_life, numbers.Real)
            or isinstance(half_life, bool)
            or not 0 < half_life < math.inf
        ):
            raise ConfigError(
                "InfluenceConfig: `half_life` must be a finite number of steps > 0 or None, "
                f"got {half_life!r}"
            )

    @property
    def k_pair(self) -> tuple[int | None, int | None]:
        """``(k_in, k_out)``; ``(None, None)`` when nothing is projected."""
        if self.k is None:
            return None, None
        return (self.k, self.k) if isinstance(self.k, numbers.Integral) else tuple(self.k)

    @property
    def decay(self) -> float:
        """Per-step EMA factor ``0.5 ** (1 / half_life)`` (1.0 without a half-life)."""
        return 1.0 if self.half_life is None else 0.5 ** (1.0 / self.half_life)

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (tuples become lists)."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            out[item.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> InfluenceConfig:
        """Inverse of ``to_dict``."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def check_same(self, other: dict, *, what: str) -> None:
        """Raise ``StateError`` naming every field where the saved settings ``other`` differ from these.

        Args:
            other (dict): ``to_dict()`` of the saved settings.
            what (str): What is being loaded, for the message.
        """
        mine = self.to_dict()
        changed = {key: (other.get(key), mine[key]) for key in mine if other.get(key) != mine[key]}
        if changed:
            details = ", ".join(
                f"{key}: saved {old!r} != current {new!r}" for key, (old, new) in changed.items()
            )
            raise StateError(
                f"{what}: the state was saved under other InfluenceConfig settings ({details}); "
                "build the engine with the saved settings or start a fresh state"
            )
