"""One run of the protocol: build the model, wire the method from the registry, train, count the FLOPs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.methods import QUALITY, MethodInputs, get_method_builder
from tikmix_loader.experiment.quality import parse_criteria
from tikmix_loader.mixing import Mixer
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT, flops_per_token
from tikmix_loader.quality import QualityConfig, QualityParams
from tikmix_loader.train import TrainResult, resolve_device, train


def build_model(preset: str, *, seed: int, seq_len: int) -> TinyGPT:
    """The experiment's model: a ``TinyGPT`` preset at ``seq_len``, initialised from ``seed``."""
    return TinyGPT(GPTConfig.preset(preset, seq_len=seq_len), seed=seed)


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
        served_tokens (dict[str, np.ndarray] | None): Tokens served from each stored train document, per
            domain (``MixtureLoader.served_document_tokens``).
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
    served_tokens: dict | None = None


def train_method(
    method: str,
    seed: int,
    *,
    config: ExperimentConfig,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    static_weights: Mapping[str, float] | None = None,
    quality_params: Mapping[str, QualityParams] | None = None,
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
        quality_params (Mapping[str, QualityParams], optional): The parameters of the QuaDMix methods (from
            ``quadmix_sweep``). The quality methods' loader samples by ``config.quadmix.criteria``.
        ledger (str | PathLike, optional): Where adaptive methods record decisions (an old file is
            replaced).
        progress (bool): Show the training bar. Default: True.
        wrap_mixer (callable, optional): For diagnostics: an adaptive method's mixer is replaced by
            ``wrap_mixer(mixer, model=..., loader=..., targets=..., influence=...)`` before training (e.g.
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
        quality=QualityConfig(parse_criteria(config.quadmix.criteria)) if method in QUALITY else None,
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
                quality_params=quality_params,
            )
        )
        controller = setup.controller
        if wrap_mixer is not None and controller is not None:
            controller.mixer = wrap_mixer(
                controller.mixer,
                model=model,
                loader=loader,
                targets=controller.targets,
                influence=controller.influence,
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
        served = loader.served_document_tokens()
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
        served_tokens=served,
    )
