"""Proxy runs, shared by RegMix's and QuaDMix's searches: a small model trained briefly and scored on the
targets, and the FLOPs each such run costs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.runs import build_model
from tikmix_loader.models.tiny_gpt import GPTConfig, flops_per_token
from tikmix_loader.quality import QualityConfig
from tikmix_loader.train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class ProxySpec:
    """One search's proxies: ``model`` preset trained ``steps`` steps with the experiment's batch, sequence
    length and schedule, scored on at most ``val_samples`` samples of every target domain."""

    model: str
    steps: int
    val_samples: int

    @classmethod
    def of(cls, config: ExperimentConfig, *, model: str, fraction: float, val_samples: int) -> ProxySpec:
        """Proxies of ``model`` trained for ``fraction`` of the experiment's steps (at least one)."""
        return cls(model, max(1, round(fraction * config.steps)), val_samples)

    def flops_per_run(self, config: ExperimentConfig, val_domains: Sequence[Domain]) -> float:
        """Training FLOPs (``6 N`` per token) plus scoring FLOPs (``2 N`` per token) of one proxy."""
        shape = GPTConfig.preset(self.model, seq_len=config.seq_len)
        scored = sum(min(self.val_samples, d.num_samples(config.seq_len)) for d in val_domains)
        return (
            flops_per_token(shape, seq_len=config.seq_len) * (self.steps * config.batch_size * config.seq_len)
            + flops_per_token(shape, training=False, seq_len=config.seq_len) * scored * config.seq_len
        )

    def train(
        self,
        config: ExperimentConfig,
        *,
        train_domains: Sequence[Domain],
        val_domains: Sequence[Domain],
        seed: int,
        weights: Sequence[float] | Mapping[str, float],
        quality: QualityConfig | None = None,
    ) -> float:
        """Train a fresh proxy under ``weights`` (and ``quality``); its mean val loss over the domains."""
        model = build_model(self.model, seed=seed, seq_len=config.seq_len)
        loader = MixtureLoader(
            list(train_domains),
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            weights=weights,
            seed=seed,
            num_workers=config.num_workers,
            quality=quality,
        )
        try:
            schedule = TrainConfig(steps=self.steps, lr=config.lr)
            train(model, loader, config=schedule, device=config.device, progress=False)
        finally:
            loader.close()
        losses = evaluate(
            model,
            val_domains,
            seq_len=config.seq_len,
            batch_size=config.eval_batch_size,
            max_samples=self.val_samples,
        )
        return float(np.mean(list(losses.values())))
