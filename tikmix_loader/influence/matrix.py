"""``InfluenceMatrix``: Group Influence of every domain on every target, with its names and token counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tikmix_loader.errors import ConfigError, DomainError


@dataclass(frozen=True)
class InfluenceMatrix:
    """``values[b, d] = psi_b^T H^-1 phi_d``: the effect of domain d on target b; positive means helpful.

    ``phi_d`` is the gradient of domain d's mean per-token loss and ``psi_b`` that of target b's mean loss
    (docs/methods.md §3), both over the tracked layers' weights (projected unless ``k`` is None).

    Args:
        values (np.ndarray): float64 [n_targets, n_domains].
        targets (tuple[str, ...]): Target names, in row order.
        domains (tuple[str, ...]): Domain names, in column order.
        domain_tokens (np.ndarray): float64 [n_domains] loss tokens behind each ``phi_d`` (EMA-weighted in
            online mode, so possibly fractional).
        target_tokens (np.ndarray): float64 [n_targets] loss tokens behind each ``psi_b``.
        processed_tokens (int): Tokens (padding included) that went through extra forward and backward
            passes to make this matrix; multiply by the model's training FLOPs per token to count the
            decision's compute. Online mode's domain statistics come from training passes and add nothing.
        preconditioner (str): The preconditioner used. Default: ``"kfac"``.
        k (tuple[int, int] | None): ``(k_in, k_out)``, or None when nothing was projected. Default: None.
    """

    values: np.ndarray
    targets: tuple[str, ...]
    domains: tuple[str, ...]
    domain_tokens: np.ndarray
    target_tokens: np.ndarray
    processed_tokens: int = 0
    preconditioner: str = "kfac"
    k: tuple[int, int] | None = field(default=None)

    def __post_init__(self):
        values = np.asarray(self.values, dtype=np.float64)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "domain_tokens", np.asarray(self.domain_tokens, dtype=np.float64))
        object.__setattr__(self, "target_tokens", np.asarray(self.target_tokens, dtype=np.float64))
        expected = (len(self.targets), len(self.domains))
        if values.shape != expected:
            raise ConfigError(
                f"InfluenceMatrix: `values` has shape {values.shape} but there are {expected[0]} targets and "
                f"{expected[1]} domains; expected {expected}"
            )
        if self.domain_tokens.shape != (expected[1],) or self.target_tokens.shape != (expected[0],):
            raise ConfigError(
                f"InfluenceMatrix: token counts have shapes {self.domain_tokens.shape} (domains) and "
                f"{self.target_tokens.shape} (targets); expected ({expected[1]},) and ({expected[0]},)"
            )

    def value(self, target: str, domain: str) -> float:
        """``S[target, domain]`` by name.

        Raises:
            DomainError: an unknown target or domain name; the message lists the known ones.
        """
        if target not in self.targets:
            raise DomainError(
                f"InfluenceMatrix: unknown target {target!r}; known targets: {list(self.targets)}"
            )
        if domain not in self.domains:
            raise DomainError(
                f"InfluenceMatrix: unknown domain {domain!r}; known domains: {list(self.domains)}"
            )
        return float(self.values[self.targets.index(target), self.domains.index(domain)])

    def to_dict(self) -> dict:
        """A JSON-able dict (for the mixture ledger)."""
        return {
            "values": self.values.tolist(),
            "targets": list(self.targets),
            "domains": list(self.domains),
            "domain_tokens": self.domain_tokens.tolist(),
            "target_tokens": self.target_tokens.tolist(),
            "processed_tokens": int(self.processed_tokens),
            "preconditioner": self.preconditioner,
            "k": None if self.k is None else list(self.k),
        }

    @classmethod
    def from_dict(cls, data: dict) -> InfluenceMatrix:
        """Inverse of ``to_dict``."""
        k = data.get("k")
        return cls(
            values=np.asarray(data["values"], dtype=np.float64).reshape(
                len(data["targets"]), len(data["domains"])
            ),
            targets=tuple(data["targets"]),
            domains=tuple(data["domains"]),
            domain_tokens=np.asarray(data["domain_tokens"], dtype=np.float64),
            target_tokens=np.asarray(data["target_tokens"], dtype=np.float64),
            processed_tokens=int(data.get("processed_tokens", 0)),
            preconditioner=data.get("preconditioner", "kfac"),
            k=None if k is None else tuple(k),
        )
