"""``tikmix experiment``: train the same model with each mixing method on paired seeds and score test loss.

Protocol (issue 6, section 4):

- Every method trains the same ``TinyGPT`` preset for the same steps, batch and sequence length (so the same
  training tokens), with one LR schedule (``TrainConfig``: AdamW, linear warmup, cosine decay). The seed fixes
  the initialisation and every domain's data order (the loader reads each domain in an order keyed by
  ``(seed, domain)``, independent of the weights), so runs with equal seeds are paired.
- Mixers and targets read only the train and val splits: the loader holds the train split, the targets are
  samples of the val split of every domain (equally weighted), and ``train_method`` is never given the test
  split. Test is read once per run, after training, by ``evaluate``.
- Metric: test loss in nats/token, averaged over domains with equal weights, and the worst domain's.
- Decision compute, in FLOPs: tokens through the influence engine's extra passes (``InfluenceMatrix.
  processed_tokens``) times the model's training FLOPs per token; for TiKMiX-M also its look-ahead passes;
  for RegMix the proxy sweep (training and val scoring of every proxy). Statistics collected from the
  ordinary training backward (online mode) cost nothing extra. Training FLOPs are reported beside them.

Methods (``--methods``): ``stratified`` (uniform), ``natural`` (token shares), ``temperature`` (shares **
``tau``, 0.5), ``regmix`` (proxy sweep, LightGBM fit, simulated optimum, then a static run), ``odm`` (EXP3
on training loss), ``tikmix-d`` (online Group Influence, a decision every ``every`` steps), ``tikmix-d-stage``
(observation mode at token milestones, the paper's stage-wise schedule) and ``tikmix-m`` (TiKMiX-D anchor
refined by a LightGBM surrogate of a measured look-ahead label).

Choices of ours: the adaptive methods start from ``init`` (default ``stratified``, so they are compared with
the baseline they start from); RegMix sweeps once (proxies seeded with the first seed) and every seed's
final run uses the mixture found, so its decision FLOPs are counted once; paired differences are
``method - stratified`` per seed with standard error ``std(ddof=1) / sqrt(n)``. The TiKMiX-D defaults (a
decision every 100 steps, EMA half-life 200 steps, 64 val samples per domain per target, a trust region of
2x per decision and a floor of 0.1 per weight) come from the investigation in ``benchmarks/RESULTS.md``;
``--max-step none --min-weight 0`` gives the paper's unbounded solve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tikmix_loader.controller import MixtureController, at_tokens, every
from tikmix_loader.data.corpus import MANIFEST_FILE, SPLITS, build_corpus, load_corpus
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.errors import ConfigError, DomainError
from tikmix_loader.influence import PRECONDITIONERS, GroupInfluence
from tikmix_loader.ledger import MixtureLedger, head_path
from tikmix_loader.mixing import (
    LookAheadLabel,
    Mixer,
    MixingContext,
    RegMixMixer,
    get_mixer,
    run_regmix_sweep,
    sample_regmix_mixtures,
)
from tikmix_loader.mixing.regmix import MODELS as REGRESSORS
from tikmix_loader.mixing.tikmix_d import TiKMiXDConfig, weight_bounds
from tikmix_loader.models.tiny_gpt import PRESETS, GPTConfig, TinyGPT, flops_per_token, per_token_loss
from tikmix_loader.train import TrainConfig, TrainResult, evaluate, resolve_device, train

METHODS = (  # run by default; every name must be in METHOD_BUILDERS
    "stratified",
    "natural",
    "temperature",
    "regmix",
    "odm",
    "tikmix-d",
    "tikmix-d-stage",
    "tikmix-m",
)
ADAPTIVE = ("odm", "tikmix-d", "tikmix-d-stage", "tikmix-m")
INFLUENCE = ("tikmix-d", "tikmix-d-stage", "tikmix-m")  # the methods that measure Group Influence
BASELINE = "stratified"
STATIC = {"stratified": "stratified", "natural": "natural", "temperature": "temperature"}
INIT_MIXTURES = ("stratified", "natural")
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
# A method's results entry holds one value per seed under each of these keys (and under each domain of
# ``test_loss``).
PER_SEED_KEYS = (
    "avg_test_loss",
    "worst_test_loss",
    "decision_flops_per_seed",
    "final_weights",
    "initial_weights",
    "wall_seconds",
    "train_loss",
    "decisions",
    "ledgers",
)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment; saved in ``results.json``. A field's ``used_by`` metadata names
    the methods it configures (absent: every method)."""

    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "methods to run"})
    seeds: tuple[int, ...] = field(
        default=(0, 1, 2, 3, 4), metadata={"help": "paired seeds (init, data order)"}
    )
    steps: int = field(default=1500, metadata={"help": "training steps of every run"})
    batch_size: int = field(default=32, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    model: str = field(default="tiny", metadata={"help": f"TinyGPT preset: {sorted(PRESETS)}"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (cosine schedule, 5% warmup)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cpu, cuda, cuda:N"})
    init: str = field(
        default="stratified", metadata={"help": "initial mixture of adaptive methods", "used_by": ADAPTIVE}
    )
    every: int = field(
        default=100,
        metadata={
            "help": "steps between decisions (tikmix-d, odm)",
            "used_by": ("odm", "tikmix-d", "tikmix-m"),
        },
    )
    k: int = field(default=32, metadata={"help": "Group Influence projection width", "used_by": INFLUENCE})
    preconditioner: str = field(
        default="kfac", metadata={"help": "identity, kfac or ekfac", "used_by": INFLUENCE}
    )
    half_life: float | None = field(
        default=200.0,
        metadata={"help": "online EMA half-life (None: every)", "used_by": ("tikmix-d", "tikmix-m")},
    )
    max_step: float | None = field(
        default=2.0,
        metadata={
            "help": "tikmix-d trust region: w_d moves at most this factor per decision",
            "used_by": ("tikmix-d", "tikmix-d-stage"),
        },
    )
    min_weight: float = field(
        default=0.1,
        metadata={"help": "tikmix-d lower bound of every weight", "used_by": ("tikmix-d", "tikmix-d-stage")},
    )
    target_samples: int = field(
        default=64, metadata={"help": "val samples per domain for the targets", "used_by": INFLUENCE}
    )
    target_batch_size: int = field(
        default=16, metadata={"help": "batch size of target/observation passes", "used_by": INFLUENCE}
    )
    stages: int = field(
        default=3,
        metadata={"help": "tikmix-d-stage: evenly spaced token milestones", "used_by": ("tikmix-d-stage",)},
    )
    observation_samples: int = field(
        default=64, metadata={"help": "tikmix-d-stage: samples per domain", "used_by": ("tikmix-d-stage",)}
    )
    temperature: float = field(
        default=0.5, metadata={"help": "tau of the temperature baseline", "used_by": ("temperature",)}
    )
    regmix_proxies: int = field(default=16, metadata={"help": "RegMix proxy runs", "used_by": ("regmix",)})
    regmix_model: str = field(
        default="micro", metadata={"help": "RegMix proxy preset", "used_by": ("regmix",)}
    )
    regmix_fraction: float = field(
        default=0.25, metadata={"help": "proxy steps as a fraction of steps", "used_by": ("regmix",)}
    )
    regmix_regressor: str = field(
        default="lightgbm", metadata={"help": "lightgbm or ridge", "used_by": ("regmix",)}
    )
    regmix_simulations: int = field(
        default=100_000, metadata={"help": "mixtures scored by the fit", "used_by": ("regmix",)}
    )
    regmix_val_samples: int = field(
        default=64, metadata={"help": "val samples per domain scoring a proxy", "used_by": ("regmix",)}
    )
    m_every: int | None = field(
        default=None,
        metadata={"help": "tikmix-m decision interval (None: 2 x every)", "used_by": ("tikmix-m",)},
    )
    m_candidates: int = field(
        default=32, metadata={"help": "tikmix-m look-ahead candidates per decision", "used_by": ("tikmix-m",)}
    )
    lookahead_steps: int = field(
        default=1, metadata={"help": "tikmix-m optimiser steps per candidate", "used_by": ("tikmix-m",)}
    )
    lookahead_samples: int = field(
        default=4, metadata={"help": "tikmix-m look-ahead samples per domain", "used_by": ("tikmix-m",)}
    )
    lookahead_target_samples: int = field(
        default=8, metadata={"help": "tikmix-m target samples per domain", "used_by": ("tikmix-m",)}
    )
    eval_samples: int | None = field(default=None, metadata={"help": "test samples per domain (None: all)"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of test scoring"})
    num_workers: int = field(default=1, metadata={"help": "loader prefetch threads"})

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(
                f"ExperimentConfig: `methods` {list(self.methods)} must be distinct names from "
                f"{list(METHODS)} (unknown: {unknown})."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"ExperimentConfig: `seeds` must be distinct ints, got {list(self.seeds)}.")
        for name in ("model", "regmix_model"):
            if getattr(self, name) not in PRESETS:
                raise ConfigError(
                    f"ExperimentConfig: `{name}` {getattr(self, name)!r} is not a preset; use one of "
                    f"{sorted(PRESETS)}."
                )
        for name, valid in (("preconditioner", sorted(PRECONDITIONERS)), ("regmix_regressor", REGRESSORS)):
            if getattr(self, name) not in valid:
                raise ConfigError(
                    f"ExperimentConfig: `{name}` must be one of {list(valid)}, got {getattr(self, name)!r}."
                )
        if self.init not in INIT_MIXTURES:
            raise ConfigError(f"ExperimentConfig: `init` must be one of {INIT_MIXTURES}, got {self.init!r}.")
        positive = (
            "steps batch_size seq_len every k target_samples target_batch_size stages observation_samples "
            "regmix_proxies regmix_simulations regmix_val_samples m_candidates lookahead_steps "
            "lookahead_samples lookahead_target_samples eval_batch_size"
        ).split()
        for name in positive + ["m_every", "eval_samples"]:
            value = getattr(self, name)
            if value is None and name in ("m_every", "eval_samples"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ExperimentConfig: `{name}` must be a positive int, got {value!r}.")
        if self.regmix_proxies < 4:
            raise ConfigError(
                f"ExperimentConfig: `regmix_proxies` must be >= 4 to fit a regressor, got "
                f"{self.regmix_proxies}."
            )
        if not 0 < self.regmix_fraction <= 1:
            raise ConfigError(
                f"ExperimentConfig: `regmix_fraction` must be in (0, 1], got {self.regmix_fraction!r}."
            )
        if self.m_candidates < 8:
            raise ConfigError(f"ExperimentConfig: `m_candidates` must be >= 8, got {self.m_candidates}.")
        TiKMiXDConfig(max_step=self.max_step, min_weight=self.min_weight)  # validates both
        if self.half_life is not None and not self.half_life > 0:
            raise ConfigError(f"ExperimentConfig: `half_life` must be > 0 or None, got {self.half_life!r}.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"ExperimentConfig: `temperature` must be >= 0, got {self.temperature!r}.")
        if self.num_workers < 0:
            raise ConfigError(f"ExperimentConfig: `num_workers` must be >= 0, got {self.num_workers!r}.")
        TrainConfig(steps=self.steps, lr=self.lr)  # validates the shared schedule's arguments

    @property
    def train_config(self) -> TrainConfig:
        """The schedule every method's run uses."""
        return TrainConfig(steps=self.steps, lr=self.lr)

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSplits:
    """The train, val and test domains of a corpus (``DIR/<domain>/{train,val,test}/``), in one order."""

    train: tuple[Domain, ...]
    val: tuple[Domain, ...]
    test: tuple[Domain, ...]

    @property
    def names(self) -> list[str]:
        return [domain.name for domain in self.train]


def load_splits(corpus: str | os.PathLike) -> CorpusSplits:
    """Open the three splits of the corpus in ``corpus``; every split must hold the same domains.

    Raises:
        ConfigError: no readable manifest (from ``corpus_paths``).
        DomainError: the splits hold different domains.
    """
    splits = {split: tuple(load_corpus(corpus, split)) for split in SPLITS}
    names = {split: [domain.name for domain in domains] for split, domains in splits.items()}
    if not (names["train"] == names["val"] == names["test"]) or not names["train"]:
        raise DomainError(f"corpus {corpus}: the splits hold different domains {names}; rebuild the corpus.")
    return CorpusSplits(**splits)


def ensure_corpus(corpus: str | os.PathLike, *, progress: bool = True) -> Path:
    """Use the corpus in ``corpus`` as is if built from text; else build (or reuse) the built-in one there."""
    corpus = Path(corpus)
    manifest = corpus / MANIFEST_FILE
    if manifest.is_file():
        try:
            builder = json.loads(manifest.read_text()).get("builder")
        except json.JSONDecodeError:
            builder = None
        if builder == "from-text":
            return corpus
    build_corpus(corpus, progress=progress)
    return corpus


def val_targets(
    val: Sequence[Domain], *, samples: int, batch_size: int, seq_len: int, seed: int
) -> dict[str, list[dict]]:
    """Target batches: ``samples`` random val samples of every domain, named ``<domain>/val``."""
    sampler = MixtureLoader(list(val), batch_size=1, seq_len=seq_len, seed=seed, num_workers=0)
    return {
        f"{name}/val": sampler.sample_batches(name, samples, batch_size=batch_size, seed=seed)
        for name in sampler.domain_names
    }


def build_model(preset: str, *, seed: int, seq_len: int) -> TinyGPT:
    """The experiment's model: a ``TinyGPT`` preset at ``seq_len``, initialised from ``seed``."""
    return TinyGPT(GPTConfig.preset(preset, seq_len=seq_len), seed=seed)


def _context(loader: MixtureLoader) -> MixingContext:
    return MixingContext(
        domains=tuple(loader.domain_names),
        w_prior=loader.weights,
        domain_tokens=[domain.num_tokens for domain in loader.domains],
    )


# -- one run -------------------------------------------------------------------------------------


@dataclass
class MethodRun:
    """A trained model and what its mixing decided and cost (the test split is not part of it).

    Attributes:
        method (str), seed (int): Which run.
        model (nn.Module): The trained model.
        result (TrainResult): Losses, tokens, decisions, final weights.
        initial_weights (dict[str, float]): The mixture of the first step.
        decision_flops (float): FLOPs spent deciding the mixture during the run (RegMix's sweep is added by
            the caller, which runs it).
        train_flops (float): FLOPs of the training steps.
        last_influence (InfluenceMatrix | None): The last S measured.
        ledger (Path | None): The run's mixture ledger, when it has a controller.
    """

    method: str
    seed: int
    model: nn.Module
    result: TrainResult
    initial_weights: dict
    decision_flops: float
    train_flops: float
    last_influence: object = None
    ledger: Path | None = None


def _fresh_ledger(path: Path | None) -> MixtureLedger | None:
    if path is None:
        return None
    for stale in (Path(path), head_path(path)):
        stale.unlink(missing_ok=True)  # a rerun into the same --out starts a new history
    return MixtureLedger(path)


@dataclass
class MethodSetup:
    """What a method's builder hands to ``train_method``: the loader's weights are already set.

    Attributes:
        controller (MixtureController | None): Re-mixes during training (None: a static mixture).
        optimizer_hook (callable | None): Called with the training optimizer before the first step.
        extra_flops (callable | None): Decision FLOPs spent beyond the influence passes, read after training.
    """

    controller: MixtureController | None = None
    optimizer_hook: Callable | None = None
    extra_flops: Callable[[], float] | None = None


@dataclass(frozen=True)
class MethodInputs:
    """What a method's builder may use: the run's config, seed, model, training loader and val domains."""

    method: str
    seed: int
    config: ExperimentConfig
    model: nn.Module
    loader: MixtureLoader
    val_domains: Sequence[Domain]
    static_weights: Mapping[str, float] | None
    ledger: Path | None

    def fresh_ledger(self) -> MixtureLedger | None:
        """A new ledger at ``ledger`` (an old file there is replaced), for methods that decide."""
        return _fresh_ledger(self.ledger)


def _static_builder(mixer: str) -> Callable[[MethodInputs], MethodSetup]:
    def build(run: MethodInputs) -> MethodSetup:
        options = {"tau": run.config.temperature} if mixer == "temperature" else {}
        run.loader.set_weights(get_mixer(mixer, **options).propose(_context(run.loader)).weights)
        return MethodSetup()

    return build


def _regmix(run: MethodInputs) -> MethodSetup:
    if run.static_weights is None:
        raise ConfigError("train_method('regmix'): pass `static_weights` from regmix_sweep().")
    run.loader.set_weights(dict(run.static_weights))
    return MethodSetup()


def _adaptive_start(run: MethodInputs) -> None:
    """Adaptive methods start from ``config.init``."""
    names = run.loader.domain_names
    run.loader.set_weights(
        dict.fromkeys(names, 1.0) if run.config.init == "stratified" else run.loader.natural_weights()
    )


def _targets(run: MethodInputs) -> dict[str, list[dict]]:
    config = run.config
    return val_targets(
        run.val_domains,
        samples=config.target_samples,
        batch_size=config.target_batch_size,
        seq_len=config.seq_len,
        seed=run.seed,
    )


def _influence_options(run: MethodInputs) -> dict:
    return {"k": run.config.k, "preconditioner": run.config.preconditioner, "seed": run.seed}


def _online_influence(run: MethodInputs) -> GroupInfluence:
    half_life = run.config.half_life or run.config.every
    return GroupInfluence(
        run.model, domains=run.loader.domain_names, half_life=half_life, **_influence_options(run)
    )


def _tikmix_d_mixer(run: MethodInputs) -> Mixer:
    weight_bounds(len(run.loader.domain_names), run.config.min_weight, 1.0)  # fail before training
    return get_mixer("tikmix_d", max_step=run.config.max_step, min_weight=run.config.min_weight)


def _odm(run: MethodInputs) -> MethodSetup:
    _adaptive_start(run)
    schedule = every(run.config.every)
    controller = MixtureController(run.loader, "odm", schedule=schedule, ledger=run.fresh_ledger())
    return MethodSetup(controller=controller)


def _tikmix_d(run: MethodInputs) -> MethodSetup:
    _adaptive_start(run)
    controller = MixtureController(
        run.loader,
        _tikmix_d_mixer(run),
        influence=_online_influence(run),
        targets=_targets(run),
        schedule=every(run.config.every),
        ledger=run.fresh_ledger(),
    )
    return MethodSetup(controller=controller)


def _tikmix_d_stage(run: MethodInputs) -> MethodSetup:
    _adaptive_start(run)
    config = run.config
    milestones = [config.tokens_per_run * j // (config.stages + 1) for j in range(1, config.stages + 1)]
    controller = MixtureController(
        run.loader,
        _tikmix_d_mixer(run),
        influence=GroupInfluence(run.model, **_influence_options(run)),
        targets=_targets(run),
        schedule=at_tokens(*milestones),
        observation_samples=config.observation_samples,
        observation_batch_size=config.target_batch_size,
        ledger=run.fresh_ledger(),
    )
    return MethodSetup(controller=controller)


def _lookahead_flops(label: LookAheadLabel, model: GPTConfig, seq_len: int) -> float:
    """FLOPs the label spent: look-ahead steps as training passes, target scoring as forward passes."""
    return (
        flops_per_token(model, seq_len=seq_len) * label.train_tokens
        + flops_per_token(model, training=False, seq_len=seq_len) * label.eval_tokens
    )


def _tikmix_m(run: MethodInputs) -> MethodSetup:
    _adaptive_start(run)
    config = run.config
    targets = _targets(run)
    label_targets = {
        name: [{key: value[: config.lookahead_target_samples] for key, value in batches[0].items()}]
        for name, batches in targets.items()
    }
    label = LookAheadLabel(
        run.model,
        run.loader,
        label_targets,
        loss_fn=per_token_loss,
        steps=config.lookahead_steps,
        samples=config.lookahead_samples,
    )
    mixer = get_mixer("tikmix_m", label_fn=label, num_candidates=config.m_candidates, seed=run.seed)
    controller = MixtureController(
        run.loader,
        mixer,
        influence=_online_influence(run),
        targets=targets,
        schedule=every(config.m_every or 2 * config.every),
        ledger=run.fresh_ledger(),
    )
    return MethodSetup(
        controller=controller,
        optimizer_hook=label.bind,
        extra_flops=lambda: _lookahead_flops(label, run.model.config, config.seq_len),
    )


# How each method is wired: name -> builder(MethodInputs) -> MethodSetup. Another module adds a method by
# adding a builder here (and its name to ``METHODS`` to run it by default).
METHOD_BUILDERS: dict[str, Callable[[MethodInputs], MethodSetup]] = {
    "stratified": _static_builder("stratified"),
    "natural": _static_builder("natural"),
    "temperature": _static_builder("temperature"),
    "regmix": _regmix,
    "odm": _odm,
    "tikmix-d": _tikmix_d,
    "tikmix-d-stage": _tikmix_d_stage,
    "tikmix-m": _tikmix_m,
}


def get_method_builder(method: str) -> Callable[[MethodInputs], MethodSetup]:
    """The builder registered as ``method`` in ``METHOD_BUILDERS``.

    Raises:
        ConfigError: unknown ``method``; the message lists the valid ones.
    """
    if method not in METHOD_BUILDERS:
        raise ConfigError(f"Unknown method {method!r}; valid methods are {list(METHOD_BUILDERS)}.")
    return METHOD_BUILDERS[method]


def train_method(
    method: str,
    seed: int,
    *,
    config: ExperimentConfig,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    static_weights: Mapping[str, float] | None = None,
    ledger: str | os.PathLike | None = None,
    progress: bool = True,
    wrap_mixer: Callable[..., Mixer] | None = None,
) -> MethodRun:
    """Train one method on one seed; mixers and targets see only ``train_domains`` and ``val_domains``.

    Args:
        method (str): A name in ``METHOD_BUILDERS``.
        seed (int): Fixes the initialisation and every domain's data order.
        config (ExperimentConfig): The shared protocol.
        train_domains (Sequence[Domain]): The train split (what the loader samples).
        val_domains (Sequence[Domain]): The val split (the targets are drawn from it).
        static_weights (Mapping[str, float], optional): The mixture of ``regmix`` (from ``regmix_sweep``).
        ledger (str | PathLike, optional): Where adaptive methods record decisions (an old file is
            replaced).
        progress (bool): Show the training bar. Default: True.
        wrap_mixer (callable, optional): For diagnostics: an adaptive method's mixer is replaced by
            ``wrap_mixer(mixer, model=..., loader=..., targets=...)`` before training (e.g.
            ``benchmarks/bench_influence_drift.py``). Default: None.

    Raises:
        ConfigError: unknown ``method``, or ``regmix`` without ``static_weights``.
    """
    builder = get_method_builder(method)
    device = resolve_device(config.device)
    model = build_model(config.model, seed=seed, seq_len=config.seq_len).to(device)
    loader = MixtureLoader(
        list(train_domains),
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=seed,
        num_workers=config.num_workers,
    )
    per_token = flops_per_token(model.config, seq_len=config.seq_len)
    try:
        setup = builder(
            MethodInputs(
                method=method,
                seed=seed,
                config=config,
                model=model,
                loader=loader,
                val_domains=val_domains,
                static_weights=static_weights,
                ledger=None if ledger is None else Path(ledger),
            )
        )
        controller = setup.controller
        if wrap_mixer is not None and controller is not None:
            controller.mixer = wrap_mixer(
                controller.mixer, model=model, loader=loader, targets=controller.targets
            )
        initial = loader.weights
        result = train(
            model,
            loader,
            config=config.train_config,
            controller=controller,
            device=device,
            progress=progress,
            desc=f"{method} seed={seed}",
            optimizer_hook=setup.optimizer_hook,
        )
    finally:
        loader.close()
    decision_flops = per_token * sum(d["influence_tokens"] for d in result.decisions)
    if setup.extra_flops is not None:
        decision_flops += setup.extra_flops()
    return MethodRun(
        method=method,
        seed=seed,
        model=model,
        result=result,
        initial_weights=initial,
        decision_flops=float(decision_flops),
        train_flops=per_token * result.tokens,
        last_influence=None if controller is None else controller.last_influence,
        ledger=None if controller is None or ledger is None else Path(ledger),
    )


def regmix_sweep(
    config: ExperimentConfig,
    *,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    seed: int,
    progress: bool = True,
) -> dict:
    """RegMix's decision (docs/methods.md §7) at small scale: proxies, fit, simulated optimum.

    ``regmix_proxies`` mixtures from the RegMix prior; one ``regmix_model`` proxy per mixture trained with
    the shared schedule for ``regmix_fraction * steps`` steps (same batch and sequence length), scored by its
    mean val loss over domains (the targets, equally weighted) on ``regmix_val_samples`` samples per domain.
    The FLOPs of every proxy's training and scoring are counted.

    Returns:
        dict: ``weights`` {domain: w}, ``decision_flops``, ``mixtures``, ``losses``, ``predicted_loss``,
        ``valid_r2``, ``proxy_steps``, ``seconds``.
    """
    started = time.perf_counter()
    names = [domain.name for domain in train_domains]
    shares = np.array([domain.num_tokens for domain in train_domains], dtype=np.float64)
    mixtures = sample_regmix_mixtures(shares / shares.sum(), config.regmix_proxies, seed=seed)
    proxy_steps = max(1, round(config.regmix_fraction * config.steps))
    proxy_train = TrainConfig(steps=proxy_steps, lr=config.lr)
    proxy_config = GPTConfig.preset(config.regmix_model, seq_len=config.seq_len)
    scored = sum(min(config.regmix_val_samples, d.num_samples(config.seq_len)) for d in val_domains)
    flops_per_run = (
        flops_per_token(proxy_config, seq_len=config.seq_len)
        * (proxy_steps * config.batch_size * config.seq_len)
        + flops_per_token(proxy_config, training=False, seq_len=config.seq_len) * scored * config.seq_len
    )

    def train_proxy(mixture: np.ndarray) -> float:
        model = build_model(config.regmix_model, seed=seed, seq_len=config.seq_len)
        loader = MixtureLoader(
            list(train_domains),
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            weights=mixture.tolist(),
            seed=seed,
            num_workers=config.num_workers,
        )
        try:
            train(model, loader, config=proxy_train, device=config.device, progress=False)
        finally:
            loader.close()
        losses = evaluate(
            model,
            val_domains,
            seq_len=config.seq_len,
            batch_size=config.eval_batch_size,
            max_samples=config.regmix_val_samples,
        )
        return float(np.mean(list(losses.values())))

    sweep = run_regmix_sweep(train_proxy, mixtures, flops_per_run=flops_per_run, progress=progress)
    mixer = RegMixMixer(
        mixtures=sweep.mixtures,
        losses=sweep.losses,
        model=config.regmix_regressor,
        num_simulations=config.regmix_simulations,
        top_k=min(100, config.regmix_simulations),
        seed=seed,
    )
    context = MixingContext(domains=tuple(names), w_prior=dict.fromkeys(names, 1.0), domain_tokens=shares)
    solution = mixer.propose(context)
    return {
        "weights": solution.weights_by_name(names),
        "decision_flops": sweep.total_flops,
        "mixtures": sweep.mixtures.tolist(),
        "losses": sweep.losses.tolist(),
        "predicted_loss": solution.terms.get("predicted_loss"),
        "valid_r2": solution.terms.get("valid_r2"),
        "proxy_steps": proxy_steps,
        "seconds": time.perf_counter() - started,
    }


# -- statistics ----------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def paired_differences(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Per-seed ``values - baseline`` and their mean, standard error (``std(ddof=1) / sqrt(n)``) and wins.

    Args:
        values (Sequence[float]): A method's score per seed (lower is better).
        baseline (Sequence[float]): The baseline's score for the same seeds, in the same order.

    Returns:
        dict: ``diffs`` (list), ``mean``, ``se`` (None for one seed), ``wins`` (seeds where the method is
        lower), ``n``.

    Raises:
        ConfigError: the two lists differ in length or are empty.
    """
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ConfigError(
            f"paired_differences needs two equally long, non-empty lists (one score per seed); got {a.shape} "
            f"and {b.shape}."
        )
    diffs = a - b
    n = len(diffs)
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {
        "diffs": diffs.tolist(),
        "mean": float(diffs.mean()),
        "se": se,
        "wins": int((diffs < 0).sum()),
        "n": n,
    }


def summarize(methods: Mapping[str, dict], baseline: str = BASELINE) -> dict:
    """Per method: mean/std of the average and worst test loss, and paired differences against ``baseline``
    (when it was run) over the seeds both share."""
    summary = {}
    base = methods.get(baseline)
    for name, entry in methods.items():
        avg_mean, avg_std = mean_std(entry["avg_test_loss"])
        worst_mean, worst_std = mean_std(entry["worst_test_loss"])
        row = {
            "avg_test_loss": {"mean": avg_mean, "std": avg_std},
            "worst_test_loss": {"mean": worst_mean, "std": worst_std},
            "decision_flops": entry["decision_flops"],
            "train_flops": entry["train_flops"],
            "wall_seconds": float(np.mean(entry["wall_seconds"])),
        }
        if base is not None and name != baseline:
            count = min(len(entry["avg_test_loss"]), len(base["avg_test_loss"]))
            for key in ("avg_test_loss", "worst_test_loss"):
                row[f"{key}_vs_{baseline}"] = paired_differences(entry[key][:count], base[key][:count])
        summary[name] = row
    return summary


def _pm(mean: float, spread: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def markdown_table(
    summary: Mapping[str, dict], *, baseline: str = BASELINE, seeds: Sequence[int] = ()
) -> str:
    """The summary as a markdown table (losses in nats/token; Δ = method - baseline, ± its standard error)."""
    header = (
        f"| method | avg test loss (mean ± std) | Δ avg vs {baseline} (± SE) | wins | worst-domain loss | "
        f"Δ worst (± SE) | decision FLOPs | decision / train FLOPs | wall s/run |"
    )
    lines = [header, "|" + "---|" * 9]
    for name, row in summary.items():
        avg, worst = row["avg_test_loss"], row["worst_test_loss"]
        diff_avg = row.get(f"avg_test_loss_vs_{baseline}")
        diff_worst = row.get(f"worst_test_loss_vs_{baseline}")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    _pm(avg["mean"], avg["std"]),
                    "—" if diff_avg is None else _pm(diff_avg["mean"], diff_avg["se"]),
                    "—" if diff_avg is None else f"{diff_avg['wins']}/{diff_avg['n']}",
                    _pm(worst["mean"], worst["std"]),
                    "—" if diff_worst is None else _pm(diff_worst["mean"], diff_worst["se"]),
                    f"{row['decision_flops']:.3g}",
                    f"{row['decision_flops'] / row['train_flops']:.3f}",
                    f"{row['wall_seconds']:.0f}",
                ]
            )
            + " |"
        )
    if seeds:
        lines.append("")
        lines.append(
            f"Seeds: {list(seeds)}. Lower is better; wins = seeds where the method beats {baseline}."
        )
    return "\n".join(lines) + "\n"


# -- the experiment ------------------------------------------------------------------------------


def _json_safe(value):
    """``value`` with NaN and infinity as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def run_experiment(
    config: ExperimentConfig,
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict:
    """Run every method on every seed, score test loss, write ``results.json`` and ``results.md`` to ``out``.

    Seeds are the outer loop, so an interrupted experiment leaves complete paired seeds behind; the files are
    rewritten after every seed.

    Returns:
        dict: The ``results.json`` content: ``methods`` {name: {avg_test_loss, worst_test_loss, test_loss
        {domain: [...]}, decision_flops, decision_flops_per_seed, train_flops, final_weights, initial_weights,
        wall_seconds, train_loss, decisions, ledgers}}, ``summary``, ``domains``, ``seeds``, ``config``,
        ``regmix`` (the sweep, when run), ``device``, ``wall_seconds``.
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(corpus)
    names = splits.names
    entries = {method: _empty_entry(names) for method in config.methods}
    results = {
        "config": config.to_dict(),
        "corpus": str(corpus),
        "device": str(resolve_device(config.device)),
        "domains": names,
        "seeds": [],
        "methods": entries,
        "regmix": None,
    }
    for seed in config.seeds:
        for method in config.methods:
            run_started = time.perf_counter()
            static = None
            if method == "regmix":
                if results["regmix"] is None:
                    results["regmix"] = regmix_sweep(
                        config,
                        train_domains=splits.train,
                        val_domains=splits.val,
                        seed=config.seeds[0],
                        progress=progress,
                    )
                static = results["regmix"]["weights"]
            ledger = out / "ledgers" / f"{method}-seed{seed}.jsonl"
            run = train_method(
                method,
                seed,
                config=config,
                train_domains=splits.train,
                val_domains=splits.val,
                static_weights=static,
                ledger=ledger,
                progress=progress,
            )
            test = evaluate(
                run.model,
                splits.test,
                seq_len=config.seq_len,
                batch_size=config.eval_batch_size,
                max_samples=config.eval_samples,
            )
            decision_flops = run.decision_flops + (
                results["regmix"]["decision_flops"] if method == "regmix" else 0.0
            )
            _record(entries[method], run, test, decision_flops, time.perf_counter() - run_started)
        results["seeds"].append(seed)
        results["summary"] = summarize(entries)
        results["wall_seconds"] = time.perf_counter() - started
        write_results(results, out)
    return results


def _empty_entry(names: list[str]) -> dict:
    entry = {key: [] for key in PER_SEED_KEYS}
    entry.update(test_loss={name: [] for name in names}, decision_flops=0.0, train_flops=0.0)
    return entry


def _record(
    entry: dict, run: MethodRun, test: dict[str, float], decision_flops: float, seconds: float
) -> None:
    losses = list(test.values())
    entry["avg_test_loss"].append(float(np.mean(losses)))
    entry["worst_test_loss"].append(float(np.max(losses)))
    for name, value in test.items():
        entry["test_loss"][name].append(value)
    entry["final_weights"].append(list(run.result.weights.values()))
    entry["initial_weights"].append(list(run.initial_weights.values()))
    entry["decision_flops_per_seed"].append(decision_flops)
    entry["decision_flops"] = float(np.mean(entry["decision_flops_per_seed"]))
    entry["train_flops"] = run.train_flops
    entry["wall_seconds"].append(seconds)
    entry["train_loss"].append([round(value, 5) for value in run.result.losses])
    entry["decisions"].append(run.result.decisions)
    entry["ledgers"].append(None if run.ledger is None else str(run.ledger))


def write_results(results: dict, out: Path) -> None:
    """Write ``results.json`` (NaN and infinity as null) and the markdown table ``results.md`` to ``out``."""
    (out / RESULTS_FILE).write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    (out / TABLE_FILE).write_text(markdown_table(results["summary"], seeds=results["seeds"]))


def _read_results(part: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(part) / RESULTS_FILE
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot read the experiment results {path}: {error}") from error


def merge_results(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Combine the results of one protocol run in parts (parallel processes or machines, split by
    ``--methods``, by ``--seeds``, or both) into ``out``; trains nothing, rewrites ``results.json`` and
    ``results.md`` there.

    Every (method, seed) run must come from exactly one part, and every method must end up with every seed
    that any part completed, so the paired differences stay paired. The parts must agree on the corpus,
    device and every shared config field; a field that configures only some methods (its ``used_by``
    metadata) is compared only between the parts that run one of them, and the merged config takes it from
    those parts. A field missing from an older part's file is read with its default. RegMix may come from
    one part only, or from parts that ran the same proxy sweep. Statistics are recomputed over the union.

    Raises:
        ConfigError: an unreadable part, a (method, seed) run present in two parts, a method missing seeds,
            different RegMix sweeps, or parts that differ, naming the parts and the fields.
    """
    loaded = [_read_results(part) for part in parts]
    if not loaded:
        raise ConfigError("merge_results: give at least one experiment directory to merge.")
    names = [str(path) for path, _ in loaded]
    merged_config = _merged_config(loaded)
    seeds = sorted({seed for _, results in loaded for seed in results["seeds"]})
    runs: dict[str, dict[int, tuple[Path, dict]]] = {}
    for path, results in loaded:
        for name, entry in results["methods"].items():
            for index, seed in enumerate(results["seeds"]):
                if seed in runs.setdefault(name, {}):
                    raise ConfigError(
                        f"Cannot merge {path}: method {name!r} seed {seed} is also in {runs[name][seed][0]}."
                    )
                runs[name][seed] = (path, _seed_slice(entry, index))
    methods = {}
    for name in (name for name in METHODS if name in runs):
        missing = sorted(set(seeds) - set(runs[name]))
        if missing:
            raise ConfigError(
                f"Cannot merge {names}: method {name!r} has no run for seeds {missing}, which other parts "
                "completed; run them too, or leave those parts out."
            )
        methods[name] = _join_seeds([runs[name][seed][1] for seed in seeds])
    sweeps = [r["regmix"] for _, r in loaded if r.get("regmix") and "regmix" in r["methods"]]
    if any(sweep["weights"] != sweeps[0]["weights"] for sweep in sweeps):
        raise ConfigError(
            f"Cannot merge {names}: their RegMix runs used different proxy sweeps (each part sweeps once, "
            "seeded by its first seed); run RegMix in one part."
        )
    merged = {
        **loaded[0][1],
        "config": {**merged_config, "methods": list(methods), "seeds": seeds},
        "seeds": seeds,
        "methods": methods,
        "regmix": sweeps[0] if sweeps else None,
        "summary": summarize(methods),
        "wall_seconds": sum(results["wall_seconds"] for _, results in loaded),
        "merged_from": names,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(merged, out)
    return merged


def _merged_config(loaded: list[tuple[Path, dict]]) -> dict:
    """The parts' common config: each field from the parts that run a method it configures, which must agree
    (as must the corpus and device); ``methods`` and ``seeds`` are the merge's own business."""
    differing = [key for key in ("corpus", "device") if any(r[key] != loaded[0][1][key] for _, r in loaded)]
    configs = [(set(r["methods"]), ExperimentConfig(**r["config"]).to_dict()) for _, r in loaded]
    merged = {}
    for item in dataclasses.fields(ExperimentConfig):
        used_by = set(item.metadata.get("used_by", METHODS))
        values = [config[item.name] for ran, config in configs if ran & used_by] or [configs[0][1][item.name]]
        if item.name not in ("methods", "seeds") and any(value != values[0] for value in values):
            differing.append(item.name)
        merged[item.name] = values[0]
    if differing:
        raise ConfigError(f"Cannot merge {[str(path) for path, _ in loaded]}: they differ in {differing}.")
    return merged


def _seed_slice(entry: dict, index: int) -> dict:
    """One seed's run out of a method's results entry."""
    run = {key: entry[key][index] for key in PER_SEED_KEYS}
    run["test_loss"] = {name: values[index] for name, values in entry["test_loss"].items()}
    run["train_flops"] = entry["train_flops"]
    return run


def _join_seeds(runs: list[dict]) -> dict:
    """A method's results entry from its per-seed runs, in seed order (the inverse of ``_seed_slice``)."""
    entry = {key: [run[key] for run in runs] for key in PER_SEED_KEYS}
    entry["test_loss"] = {name: [run["test_loss"][name] for run in runs] for name in runs[0]["test_loss"]}
    entry["decision_flops"] = float(np.mean(entry["decision_flops_per_seed"]))
    entry["train_flops"] = runs[0]["train_flops"]
    return entry


# -- command line --------------------------------------------------------------------------------


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


_OPTIONAL_TYPES = {"half_life": float, "max_step": float, "m_every": int, "eval_samples": int}


def add_config_arguments(parser: argparse.ArgumentParser, defaults: ExperimentConfig, *, skip=()) -> None:
    """One ``--flag`` per ``ExperimentConfig`` field (help from its metadata, default from ``defaults``)."""
    for item in dataclasses.fields(ExperimentConfig):
        if item.name in skip:
            continue
        default = getattr(defaults, item.name)
        flag = f"--{item.name.replace('_', '-')}"
        shown = list(default) if isinstance(default, tuple) else default
        # argparse %-formats help strings, so a literal "%" must be doubled.
        help_text = f"{item.metadata['help']} (default: {shown})".replace("%", "%%")
        if item.name == "methods":
            parser.add_argument(flag, nargs="+", choices=METHODS, default=list(default), help=help_text)
        elif item.name == "seeds":
            parser.add_argument(flag, nargs="+", type=int, default=list(default), help=help_text)
        elif item.name in _OPTIONAL_TYPES:
            parser.add_argument(
                flag, type=_optional(_OPTIONAL_TYPES[item.name]), default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """An ``ExperimentConfig`` from parsed ``add_config_arguments`` flags (missing ones from ``base``)."""
    base = base or ExperimentConfig()
    values = {
        item.name: getattr(args, item.name, getattr(base, item.name)) for item in dataclasses.fields(base)
    }
    return ExperimentConfig(**values)


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads when asked (on a shared machine, 1 thread is often faster than 2)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"`--threads` must be >= 1, got {threads}.")
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.merge:
        results = merge_results(args.merge, args.out)
    else:
        apply_threads(args.threads)
        config = config_from_args(args)
        corpus = (
            ensure_corpus(args.corpus, progress=not args.no_progress) if args.build else Path(args.corpus)
        )
        results = run_experiment(config, corpus, args.out, progress=not args.no_progress)
    print(markdown_table(results["summary"], seeds=results["seeds"]))
    print(
        f"wrote {Path(args.out) / RESULTS_FILE} and {Path(args.out) / TABLE_FILE} "
        f"({results['wall_seconds']:.0f} s on {results['device']})"
    )
    return 0


def register(subparsers) -> None:
    """Add ``tikmix experiment``."""
    parser = subparsers.add_parser(
        "experiment",
        help="compare mixing methods on paired seeds by test loss (the mixture-quality protocol)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", default="corpus", help="corpus directory DIR/<domain>/{train,val,test}/")
    parser.add_argument("--out", default="out/experiment", help="output directory (default: out/experiment)")
    parser.add_argument(
        "--build", action="store_true", help="build (or reuse) the built-in corpus in --corpus first"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="combine the results of one protocol run in parts (split by --methods, --seeds or both) into "
        "--out (trains nothing; the other flags are ignored)",
    )
    add_config_arguments(parser, ExperimentConfig())
    parser.set_defaults(func=_run)
