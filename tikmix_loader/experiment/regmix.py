"""RegMix's decision at the experiment's scale: proxies trained on sampled mixtures, a fit, its optimum."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.experiment.config import ExperimentConfig
from tikmix_loader.experiment.proxies import ProxySpec
from tikmix_loader.mixing import MixingContext, RegMixMixer, run_regmix_sweep, sample_regmix_mixtures


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
    proxy = ProxySpec.of(
        config, model=options.model, fraction=options.fraction, val_samples=options.val_samples
    )

    def train_proxy(mixture: np.ndarray) -> float:
        return proxy.train(
            config, train_domains=train_domains, val_domains=val_domains, seed=seed, weights=mixture.tolist()
        )

    sweep = run_regmix_sweep(
        train_proxy, mixtures, flops_per_run=proxy.flops_per_run(config, val_domains), progress=progress
    )
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
        "proxy_steps": proxy.steps,
        "seconds": time.perf_counter() - started,
    }
