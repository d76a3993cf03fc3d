"""``ExperimentConfig``: the shared protocol fields and one nested options dataclass per method family.

On the command line and in ``results.json`` every option has one flat name (its *flag*: ``--regmix-proxies``
is ``config.regmix.proxies``); ``FLAGS`` lists them in order, ``ExperimentConfig.from_flat`` builds a config
from flat names and ``to_dict`` writes them, so results files stay comparable across versions. A field's
``used_by`` (in ``FLAGS``) names the methods it configures; ``merge_results`` compares only those.

A bad value raises ``OptionError``, which names the options it is about by their flat names; the command line
rewords it with the flags the user typed (``OptionError.worded``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tikmix_loader.errors import ConfigError, OptionError
from tikmix_loader.experiment.methods import (
    ADAPTIVE,
    INFLUENCE,
    METHOD_BUILDERS,
    METHODS,
    QUADMIX,
    QUALITY,
    TIKMIX_D,
    TOPK,
)
from tikmix_loader.experiment.quality import parse_criteria
from tikmix_loader.influence import PRECONDITIONERS
from tikmix_loader.mixing.regmix import MODELS as REGRESSORS
from tikmix_loader.mixing.tikmix_d import check_max_step, check_step, check_weight_range
from tikmix_loader.models.tiny_gpt import PRESETS
from tikmix_loader.quality.scorers import DEFAULT_CRITERIA
from tikmix_loader.train import TrainConfig

INIT_MIXTURES = ("stratified", "natural")


def _option(default, help: str, *, flag: str | None = None, used_by: tuple[str, ...] | None = None):
    """A config field: its default, one-line ``help``, flat ``flag`` name (default: the field's name, after
    the group's prefix) and ``used_by`` (default: the group's; None: every method)."""
    return field(default=default, metadata={"help": help, "flag": flag, "used_by": used_by})


def _group(options: type, *, used_by: tuple[str, ...], prefix: str = ""):
    """A nested options field of ``ExperimentConfig``, configuring the methods in ``used_by``."""
    return field(default_factory=options, metadata={"options": options, "used_by": used_by, "prefix": prefix})


def _invalid(option: str, problem: str) -> OptionError:
    """The error for a bad value of ``option`` (a flat name): "`option` ``problem``"."""
    return OptionError(f"`{option}` {problem}", [option])


def _checked(option: str, check: Callable, *args, **kwargs) -> None:
    """Run another module's validator ``check(*args, **kwargs)`` on ``option``'s value; its ``ConfigError``
    becomes an ``OptionError`` that names ``option`` first."""
    try:
        check(*args, **kwargs)
    except ConfigError as error:
        problem = str(error)
        raise OptionError(f"`{option}`: {problem}", [option]) from error


def _positive_int(option: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(option, f"must be a positive int, got {value!r}.")


@dataclass(frozen=True)
class InfluenceOptions:
    """How the influence methods measure Group Influence and draw their targets."""

    k: int = _option(32, "Group Influence projection width")
    preconditioner: str = _option("kfac", "identity, kfac, ekfac or adam (the training AdamW's step sizes)")
    target_samples: int = _option(64, "val samples per domain for the targets")
    target_batch_size: int = _option(16, "batch size of target/observation passes")

    def __post_init__(self):
        for name in ("k", "target_samples", "target_batch_size"):
            _positive_int(name, getattr(self, name))
        if self.preconditioner not in PRECONDITIONERS:
            raise _invalid(
                "preconditioner", f"must be one of {sorted(PRECONDITIONERS)}, got {self.preconditioner!r}."
            )


@dataclass(frozen=True)
class TiKMiXDOptions:
    """Online TiKMiX-D's EMA and the bounds of every TiKMiX-D solve."""

    half_life: float | None = _option(
        200.0, "online EMA half-life (None: every)", used_by=("tikmix-d", "tikmix-m", "quadmix+tikmix-d")
    )
    max_step: float | None = _option(2.0, "tikmix-d trust region: w_d moves at most this factor per decision")
    min_weight: float = _option(0.1, "tikmix-d lower bound of every weight")
    step: float = _option(1.0, "tikmix-d partial step towards the solution, in (0, 1]", flag="d_step")

    def __post_init__(self):
        # The bounds every TiKMiX-D solve checks (its max_weight is 1 here).
        if self.max_step is not None:
            _checked("max_step", check_max_step, self.max_step)
        _checked("min_weight", check_weight_range, self.min_weight, 1.0)
        _checked("d_step", check_step, self.step)
        if self.half_life is not None and not self.half_life > 0:
            raise _invalid("half_life", f"must be > 0 or None, got {self.half_life!r}.")


