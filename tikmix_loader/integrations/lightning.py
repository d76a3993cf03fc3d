"""``TikMixLightningCallback``: drives a ``MixtureController`` inside a Lightning ``Trainer.fit``.

Return the loader's DataLoader view from ``train_dataloader()`` (Lightning 2.x saves and restores it through
its ``state_dict``/``load_state_dict``, so ``ckpt_path=`` resumes mid-epoch at the right batch) and add the
callback::

    class Module(L.LightningModule):
        def train_dataloader(self):
            return loader.as_dataloader()

        def training_step(self, batch, batch_idx):
            outputs = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
            return {"loss": outputs.loss, "logits": outputs.logits.detach()}

    trainer = L.Trainer(max_steps=10_000, callbacks=[TikMixLightningCallback(controller)])
    trainer.fit(Module(), ckpt_path="last")

Hooks: ``on_train_start`` hands the first optimizer (``trainer.optimizers[0]``) to the controller
(``bind_optimizer``: the influence engine's ``"adam"`` preconditioner reads its second moments). The forward
and backward of each batch run inside ``influence.observe`` (``on_train_batch_start`` to
``on_after_backward``), with ``loss_scale`` for a loss that is the mean over the batch's loss tokens divided
by ``accumulate_grad_batches`` and, under ``precision="16-mixed"``, multiplied by the GradScaler's scale
(what Lightning backpropagates). When ``training_step`` returns a dict with ``"logits"``, their per-token
loss goes to ``controller.record_losses`` (mixers such as ODM read it). After each optimizer step
(``on_train_batch_end``) the controller may decide; new weights reach the batches not yet fetched. The
callback's own state (saved in the checkpoint) is the controller's.

Lightning's fetcher takes batches ahead of training when the DataLoader has no length (ours is endless):
one in Lightning 2.6 (``_PrefetchDataFetcher(prefetch_batches=1)``). The callback measures the depth
instead of assuming it: at the first training batch of a fit, what the DataLoader has delivered beyond that
batch is held, and it sets the DataLoader's ``held_batches`` to that. Its saved state is then the state
after the last trained batch, and a resume starts with the first batch that was fetched but not trained.
"""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch

from tikmix_loader.data.dataset import MixtureDataset
from tikmix_loader.losses import loss_mask, token_cross_entropy


class TikMixLightningCallback(pl.Callback):
    """Lightning callback around a ``MixtureController`` (online influence, training losses, decisions).

    Args:
        controller (MixtureController): The controller; its loader's DataLoader must feed the trainer.
    """

    def __init__(self, controller):
        self.controller = controller
        self._observing: contextlib.ExitStack | None = None
        self._global_step = 0
        self._unmeasured = None  # the MixtureDataLoader whose read-ahead is measured at the next batch

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.optimizers:
            self.controller.bind_optimizer(trainer.optimizers[0])
        dataloader = trainer.train_dataloader
        if isinstance(getattr(dataloader, "dataset", None), MixtureDataset):
            self._unmeasured = dataloader
        self._global_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._unmeasured is not None:  # the fit's first batch: everything delivered after it is held
            self._unmeasured.held_batches = max(self._unmeasured.batches_delivered - 1, 0)
            self._unmeasured = None
        if not self.controller.online:
            return
        tokens = max(int(loss_mask(batch).sum()), 1)
        scale = 1.0 / (tokens * trainer.accumulate_grad_batches)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # "16-mixed": the precision plugin scales the loss before backward
            scale *= float(scaler.get_scale())
        self._observing = contextlib.ExitStack()
        self._observing.enter_context(self.controller.influence.observe(batch, loss_scale=scale))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._observing is not None:
            self._observing.close()
            self._observing = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and outputs.get("logits") is not None:
            with torch.no_grad():
                self.controller.record_losses(batch, token_cross_entropy(outputs["logits"], batch))
        if trainer.global_step > self._global_step:  # the optimizer stepped (not mid-accumulation)
            self._global_step = trainer.global_step
            self.controller.step(trainer.global_step - 1)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.controller.load_state_dict(state_dict["controller"])
