"""tikmix-loader: a streaming LM-pretraining loader whose domain mixture adapts from Group Influence."""

import importlib

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.tokenizer import ByteTokenizer
from tikmix_loader.errors import (
    BackendUnavailableError,
    ConfigError,
    ConversionError,
    DomainError,
    KernelInputError,
    LabelConventionError,
    LedgerError,
    MissingExtraError,
    MixtureWeightError,
    OptionError,
    ScoreError,
    ShardError,
    StateError,
    TikmixError,
    TrackingError,
    UnknownFormatError,
)

# The training-side engine is imported on first use (PEP 562). Eager imports would be circular:
# ``tikmix_kernels`` imports ``tikmix_loader.errors`` (which runs this file), and the influence engine
# imports ``tikmix_kernels``. They also keep ``import tikmix_loader`` free of SciPy and LightGBM, and
# free of torch (``MixtureLoader``), so ``tikmix convert`` starts without it.
_LAZY_EXPORTS = {
    "MixtureLoader": "tikmix_loader.data.loader",
    "GroupInfluence": "tikmix_loader.influence",
    "InfluenceMatrix": "tikmix_loader.influence",
    "MixingContext": "tikmix_loader.mixing",
    "MixtureController": "tikmix_loader.controller",
    "MixtureLedger": "tikmix_loader.ledger",
    "MixtureSolution": "tikmix_loader.mixing",
    "at_tokens": "tikmix_loader.controller",
    "every": "tikmix_loader.controller",
    "get_mixer": "tikmix_loader.mixing",
    "solve_tikmix_d": "tikmix_loader.mixing",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'tikmix_loader' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ByteTokenizer",
    "ConfigError",
    "ConversionError",
    "Domain",
    "DomainError",
    "GroupInfluence",
    "InfluenceMatrix",
    "KernelInputError",
    "LabelConventionError",
    "LedgerError",
    "MissingExtraError",
    "MixingContext",
    "MixtureController",
    "MixtureLedger",
    "MixtureLoader",
    "MixtureSolution",
    "MixtureWeightError",
    "OptionError",
    "ScoreError",
    "ShardError",
    "StateError",
    "TikmixError",
    "TrackingError",
    "UnknownFormatError",
    "at_tokens",
    "every",
    "get_mixer",
    "solve_tikmix_d",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
