"""The one small training loop (AdamW, cosine LR with warmup) and per-domain test loss, shared by the demo,
the experiment and RegMix proxies.

``train`` follows the step order ``MixtureController`` documents (observe, backward, record losses, optimizer
step, controller step), so any mixer can drive it. ``evaluate`` reads every sample of one epoch of each
domain (or a seeded subset of them) and returns the mean per-token cross-entropy in nats, so two models
evaluated with the same arguments are scored on exactly the same tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tikmix_loader.data.domain import Domain

# Reused rather than rewritten: the loader's batch layout (labels masked past the valid tokens).
from tikmix_loader.data.loader import samples_to_batch
from tikmix_loader.data.stream import DomainStream
from tikmix_loader.errors import ConfigError
from tikmix_loader.losses import loss_mask, per_token_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of one training run; every method of an experiment shares one.

    Args:
        steps (int): Optimiser steps. Default: 300.
        lr (float): Peak learning rate. Default: 2e-3.
        warmup_steps (int | None): Linear warmup steps; None = 5% of ``steps``. Default: None.
        min_lr_ratio (float): Final learning rate as a fraction of ``lr`` (cosine floor). Default: 0.1.
        weight_decay (float): AdamW decoupled weight decay. Default: 0.1.
        beta1 (float): AdamW beta1. Default: 0.9.
        beta2 (float): AdamW beta2. Default: 0.95.
        grad_clip (float | None): Clip the global gradient norm to this; None = no clipping. Default: 1.0.
    """

    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear warmup steps (None: 5% of steps)"}
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR as a fraction of lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float | None = field(default=1.0, metadata={"help": "global grad-norm clip (None: off)"})

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"TrainConfig: `steps` must be a positive int, got {self.steps!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig: `lr` must be a finite float > 0, got {self.lr!r}.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(
                f"TrainConfig: `warmup_steps` must be in [0, steps={self.steps}), got {self.warmup_steps!r}."
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig: `min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio!r}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0):
            raise ConfigError(
                f"TrainConfig: need 0 <= beta1, beta2 < 1 and weight_decay >= 0, got {self.beta1}, "
                f"{self.beta2}, {self.weight_decay}."
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig: `grad_clip` must be > 0 or None, got {self.grad_clip!r}.")

    @property
    def warmup(self) -> int:
        """Warmup steps in effect."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    def lr_at(self, step: int) -> float:
        """LR of 0-based ``step``: linear warmup to ``lr``, then cosine down to ``min_lr_ratio * lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup - 1)
        floor = self.min_lr_ratio * self.lr
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a ``train`` call did.

    Attributes:
        losses (list[float]): Training loss (nats/token) of every step.
        tokens (int): Training tokens consumed (this rank; padding included).
        seconds (float): Wall time of the loop.
        decisions (list[dict]): One per controller decision: ``step``, ``tokens_seen``, ``weights`` (after)
            and ``influence_tokens`` (tokens the influence engine pushed through extra passes).
        weights (dict[str, float]): The loader's mixture at the end.
    """

    losses: list[float]
    tokens: int
    seconds: float
    decisions: list[dict]
    weights: dict[str, float]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"`device` {device!r} is not a torch device; use auto, cpu, cuda or cuda:N."
        ) from exc


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, object]:
    """AdamW (decay on matrices only, as in GPT-2) and a ``LambdaLR`` following ``config.lr_at``."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.lr_at(step) / config.lr)
    return optimizer, scheduler


def train(
    model: nn.Module,
    loader,
    *,
    config: TrainConfig,
    controller=None,
    device: str | torch.device = "auto",
    progress: bool = True,
    desc: str = "train",
    optimizer_hook=None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on ``loader``'s batches, letting ``controller`` re-mix.

    Args:
        model (nn.Module): A model taking ``input_ids`` and returning logits (e.g. ``TinyGPT``); moved to
            ``device``.
        loader (MixtureLoader): Yields the training batches; its iteration must not end before ``steps``.
        config (TrainConfig): Steps, learning rate schedule and AdamW settings.
        controller (MixtureController, optional): Observes every step and decides on its schedule.
            Default: None (the loader's weights stay as they are).
        device (str | torch.device): ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``...
            Default: ``"auto"``.
        progress (bool): Show a tqdm bar. Default: True.
        desc (str): The bar's label. Default: ``"train"``.
        optimizer_hook (callable, optional): Called once as ``optimizer_hook(optimizer)`` before the first
            step, e.g. so a look-ahead label can copy the optimizer's state. Default: None.

    Returns:
        TrainResult: Per-step losses, tokens, wall time and the controller's decisions.

    Raises:
        ConfigError: the loader ran out of batches before ``config.steps``.
    """
    device = resolve_device(device)
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, config)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    losses, decisions, tokens = [], [], 0
    batches = iter(loader)
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    for step in bar:
        batch = next(batches, None)
        if batch is None:
            raise ConfigError(
                f"train: the loader ran out of batches at step {step} of {config.steps}; use "
                "exhaustion='repeat' or fewer `steps`."
            )
        batch = {key: value.to(device) for key, value in batch.items()}
        with controller.observe(batch) if controller is not None else contextlib.nullcontext():
            per_token = per_token_loss(model, batch)
            count = loss_mask(batch).sum().clamp(min=1)
            loss = per_token.sum() / count
            loss.backward()
        if controller is not None:
            controller.record_losses(batch, per_token)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
        tokens += batch["input_ids"].numel()
        # No decision after the last step: its weights would never be used.
        if controller is not None and step < config.steps - 1 and controller.step(step) is not None:
            influence = controller.last_influence
            decisions.append(
                {
                    "step": step,
                    "tokens_seen": int(controller.tokens_seen),
                    "weights": loader.weights,
                    "influence_tokens": 0 if influence is None else int(influence.processed_tokens),
                }
            )
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return TrainResult(losses, tokens, time.perf_counter() - started, decisions, loader.weights)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    domains: Sequence[Domain] | Mapping[str, Domain],
    *,
    seq_len: int,
    batch_size: int = 32,
    max_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean per-token cross-entropy (nats/token) of ``model`` on each domain.

    Each domain is read as one epoch of its sample stream (``DomainStream``: packed windows of ``seq_len + 1``
    tokens overlapping by one, so every token is predicted once), in the order ``seed`` fixes. With
    ``max_samples`` only the first that many samples of that order are scored: a uniform random subset,
    the same one for every model given the same arguments.

    Args:
        model (nn.Module): The model; put in ``eval()`` mode during the call and restored afterwards.
        domains (Sequence[Domain] | Mapping[str, Domain]): The domains (e.g. the test split of a corpus).
        seq_len (int): Context of each sample.
        batch_size (int): Samples per forward pass. Default: 32.
        max_samples (int | None): Score at most this many samples per domain; None = all. Default: None.
        seed (int): Fixes the sample order (and so the subset). Default: 0.
        device (str | torch.device | None): Where to run; None = the model's device. Default: None.

    Returns:
        dict[str, float]: Domain name -> mean loss over its scored tokens.

    Raises:
        ConfigError: ``batch_size`` or ``max_samples`` is not a positive int.
    """
    for name, value in (("batch_size", batch_size), ("max_samples", max_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"evaluate: `{name}` must be a positive int, got {value!r}.")
    items = list(domains.values()) if isinstance(domains, Mapping) else list(domains)
    if device is not None:
        model.to(resolve_device(device))
    was_training = model.training
    model.eval()
    results = {}
    try:
        for domain in items:
            stream = DomainStream(domain, seq_len=seq_len, seed=seed)
            count = (
                stream.samples_per_epoch
                if max_samples is None
                else min(max_samples, stream.samples_per_epoch)
            )
            total, tokens = 0.0, 0
            for start in range(0, count, batch_size):
                window, valid = stream.read(start, min(batch_size, count - start))
                batch = samples_to_batch(
                    window,
                    valid,
                    np.zeros(len(valid), np.int64),
                    domain.mode == "document",
                    label_convention="shifted",  # every target of the window; the loss follows the batch
                )
                per_token = per_token_loss(model, batch)
                total += float(per_token.double().sum())
                tokens += int(loss_mask(batch).sum())
            if tokens == 0:
                raise ConfigError(
                    f"evaluate: domain {domain.name!r} ({domain.path}) has no scorable token at seq_len "
                    f"{seq_len}; lower `seq_len` or add data."
                )
            results[domain.name] = total / tokens
    finally:
        model.train(was_training)
    return results
