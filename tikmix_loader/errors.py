"""The package's exception hierarchy: one base, ``TikmixError``, and one subclass per family of bad input.

Every subclass also inherits the builtin a caller would naturally catch (``ValueError`` for bad data or
arguments, ``RuntimeError`` for an unavailable backend, ``ImportError`` for a missing optional extra), so
``except ValueError`` keeps working. Messages name the file, domain, layer or argument, the bad value and
the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TikmixError(Exception):
    """Base class of every error raised on purpose by tikmix-loader."""


class ShardError(TikmixError, ValueError):
    """A shard, index file, memmap or Parquet file is missing, corrupt, truncated or holds bad tokens."""


class ConversionError(TikmixError, ValueError):
    """An input to ``tikmix convert`` or ``tikmix corpus`` is missing, unreadable, malformed or empty."""


class DomainError(TikmixError, ValueError):
    """A domain is empty, unknown, duplicated or misconfigured."""


class UnknownFormatError(DomainError):
    """No format is recognised at a dataset path (``detect_format``). ``unrecognised`` says so and what each
    format looks like; the message adds the Python API's remedy, ``format=`` one of ``formats``, which
    callers that take no format (``tikmix score``) leave out."""

    def __init__(self, unrecognised: str, formats: Sequence[str]):
        self.unrecognised, self.formats = unrecognised, list(formats)
        super().__init__(f"{unrecognised} If it is one of {self.formats} under another name, pass `format=`.")

    def __reduce__(self):  # pickled (to another process) by its arguments, not its message
        return type(self), (self.unrecognised, self.formats)


class MixtureWeightError(TikmixError, ValueError):
    """Mixture weights are NaN, infinite, negative, all zero, of the wrong length or name unknown domains."""


class ConfigError(TikmixError, ValueError):
    """An argument or config value is out of range (e.g. ``seq_len``, ``batch_size``, a mixer option)."""


class OptionError(ConfigError):
    """A bad value of ``ExperimentConfig`` options. ``problem`` names each option of ``options`` by its flat
    name in backticks (`quadmix_proxies`), and so does the message (for Python callers); ``worded(spell)``
    names them by another spelling, such as the command line's flags (`--quadmix-proxies`)."""

    def __init__(self, problem: str, options: Sequence[str]):
        self.problem, self.options = problem, tuple(options)
        super().__init__(f"ExperimentConfig: {problem}")

    def worded(self, spell: Callable[[str], str]) -> str:
        """``problem`` with each option named as ``spell(flat_name)``, in backticks."""
        text = self.problem
        for option in self.options:
            text = text.replace(f"`{option}`", f"`{spell(option)}`")
        return text

    def __reduce__(self):  # pickled (to another process) by its arguments, not its message
        return type(self), (self.problem, self.options)


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
