"""tikmix-loader: a streaming LM-pretraining loader whose domain mixture adapts from Group Influence."""

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

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ByteTokenizer",
    "ConfigError",
    "ConversionError",
    "Domain",
    "DomainError",
    "KernelInputError",
    "LedgerError",
    "MissingExtraError",
    "MixtureLoader",
    "MixtureWeightError",
    "ShardError",
    "StateError",
    "TikmixError",
]
assert __all__ == sorted(__all__), "keep __all__ sorted"
