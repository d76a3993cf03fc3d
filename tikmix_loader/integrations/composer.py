"""``TikMixCallback``: drives a ``MixtureController`` from inside a MosaicML Composer ``Trainer``.

Use the loader's DataLoader view as the trainer's ``train_dataloader`` (Composer then saves and restores
the loader through the dataset-state protocol, without spinning through batches) and add the callback::

    loader = MixtureLoader(domains, batch_size=32, seq_len=1024)
    controller = MixtureController(loader, "tikmix_d", influence=gi, targets=targets, schedule=every(500))
    trainer = Trainer(model=model, train_dataloader=loader.as_dataloader(),
                      callbacks=[TikMixCallback(controller)], max_duration="10000ba", ...)

Events: at ``FIT_START`` the trainer's first optimizer (``state.optimizers[0]``) goes to the controller
(``bind_optimizer``: the influence engine's ``"adam"`` preconditioner reads its second moments). Each
microbatch's forward and backward run inside ``controller.observe`` (``BEFORE_FORWARD`` to
``AFTER_BACKWARD``), so online influence reads the training backward itself. At ``AFTER_FORWARD`` the
per-token loss of the model's logits goes to ``controller.record_losses`` (mixers that use training losses,
such as ODM, read it); the model must return logits (a tensor, or an output with ``.logits``). The
decision happens at ``BATCH_END``, before ``BATCH_CHECKPOINT``, so a checkpoint written at that batch
already holds the new weights. Rank 0 solves and ``composer.utils.dist`` broadcasts the weights.

Loss scale (ours): the callback assumes the model's loss is the mean over the microbatch's loss tokens, and
Composer multiplies each microbatch loss by ``microbatch_size / batch_size`` (and, under ``amp_fp16``, by its
GradScaler's scale); the product is passed to the influence engine as ``loss_scale`` so per-domain gradients
keep per-token scale.
"""

from __future__ import annotations

import contextlib

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist

from tikmix_loader.losses import logits_of, loss_mask, token_cross_entropy


class TikMixCallback(Callback):
    """Composer callback around a ``MixtureController`` (online influence, decisions, logging, state).

    Args:
        controller (MixtureController): The controller; its loader must feed the trainer.
    """

    def __init__(self, controller):
        self.controller = controller
        controller.broadcast = lambda objects: dist.broadcast_object_list(objects, src=0)
        self._batch_size = 0
        self._observing: contextlib.ExitStack | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.optimizers:
            self.controller.bind_optimizer(state.optimizers[0])

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._batch_size = len(state.batch["input_ids"])

    def before_forward(self, state: State, logger: Logger) -> None:
        if not self.controller.online:
            return
        batch = state.batch
        tokens = int(loss_mask(batch).sum())
        scale = len(batch["input_ids"]) / max(self._batch_size, 1) / max(tokens, 1)
        if Precision(state.precision) == Precision.AMP_FP16:  # Composer also scales the loss by this
            scale *= float(state.scaler.get_scale())
        self._observing = contextlib.ExitStack()
        self._observing.enter_context(self.controller.influence.observe(batch, loss_scale=scale))

    def after_forward(self, state: State, logger: Logger) -> None:
        with torch.no_grad():
            losses = token_cross_entropy(logits_of(state.outputs), state.batch)
        self.controller.record_losses(state.batch, losses)

    def after_backward(self, state: State, logger: Logger) -> None:
        if self._observing is not None:
            self._observing.close()
            self._observing = None

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch) - 1  # Composer has already counted the finished batch
        solution = self.controller.step(step)
        stats = self.controller.loader.stats()
        metrics = {}
        for name, entry in stats.items():
            metrics[f"tikmix/target_share/{name}"] = entry["target_share"]
            metrics[f"tikmix/realized_share/{name}"] = entry["realized_share"]
        if solution is not None:
            metrics["tikmix/decisions"] = self.controller.decisions
            metrics["tikmix/solver_fallback"] = float(solution.fallback)
            if solution.objective is not None:
                metrics["tikmix/solver_objective"] = solution.objective
            influence = self.controller.last_influence
            if influence is not None:
                for b, target in enumerate(influence.targets):
                    for d, domain in enumerate(influence.domains):
                        metrics[f"tikmix/influence/{target}/{domain}"] = float(influence.values[b, d])
        logger.log_metrics(metrics)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