@dataclass(frozen=True)
class StageOptions:
    """Stage-wise TiKMiX-D: observation passes at token milestones."""

    stages: int = _option(3, "tikmix-d-stage: evenly spaced token milestones")
    observation_samples: int = _option(
        64, "samples per domain of each observation pass", used_by=("tikmix-d-fresh", "tikmix-d-stage")
    )

    def __post_init__(self):
        _positive_int("stages", self.stages)
        _positive_int("observation_samples", self.observation_samples)


@dataclass(frozen=True)
class TemperatureOptions:
    """The temperature baseline: token shares ** tau."""

    tau: float = _option(0.5, "tau of the temperature baseline", flag="temperature")

    def __post_init__(self):
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise _invalid("temperature", f"must be >= 0, got {self.tau!r}.")


@dataclass(frozen=True)
class RegMixOptions:
    """RegMix's proxy sweep (flags ``--regmix-*``)."""

    proxies: int = _option(16, "RegMix proxy runs")
    model: str = _option("micro", "RegMix proxy preset")
    fraction: float = _option(0.25, "proxy steps as a fraction of steps")
    regressor: str = _option("lightgbm", "lightgbm or ridge")
    simulations: int = _option(100_000, "mixtures scored by the fit")
    val_samples: int = _option(64, "val samples per domain scoring a proxy")

    def __post_init__(self):
        for name in ("proxies", "simulations", "val_samples"):
            _positive_int(f"regmix_{name}", getattr(self, name))
        if self.proxies < 4:
            raise _invalid("regmix_proxies", f"must be >= 4 to fit a regressor, got {self.proxies}.")
        if self.model not in PRESETS:
            raise _invalid("regmix_model", f"{self.model!r} is not a preset; use one of {sorted(PRESETS)}.")
        if not 0 < self.fraction <= 1:
            raise _invalid("regmix_fraction", f"must be in (0, 1], got {self.fraction!r}.")
        if self.regressor not in REGRESSORS:
            raise _invalid("regmix_regressor", f"must be one of {list(REGRESSORS)}, got {self.regressor!r}.")


@dataclass(frozen=True)
class QuaDMixOptions:
    """The quality methods' criteria, QuaDMix's search and the top-k filters (flags ``--quadmix-*``)."""

    criteria: str = _option(
        ",".join(DEFAULT_CRITERIA), "quality criteria NAME[:higher|:lower],... (scores from `tikmix score`)"
    )
    params: str | None = _option(
        None,
        "JSON from `tikmix quadmix search` with the chosen parameters (None: search once, seeded by the "
        "first seed)",
        used_by=QUADMIX,
    )
    proxies: int = _option(32, "QuaDMix proxy runs", used_by=QUADMIX)
    model: str = _option("micro", "QuaDMix proxy preset", used_by=QUADMIX)
    fraction: float = _option(0.25, "QuaDMix proxy steps as a fraction of steps", used_by=QUADMIX)
    val_samples: int = _option(64, "val samples per domain scoring a QuaDMix proxy", used_by=QUADMIX)
    candidates: int = _option(100_000, "parameter sets scored by the fit (paper: 100k)", used_by=QUADMIX)
    top_k: int = _option(10, "best predicted parameter sets averaged (paper: 10)", used_by=QUADMIX)
    omega_scale: float = _option(1.0, "omega is drawn from [0, omega_scale] (paper: 0.1)", used_by=QUADMIX)
    keep: float = _option(0.8, "share of tokens each topk-* filter keeps", flag="topk_keep", used_by=TOPK)

    def __post_init__(self):
        _checked("quadmix_criteria", parse_criteria, self.criteria)
        for name in ("proxies", "val_samples", "candidates", "top_k"):
            _positive_int(f"quadmix_{name}", getattr(self, name))
        if self.proxies < 10:
            raise _invalid("quadmix_proxies", f"must be >= 10 (5-fold cross-validation), got {self.proxies}.")
        if self.top_k > self.candidates:
            raise OptionError(
                f"`quadmix_top_k` ({self.top_k}) exceeds `quadmix_candidates` ({self.candidates}).",
                ["quadmix_top_k", "quadmix_candidates"],
            )
        if self.model not in PRESETS:
            raise _invalid("quadmix_model", f"{self.model!r} is not a preset; use one of {sorted(PRESETS)}.")
        for name in ("fraction", "omega_scale", "keep"):
            if not 0 < getattr(self, name) <= 1:
                option = "topk_keep" if name == "keep" else f"quadmix_{name}"
                raise _invalid(option, f"must be in (0, 1], got {getattr(self, name)!r}.")


