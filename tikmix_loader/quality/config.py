"""``QualityConfig``: which quality criteria a loader samples by and each domain's QuaDMix parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tikmix_loader.errors import ScoreError
from tikmix_loader.quality.sampler import ORIENTATIONS, QualityParams, criteria_from
from tikmix_loader.quality.scores import check_criterion_name


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Quality sampling for a ``MixtureLoader`` (see ``docs/quadmix.md``).

    Args:
        criteria (Sequence[str] | Mapping[str, str]): Criterion names (all ``"lower"`` is better) or a
            name -> ``"lower"``/``"higher"`` mapping; ``QualityParams.alpha`` follows this order.
        params (Mapping[str, QualityParams | dict]): Parameters per domain name; a domain not named takes
            every document once per epoch. Default: none.
    """

    criteria: Mapping[str, str]
    params: Mapping[str, QualityParams] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.criteria, (Sequence, Mapping)) or isinstance(self.criteria, str):
            raise ScoreError(
                f"QualityConfig: `criteria` must be a list or a dict of names, got {self.criteria!r}."
            )
        criteria = criteria_from(self.criteria)
        if not criteria:
            raise ScoreError("QualityConfig: `criteria` is empty; name at least one quality criterion.")
        for name, orientation in criteria.items():
            check_criterion_name(name)
            if orientation not in ORIENTATIONS:
                raise ScoreError(
                    f"QualityConfig: criterion {name!r} orientation must be one of {ORIENTATIONS}, got "
                    f"{orientation!r}."
                )
        if not isinstance(self.params, Mapping):
            raise ScoreError(f"QualityConfig: `params` must be a dict by domain name, got {self.params!r}.")
        object.__setattr__(self, "criteria", criteria)
        object.__setattr__(
            self, "params", {name: self.checked_params(name, value) for name, value in self.params.items()}
        )

    def checked_params(self, domain: str, params: QualityParams | Mapping | None) -> QualityParams | None:
        """``params`` of ``domain`` as ``QualityParams`` (``None`` stays ``None``: every document once),
        with one ``alpha`` weight per criterion."""
        if params is None:
            return None
        if isinstance(params, Mapping):
            params = QualityParams.from_dict(params)
        if not isinstance(params, QualityParams):
            raise ScoreError(f"Domain {domain!r}: quality parameters must be QualityParams, got {params!r}.")
        if len(params.alpha) != len(self.criteria):
            raise ScoreError(
                f"Domain {domain!r}: `alpha` has {len(params.alpha)} weights but there are "
                f"{len(self.criteria)} criteria {list(self.criteria)}."
            )
        return params

    def to_dict(self) -> dict:
        """JSON-able form (recorded in the loader state, which refuses another configuration)."""
        return {
            "criteria": dict(self.criteria),
            "params": {
                name: None if params is None else params.to_dict()
                for name, params in sorted(self.params.items())
            },
        }
