"""The package's exception hierarchy: one base, ``TikmixError``, and one subclass per family of bad input.

Every subclass also inherits the builtin a caller would naturally catch (``ValueError`` for bad data or
arguments, ``RuntimeError`` for an unavailable backend, ``ImportError`` for a missing optional extra), so
``except ValueError`` keeps working. Messages name the file, domain, layer or argument, the bad value and
the fix.
"""


class TikmixError(Exception):
    """Base class of every error raised on purpose by tikmix-loader."""


class ShardError(TikmixError, ValueError):
    """A shard, index file, memmap or Parquet file is missing, corrupt, truncated or holds bad tokens."""


class ConversionError(TikmixError, ValueError):
    """An input to ``tikmix convert`` or ``tikmix corpus`` is missing, unreadable, malformed or empty."""


class DomainError(TikmixError, ValueError):
    """A domain is empty, unknown, duplicated or misconfigured."""


class MixtureWeightError(TikmixError, ValueError):
    """Mixture weights are NaN, infinite, negative, all zero, of the wrong length or name unknown domains."""


class ConfigError(TikmixError, ValueError):
    """An argument or config value is out of range (e.g. ``seq_len``, ``batch_size``, a mixer option)."""


class StateError(TikmixError, ValueError):
    """A ``state_dict`` does not match the object it is loaded into (other domains, config or version)."""


class KernelInputError(TikmixError, ValueError):
    """A kernel input has the wrong dtype, shape or device, or segment ids are out of range."""


class BackendUnavailableError(TikmixError, RuntimeError):
    """An explicitly requested kernel backend cannot run here (not built, no GPU, no Triton)."""


class LedgerError(TikmixError, ValueError):
    """A mixture ledger is malformed or its hash chain is broken (edited, truncated or reordered)."""


class MissingExtraError(TikmixError, ImportError):
    """An optional dependency (e.g. ``lightgbm``, ``composer``) is needed but not installed."""


class ScoreError(TikmixError, ValueError):
    """Per-document quality scores are missing, NaN or of the wrong length, or quality parameters are bad."""


class LabelConventionError(TikmixError, ValueError):
    """A batch does not record which label convention (``"hf"`` or ``"shifted"``) its labels follow, or an
    unknown convention is requested."""


class TrackingError(ConfigError):
    """Influence cannot track a model: it has no trackable module, or a layer pattern selects none."""