@dataclass(frozen=True)
class TiKMiXMOptions:
    """TiKMiX-M: decision interval, candidates and the measured look-ahead label."""

    every: int | None = _option(None, "tikmix-m decision interval (None: 2 x every)", flag="m_every")
    candidates: int = _option(32, "tikmix-m look-ahead candidates per decision", flag="m_candidates")
    lookahead_steps: int = _option(1, "tikmix-m optimiser steps per candidate")
    lookahead_samples: int = _option(4, "tikmix-m look-ahead samples per domain")
    lookahead_target_samples: int = _option(8, "tikmix-m target samples per domain")

    def __post_init__(self):
        _positive_int("m_every", self.every, optional=True)
        _positive_int("m_candidates", self.candidates)
        for name in ("lookahead_steps", "lookahead_samples", "lookahead_target_samples"):
            _positive_int(name, getattr(self, name))
        if self.candidates < 8:
            raise _invalid("m_candidates", f"must be >= 8, got {self.candidates}.")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment; saved in ``results.json`` (flat, see ``to_dict``)."""

    methods: tuple[str, ...] = _option(METHODS, "methods to run")
    seeds: tuple[int, ...] = _option((0, 1, 2, 3, 4), "paired seeds (init, data order)")
    steps: int = _option(1500, "training steps of every run")
    batch_size: int = _option(32, "sequences per step")
    seq_len: int = _option(128, "tokens per sequence")
    model: str = _option("tiny", f"TinyGPT preset: {sorted(PRESETS)}")
    lr: float = _option(2e-3, "peak learning rate (cosine schedule, 5% warmup)")
    device: str = _option("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    hold_out: str | None = _option(
        None, "train on the other domains; the targets are NAME's val split, the metric its test split"
    )
    targets: str | None = _option(
        None, "a directory of text files as the target set: a val half for decisions, a test half scored"
    )
    init: str = _option("stratified", "initial mixture of adaptive methods", used_by=ADAPTIVE)
    every: int = _option(
        100,
        "steps between decisions (tikmix-d, tikmix-d-fresh, odm)",
        used_by=("odm", "tikmix-d", "tikmix-d-fresh", "tikmix-m", "quadmix+tikmix-d"),
    )
    influence: InfluenceOptions = _group(InfluenceOptions, used_by=INFLUENCE)
    tikmix_d: TiKMiXDOptions = _group(TiKMiXDOptions, used_by=TIKMIX_D)
    stage: StageOptions = _group(StageOptions, used_by=("tikmix-d-stage",))
    temperature: TemperatureOptions = _group(TemperatureOptions, used_by=("temperature",))
    regmix: RegMixOptions = _group(RegMixOptions, used_by=("regmix",), prefix="regmix_")
    tikmix_m: TiKMiXMOptions = _group(TiKMiXMOptions, used_by=("tikmix-m",))
    quadmix: QuaDMixOptions = _group(QuaDMixOptions, used_by=QUALITY, prefix="quadmix_")
    eval_samples: int | None = _option(None, "test samples per domain (None: all)")
    eval_batch_size: int = _option(64, "batch size of test scoring")
    num_workers: int = _option(1, "loader prefetch threads")

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        unknown = [m for m in self.methods if m not in METHOD_BUILDERS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise _invalid(
                "methods",
                f"{list(self.methods)} must be distinct names from {list(METHOD_BUILDERS)} (unknown: "
                f"{unknown}).",
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise _invalid("seeds", f"must be distinct ints, got {list(self.seeds)}.")
        if self.model not in PRESETS:
            raise _invalid("model", f"{self.model!r} is not a preset; use one of {sorted(PRESETS)}.")
        if self.hold_out is not None and self.targets is not None:
            raise OptionError(
                f"give `hold_out` ({self.hold_out!r}) or `targets` ({self.targets!r}), not both.",
                ["hold_out", "targets"],
            )
        if self.init not in INIT_MIXTURES:
            raise _invalid("init", f"must be one of {INIT_MIXTURES}, got {self.init!r}.")
        for name in ("steps", "batch_size", "seq_len", "every", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("eval_samples", self.eval_samples, optional=True)
        if self.num_workers < 0:
            raise _invalid("num_workers", f"must be >= 0, got {self.num_workers!r}.")
        _checked("lr", TrainConfig, steps=self.steps, lr=self.lr)  # the shared schedule's check

    @classmethod
    def from_flat(cls, **values) -> ExperimentConfig:
        """A config from flat option names (``FLAGS``: ``regmix_proxies=8`` sets ``regmix.proxies``); the
        options not given keep their defaults.

        Raises:
            ConfigError: a name that is no option (the message lists them), or a bad value.
        """
        unknown = sorted(set(values) - set(FLAG_NAMES))
        if unknown:
            raise ConfigError(
                f"ExperimentConfig: unknown options {unknown}; valid ones are {list(FLAG_NAMES)}."
            )
        top, groups = {}, {}
        for flag in FLAGS:
            if flag.name in values:
                target = top if flag.group is None else groups.setdefault(flag.group, {})
                target[flag.field] = values[flag.name]
        for item in dataclasses.fields(cls):
            if item.name in groups:
                top[item.name] = item.metadata["options"](**groups[item.name])
        return cls(**top)

    def get(self, flag: str):
        """The value of the option with flat name ``flag``."""
        spec = FLAGS_BY_NAME[flag]
        owner = self if spec.group is None else getattr(self, spec.group)
        return getattr(owner, spec.field)

    def to_dict(self) -> dict:
        """Every option by flat name (tuples as lists): what ``results.json`` records."""
        return {
            flag.name: list(value) if isinstance(value, tuple) else value
            for flag in FLAGS
            for value in [self.get(flag.name)]
        }

    @property
    def train_config(self) -> TrainConfig:
        """The schedule every method's run uses."""
        return TrainConfig(steps=self.steps, lr=self.lr)

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class Flag:
    """One option of ``ExperimentConfig`` by its flat name: ``config.<group>.<field>`` (or ``config.<field>``
    when ``group`` is None), its default, help and the methods it configures (None: every method)."""

    name: str
    group: str | None
    field: str
    default: object
    help: str
    used_by: tuple[str, ...] | None


def _flags() -> tuple[Flag, ...]:
    flags = []
    for item in dataclasses.fields(ExperimentConfig):
        options = item.metadata.get("options")
        if options is None:
            flags.append(
                Flag(
                    item.name, None, item.name, item.default, item.metadata["help"], item.metadata["used_by"]
                )
            )
            continue
        for sub in dataclasses.fields(options):
            flags.append(
                Flag(
                    name=sub.metadata["flag"] or item.metadata["prefix"] + sub.name,
                    group=item.name,
                    field=sub.name,
                    default=sub.default,
                    help=sub.metadata["help"],
                    used_by=sub.metadata["used_by"] or item.metadata["used_by"],
                )
            )
    return tuple(flags)


FLAGS = _flags()
FLAGS_BY_NAME = {flag.name: flag for flag in FLAGS}
FLAG_NAMES = tuple(FLAGS_BY_NAME)
