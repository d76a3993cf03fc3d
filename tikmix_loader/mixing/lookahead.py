"""TiKMiX-M's measured label (a): the drop in mean target loss after a short look-ahead from a snapshot."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from tikmix_loader.errors import ConfigError
from tikmix_loader.losses import loss_mask, per_token_loss


class LookAheadLabel:
    """TiKMiX-M label (docs/methods.md §5, label a): the drop in mean target loss after a short look-ahead.

    For each candidate ``w``, from a snapshot of the model and optimizer, take ``steps`` optimizer steps on
    the loss ``sum_d w_d * mean loss of domain d`` over a fresh sample of every domain, which is the expected
    loss of a batch drawn with mixture ``w`` (ours: weighting a fixed sample instead of drawing batches with
    rounded quotas makes the label smooth in ``w``), then record how much the mean target loss fell; the
    snapshot is restored before the next candidate. Higher is better. It counts the tokens it trains on and
    scores, so the caller can price them (``train_tokens``, ``eval_tokens``).

    Args:
        model (nn.Module): The model being trained.
        loader (MixtureLoader): The training loader (``sample_domain`` leaves its stream untouched).
        targets (Mapping[str, list[dict]]): Target batches whose mean loss is measured.
        loss_fn (callable): ``loss_fn(model, batch)`` -> per-token loss [B, T] with masked positions 0.
            Default: ``tikmix_loader.losses.per_token_loss``.
        steps (int): Optimiser steps per candidate. Default: 1.
        samples (int): Samples of every domain in the look-ahead batch. Default: 4.
    """

    def __init__(
        self,
        model: nn.Module,
        loader,
        targets: Mapping[str, list[dict]],
        *,
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] = per_token_loss,
        steps: int = 1,
        samples: int = 4,
    ):
        self.model, self.loader, self.targets = model, loader, dict(targets)
        self.loss_fn = loss_fn
        self.steps, self.samples = steps, samples
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_tokens = 0
        self.eval_tokens = 0

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Use the training run's optimizer (``train`` calls this through ``optimizer_hook``)."""
        self.optimizer = optimizer

    def _target_loss(self) -> float:
        means = []
        with torch.no_grad():
            for batches in self.targets.values():
                total, count = 0.0, 0
                for batch in batches:
                    total += float(self.loss_fn(self.model, batch).double().sum())
                    count += int(loss_mask(batch).sum())
                    self.eval_tokens += batch["input_ids"].numel()
                means.append(total / max(count, 1))
        return float(np.mean(means))

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        if self.optimizer is None:
            raise ConfigError(
                "LookAheadLabel: no optimizer bound; pass `optimizer_hook=label.bind` to train()."
            )
        names = self.loader.domain_names
        pieces = [self.loader.sample_domain(name, self.samples) for name in names]
        batch = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
        rows = batch["domain"].to(next(self.model.parameters()).device)
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        was_training = self.model.training
        self.model.eval()
        before = self._target_loss()
        labels = []
        for w in np.asarray(weights, dtype=np.float64):
            row_weights = torch.as_tensor(w, dtype=torch.float32, device=rows.device)[rows]
            for _ in range(self.steps):
                per_token = self.loss_fn(self.model, batch)
                mask = loss_mask(batch).to(per_token.device).float()
                per_row = per_token.sum(1) / mask.sum(1).clamp(min=1)
                # Every domain has `samples` rows, so sum / samples is sum_d w_d * (mean loss of d).
                loss = (row_weights * per_row).sum() / self.samples
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.train_tokens += batch["input_ids"].numel()
            labels.append(before - self._target_loss())
            self.model.load_state_dict(model_state)
            # A fresh copy each time: load_state_dict keeps the given tensors, and the next step updates them.
            self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        self.model.train(was_training)
        return np.asarray(labels)
