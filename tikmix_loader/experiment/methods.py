"""The method registry: how each ``--methods`` name is wired (``METHOD_BUILDERS``: name -> builder).

A builder gets a run's ``MethodInputs`` (config, seed, fresh model, training loader, val domains), sets the
loader's initial weights and returns a ``MethodSetup`` (a controller that re-mixes during training, or None
for a static mixture). To add a method: write a builder (here or in another module) and add one line to
``METHOD_BUILDERS``; add its name to ``METHODS`` too if the default run should include it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from tikmix_loader.controller import MixtureController, at_tokens, every
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment.corpus_splits import val_targets
from tikmix_loader.experiment.quality import ScoredDomains, parse_criteria, topk_params
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.ledger import MixtureLedger, head_path
from tikmix_loader.mixing import LookAheadLabel, Mixer, MixingContext, get_mixer
from tikmix_loader.mixing.tikmix_d import weight_bounds
from tikmix_loader.models.tiny_gpt import GPTConfig, flops_per_token, per_token_loss
from tikmix_loader.quality import QualityParams
from tikmix_loader.quality.scorers import DEFAULT_CRITERIA

if TYPE_CHECKING:
    from tikmix_loader.experiment.config import ExperimentConfig


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
    """What a method's builder may use: the run's config, seed, model, training loader and the val
    domains of its targets (see ``targets.py``), and the decision of a method searched before the runs
    (``static_weights`` of RegMix, ``quality_params`` of QuaDMix)."""

    method: str
    seed: int
    config: ExperimentConfig
    model: nn.Module
    loader: MixtureLoader
    val_domains: Sequence[Domain]
    static_weights: Mapping[str, float] | None
    ledger: Path | None
    quality_params: Mapping[str, QualityParams] | None = None

    def fresh_ledger(self) -> MixtureLedger | None:
        """A new ledger at ``ledger`` (an old file there is replaced), for methods that decide."""
        if self.ledger is None:
            return None
        for stale in (self.ledger, head_path(self.ledger)):
            stale.unlink(missing_ok=True)  # a rerun into the same --out starts a new history
        return MixtureLedger(self.ledger)

    def start_adaptive(self) -> None:
        """Adaptive methods start from ``config.init``."""
        names = self.loader.domain_names
        self.loader.set_weights(
            dict.fromkeys(names, 1.0) if self.config.init == "stratified" else self.loader.natural_weights()
        )

    def targets(self) -> dict[str, list[dict]]:
        """The influence targets: ``config.influence.target_samples`` val samples of every domain."""
        options = self.config.influence
        return val_targets(
            self.val_domains,
            samples=options.target_samples,
            batch_size=options.target_batch_size,
            seq_len=self.config.seq_len,
            seed=self.seed,
        )


def _context(loader: MixtureLoader) -> MixingContext:
    return MixingContext(
        domains=tuple(loader.domain_names),
        w_prior=loader.weights,
        domain_tokens=[domain.num_tokens for domain in loader.domains],
    )


def _static(mixer: str) -> Callable[[MethodInputs], MethodSetup]:
    """A builder of the fixed mixture that ``get_mixer(mixer)`` proposes once."""

    def build(run: MethodInputs) -> MethodSetup:
        run.loader.set_weights(get_mixer(mixer).propose(_context(run.loader)).weights)
        return MethodSetup()

    return build


def _temperature(run: MethodInputs) -> MethodSetup:
    mixer = get_mixer("temperature", tau=run.config.temperature.tau)
    run.loader.set_weights(mixer.propose(_context(run.loader)).weights)
    return MethodSetup()


def _regmix(run: MethodInputs) -> MethodSetup:
    if run.static_weights is None:
        raise ConfigError("train_method('regmix'): pass `static_weights` from regmix_sweep().")
    run.loader.set_weights(dict(run.static_weights))
    return MethodSetup()


def _influence(run: MethodInputs, *, half_life: float | None = None) -> GroupInfluence:
    """The Group Influence engine of an influence method; online (an EMA) when ``half_life`` is given."""
    options = run.config.influence
    online = {} if half_life is None else {"domains": run.loader.domain_names, "half_life": half_life}
    return GroupInfluence(
        run.model, k=options.k, preconditioner=options.preconditioner, seed=run.seed, **online
    )


def _deciding(controller: MixtureController) -> MethodSetup:
    """The setup of a method whose controller measures S: its engine gets the training optimizer (which the
    ``adam`` preconditioner reads; the others ignore it)."""
    return MethodSetup(controller, optimizer_hook=controller.bind_optimizer)


def _online_half_life(run: MethodInputs) -> float:
    return run.config.tikmix_d.half_life or run.config.every


def _tikmix_d_mixer(run: MethodInputs) -> Mixer:
    options = run.config.tikmix_d
    weight_bounds(len(run.loader.domain_names), options.min_weight, 1.0)  # fail before training
    return get_mixer("tikmix_d", max_step=options.max_step, min_weight=options.min_weight, step=options.step)


def _odm(run: MethodInputs) -> MethodSetup:
    run.start_adaptive()
    schedule = every(run.config.every)
    return MethodSetup(MixtureController(run.loader, "odm", schedule=schedule, ledger=run.fresh_ledger()))


def _online_tikmix_d(run: MethodInputs) -> MixtureController:
    """TiKMiX-D every ``every`` steps on the online EMA of Group Influence."""
    return MixtureController(
        run.loader,
        _tikmix_d_mixer(run),
        influence=_influence(run, half_life=_online_half_life(run)),
        targets=run.targets(),
        schedule=every(run.config.every),
        ledger=run.fresh_ledger(),
    )


def _observing_tikmix_d(run: MethodInputs, schedule) -> MixtureController:
    """TiKMiX-D on a fresh observation pass at each decision of ``schedule``."""
    config = run.config
    return MixtureController(
        run.loader,
        _tikmix_d_mixer(run),
        influence=_influence(run),
        targets=run.targets(),
        schedule=schedule,
        observation_samples=config.stage.observation_samples,
        observation_batch_size=config.influence.target_batch_size,
        ledger=run.fresh_ledger(),
    )


def _tikmix_d(run: MethodInputs) -> MethodSetup:
    run.start_adaptive()
    return _deciding(_online_tikmix_d(run))


def _tikmix_d_fresh(run: MethodInputs) -> MethodSetup:
    """TiKMiX-D every ``every`` steps on a fresh observation pass at each decision, not the online EMA: in
    the counterfactual check fresh K-FAC/EK-FAC ``S`` ranked measured branches better than the EMA, which
    mixes gradients of parameters the model has since left (docs/methods.md §6)."""
    run.start_adaptive()
    return _deciding(_observing_tikmix_d(run, every(run.config.every)))


def _tikmix_d_stage(run: MethodInputs) -> MethodSetup:
    run.start_adaptive()
    config, stages = run.config, run.config.stage.stages
    milestones = [config.tokens_per_run * j // (stages + 1) for j in range(1, stages + 1)]
    return _deciding(_observing_tikmix_d(run, at_tokens(*milestones)))


def _lookahead_flops(label: LookAheadLabel, model: GPTConfig, seq_len: int) -> float:
    """FLOPs the label spent: look-ahead steps as training passes, target scoring as forward passes."""
    return (
        flops_per_token(model, seq_len=seq_len) * label.train_tokens
        + flops_per_token(model, training=False, seq_len=seq_len) * label.eval_tokens
    )


def _tikmix_m(run: MethodInputs) -> MethodSetup:
    run.start_adaptive()
    config, options = run.config, run.config.tikmix_m
    targets = run.targets()
    label_targets = {
        name: [{key: value[: options.lookahead_target_samples] for key, value in batches[0].items()}]
        for name, batches in targets.items()
    }
    label = LookAheadLabel(
        run.model,
        run.loader,
        label_targets,
        loss_fn=per_token_loss,
        steps=options.lookahead_steps,
        samples=options.lookahead_samples,
    )
    mixer = get_mixer("tikmix_m", label_fn=label, num_candidates=options.candidates, seed=run.seed)
    controller = MixtureController(
        run.loader,
        mixer,
        influence=_influence(run, half_life=_online_half_life(run)),
        targets=targets,
        schedule=every(options.every or 2 * config.every),
        ledger=run.fresh_ledger(),
    )

    def bind(optimizer):  # the label copies the optimizer's state; the engine reads it for "adam"
        label.bind(optimizer)
        controller.bind_optimizer(optimizer)

    return MethodSetup(
        controller=controller,
        optimizer_hook=bind,
        extra_flops=lambda: _lookahead_flops(label, run.model.config, config.seq_len),
    )


def _uniform_docs(run: MethodInputs) -> MethodSetup:
    """Stratified domains, every document once per epoch (``stratified`` on the quality-aware loader)."""
    run.loader.set_weights(dict.fromkeys(run.loader.domain_names, 1.0))
    return MethodSetup()


def _topk(criterion: str) -> Callable[[MethodInputs], MethodSetup]:
    """A builder of the filter keeping the best ``quadmix.keep`` share of every domain's tokens by
    ``criterion``, on stratified domains."""

    def build(run: MethodInputs) -> MethodSetup:
        criteria = parse_criteria(run.config.quadmix.criteria)
        params = topk_params(list(criteria), criterion, run.config.quadmix.keep)
        run.loader.set_quality(dict.fromkeys(run.loader.domain_names, params))
        run.loader.set_weights(dict.fromkeys(run.loader.domain_names, 1.0))
        return MethodSetup()

    return build


def _quadmix_start(run: MethodInputs) -> dict[str, QualityParams]:
    """Set the domain weights QuaDMix's searched parameters imply; returns the parameters."""
    if run.quality_params is None:
        raise ConfigError(f"train_method({run.method!r}): pass `quality_params` from quadmix_sweep().")
    criteria = parse_criteria(run.config.quadmix.criteria)
    run.loader.set_weights(ScoredDomains(run.loader.domains, criteria).implied_weights(run.quality_params))
    return dict(run.quality_params)


