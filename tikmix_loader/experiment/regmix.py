"""RegMix's decision at the experiment's scale: proxies trained on sampled mixtures, a fit, its optimum."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.runs import build_model
from tikmix_loader.mixing import MixingContext, RegMixMixer, run_regmix_sweep, sample_regmix_mixtures
from tikmix_loader.models.tiny_gpt import GPTConfig, flops_per_token
from tikmix_loader.train import TrainConfig, evaluate, train


def regmix_sweep(
    config: ExperimentConfig,
    *,
    train_domains: Sequence[Domain],
    val_domains: Sequence[Domain],
    seed: int,
    progress: bool = True,
) -> dict:
    """RegMix's decision (docs/methods.md §7) at small scale: proxies, fit, simulated optimum.

    ``regmix.proxies`` mixtures from the RegMix prior; one ``regmix.model`` proxy per mixture trained with
    the shared schedule for ``regmix.fraction * steps`` steps (same batch and sequence length), scored by its
    mean val loss over domains (the targets, equally weighted) on ``regmix.val_samples`` samples per domain.
    The FLOPs of every proxy's training and scoring are counted.

    Returns:
        dict: ``weights`` {domain: w}, ``decision_flops``, ``mixtures``, ``losses``, ``predicted_loss``,
        ``valid_r2``, ``proxy_steps``, ``seconds``.
    """
    started = time.perf_counter()
    options = config.regmix
    names = [domain.name for domain in train_domains]
    shares = np.array([domain.num_tokens for domain in train_domains], dtype=np.float64)
    mixtures = sample_regmix_mixtures(shares / shares.sum(), options.proxies, seed=seed)
    proxy_steps = max(1, round(options.fraction * config.steps))
    proxy_train = TrainConfig(steps=proxy_steps, lr=config.lr)
    proxy_config = GPTConfig.preset(options.model, seq_len=config.seq_len)
    scored = sum(min(options.val_samples, d.num_samples(config.seq_len)) for d in val_domains)
    flops_per_run = (
        flops_per_token(proxy_config, seq_len=config.seq_len)
        * (proxy_steps * config.batch_size * config.seq_len)
        + flops_per_token(proxy_config, training=False, seq_len=config.seq_len) * scored * config.seq_len
    )

    def train_proxy(mixture: np.ndarray) -> float:
        model = build_model(options.model, seed=seed, seq_len=config.seq_len)
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
            max_samples=options.val_samples,
        )
        return float(np.mean(list(losses.values())))

    sweep = run_regmix_sweep(train_proxy, mixtures, flops_per_run=flops_per_run, progress=progress)
    mixer = RegMixMixer(
        mixtures=sweep.mixtures,
        losses=sweep.losses,
        model=options.regressor,
        num_simulations=options.simulations,
        top_k=min(100, options.simulations),
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
