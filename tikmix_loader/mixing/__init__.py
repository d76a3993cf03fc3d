"""Mixture strategies behind one interface, picked by name with :func:`get_mixer`.

Every strategy is a :class:`Mixer` whose ``propose(MixingContext) -> MixtureSolution`` returns the next
weights. The registry keys are the names the ledger records as ``method``.
"""

from tikmix_loader.errors import ConfigError
from tikmix_loader.mixing._surrogate import Surrogate, fit_lightgbm, fit_ridge
from tikmix_loader.mixing.base import Mixer, MixerConfig, MixingContext, MixtureSolution
from tikmix_loader.mixing.lookahead import LookAheadLabel
from tikmix_loader.mixing.natural import NaturalMixer
from tikmix_loader.mixing.odm import ODMMixer
from tikmix_loader.mixing.regmix import (
    RegMixMixer,
    RegMixSweep,
    fit_regmix,
    run_regmix_sweep,
    sample_regmix_mixtures,
    simulate_best_mixture,
)
from tikmix_loader.mixing.static import StaticMixer
from tikmix_loader.mixing.stratified import StratifiedMixer
from tikmix_loader.mixing.synthetic import synthetic_problem
from tikmix_loader.mixing.temperature import TemperatureMixer
from tikmix_loader.mixing.tikmix_d import TiKMiXD, TikmixObjective, solve_tikmix_d
from tikmix_loader.mixing.tikmix_m import CurvatureLabel, TiKMiXM, annealed_dirichlet_search, per_mixture

MIXERS: dict[str, type[Mixer]] = {
    cls.name: cls
    for cls in (
        NaturalMixer,
        ODMMixer,
        RegMixMixer,
        StaticMixer,
        StratifiedMixer,
        TemperatureMixer,
        TiKMiXD,
        TiKMiXM,
    )
}


def get_mixer(name: str, **options) -> Mixer:
    """Build the mixer registered as ``name`` with its options (and data arguments such as ``label_fn`` for
    ``tikmix_m`` or ``mixtures``/``losses`` for ``regmix``).

    Raises:
        ConfigError: Unknown ``name`` (the message lists the valid names) or unknown / invalid options.
    """
    if name not in MIXERS:
        raise ConfigError(f"Unknown mixer {name!r}; valid mixers are {sorted(MIXERS)}.")
    return MIXERS[name](**options)


__all__ = [
    "CurvatureLabel",
    "LookAheadLabel",
    "MIXERS",
    "Mixer",
    "MixerConfig",
    "MixingContext",
    "MixtureSolution",
    "NaturalMixer",
    "ODMMixer",
    "RegMixMixer",
    "RegMixSweep",
    "StaticMixer",
    "StratifiedMixer",
    "Surrogate",
    "TemperatureMixer",
    "TiKMiXD",
    "TiKMiXM",
    "TikmixObjective",
    "annealed_dirichlet_search",
    "fit_lightgbm",
    "fit_regmix",
    "fit_ridge",
    "get_mixer",
    "per_mixture",
    "run_regmix_sweep",
    "sample_regmix_mixtures",
    "simulate_best_mixture",
    "solve_tikmix_d",
    "synthetic_problem",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
