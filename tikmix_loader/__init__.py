"""tikmix-loader: a streaming LM-pretraining loader whose domain mixture adapts from Group Influence."""

from tikmix_loader.controller import MixtureController, at_tokens, every
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.data.tokenizer import ByteTokenizer
from tikmix_loader.errors import (
    BackendUnavailableError,
    ConfigError,
    ConversionError,
    DomainError,
    KernelInputError,
    LedgerError,
    MissingExtraError,
    MixtureWeightError,
    ShardError,
    StateError,
    TikmixError,
)
from tikmix_loader.influence import GroupInfluence, InfluenceMatrix
from tikmix_loader.ledger import MixtureLedger
from tikmix_loader.mixing import MixingContext, MixtureSolution, get_mixer, solve_tikmix_d

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
    "LedgerError",
    "MissingExtraError",
    "MixingContext",
    "MixtureController",
    "MixtureLedger",
    "MixtureLoader",
    "MixtureSolution",
    "MixtureWeightError",
    "ShardError",
    "StateError",
    "TikmixError",
    "at_tokens",
    "every",
    "get_mixer",
    "solve_tikmix_d",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