def _quadmix(run: MethodInputs) -> MethodSetup:
    run.loader.set_quality(_quadmix_start(run))
    return MethodSetup()


def _quadmix_tikmix_d(run: MethodInputs) -> MethodSetup:
    """Joint mode: QuaDMix's parameters stay; online TiKMiX-D moves the weights from the implied ones."""
    params = _quadmix_start(run)
    controller = _online_tikmix_d(run)
    controller.set_quality(params, step=0)  # recorded in the ledger before the first decision
    return _deciding(controller)


TOPK = tuple(f"topk-{criterion}" for criterion in DEFAULT_CRITERIA)  # single-criterion filters
QUADMIX = ("quadmix", "quadmix+tikmix-d")  # the methods that use QuaDMix's searched parameters
QUALITY = ("uniform-docs", *TOPK, *QUADMIX)  # the methods whose loader samples by quality


# How each method is wired: name -> builder(MethodInputs) -> MethodSetup.
METHOD_BUILDERS: dict[str, Callable[[MethodInputs], MethodSetup]] = {
    "stratified": _static("stratified"),
    "natural": _static("natural"),
    "temperature": _temperature,
    "regmix": _regmix,
    "odm": _odm,
    "tikmix-d": _tikmix_d,
    "tikmix-d-fresh": _tikmix_d_fresh,
    "tikmix-d-stage": _tikmix_d_stage,
    "tikmix-m": _tikmix_m,
    "uniform-docs": _uniform_docs,
    **{f"topk-{criterion}": _topk(criterion) for criterion in DEFAULT_CRITERIA},
    "quadmix": _quadmix,
    "quadmix+tikmix-d": _quadmix_tikmix_d,
}
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
ADAPTIVE = ("odm", "tikmix-d", "tikmix-d-fresh", "tikmix-d-stage", "tikmix-m")  # start from `config.init`
# the methods that measure S
INFLUENCE = ("tikmix-d", "tikmix-d-fresh", "tikmix-d-stage", "tikmix-m", "quadmix+tikmix-d")
TIKMIX_D = (
    "tikmix-d",
    "tikmix-d-fresh",
    "tikmix-d-stage",
    "quadmix+tikmix-d",
)  # the methods that solve TiKMiX-D


def get_method_builder(method: str) -> Callable[[MethodInputs], MethodSetup]:
    """The builder registered as ``method`` in ``METHOD_BUILDERS``.

    Raises:
        ConfigError: unknown ``method``; the message lists the valid ones.
    """
    if method not in METHOD_BUILDERS:
        raise ConfigError(f"Unknown method {method!r}; valid methods are {list(METHOD_BUILDERS)}.")
    return METHOD_BUILDERS[method]
