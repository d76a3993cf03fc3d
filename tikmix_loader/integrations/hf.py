"""``TikMixTrainer``: a Hugging Face ``transformers.Trainer`` fed and re-mixed by a ``MixtureController``.

Use it in place of ``Trainer``; it takes the controller (whose loader must be built with
``label_convention="hf"``, the convention HF causal LMs expect) and needs ``max_steps`` (the loader is
endless)::

    loader = MixtureLoader(domains, batch_size=8, seq_len=512, label_convention="hf")
    influence = GroupInfluence(model, task=HFCausalLMTask(), domains=loader.domain_names)
    controller = MixtureController(loader, "tikmix_d", influence=influence, targets=targets)
    trainer = TikMixTrainer(model=model, args=TrainingArguments(..., max_steps=10_000), controller=controller)
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

What the subclass changes, and why (HF ``Trainer`` has no callback event around backward, and callbacks see
neither the batch nor the outputs):

- ``get_train_dataloader`` returns ``loader.as_dataloader()`` (``dataloader_num_workers`` and
  ``dataloader_pin_memory`` are passed on). It is not passed through ``accelerator.prepare``: the loader
  already gives each rank its own slice of every global batch.
- ``training_step`` runs inside ``influence.observe`` (online influence reads the training backward) with
  the ``loss_scale`` the Trainer's loss applies to the micro-batch's summed token losses:
  ``1 / num_items_in_batch`` when the Trainer counts loss tokens over the accumulated batch (models that
  take loss kwargs, such as GPT-2 and Llama), times the number of processes under
  ``average_tokens_across_devices`` (the count is then over every rank); else the micro-batch's mean
  divided by the accumulation's micro-batches; times the fp16 GradScaler's scale. So the per-domain
  statistics of ``gradient_accumulation_steps=n`` with batches of ``b`` equal those of one batch of
  ``n * b``. Each micro-batch is one ``observe`` step: an influence ``half_life`` counts micro-batches.
- ``compute_loss`` also passes the per-token loss of the model's logits to ``controller.record_losses``.
  The loss must be the model's own next-token cross-entropy: ``label_smoothing_factor`` and
  ``compute_loss_func`` raise ``ConfigError``.
- ``TikMixCallback.on_train_begin`` hands the Trainer's optimizer to the controller (``bind_optimizer``:
  the influence engine's ``"adam"`` preconditioner reads its second moments).
- ``TikMixCallback.on_step_end`` lets the controller decide after the optimizer step, so new weights apply
  from the next step's batch, before the Trainer saves a checkpoint at that step; ``on_save`` writes the
  loader and controller state to ``tikmix_state.pt`` in the checkpoint folder, and ``train`` loads it from
  ``resume_from_checkpoint`` (a path, or ``True`` for the last checkpoint in ``output_dir``), so a resumed run
  continues the same batch stream and weight history. The Trainer's own batch skipping on resume is turned
  off (``ignore_data_skip``): the loader resumes from its state without reading the skipped batches. The
  Trainer restores the checkpoint's RNG state only when it skips batches, so ``training_step`` restores it
  (through the Trainer's ``_load_rng_state``) before the first resumed step; dropout then matches too.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from tikmix_loader.errors import ConfigError, StateError
from tikmix_loader.losses import logits_of, loss_mask, token_cross_entropy

STATE_FILE = "tikmix_state.pt"


class TikMixCallback(TrainerCallback):
    """Binds the optimizer, decides after each optimizer step and saves the loader and controller state with
    each checkpoint.

    Args:
        controller (MixtureController): The controller; its loader must feed the trainer.
    """

    def __init__(self, controller):
        self.controller = controller

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # the Trainer creates (and wraps) it before this event
            self.controller.bind_optimizer(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step(state.global_step - 1)  # the Trainer has already counted the finished step

    def on_save(self, args, state, control, **kwargs):
        controller_state = self.controller.state_dict()  # collective under torch.distributed: every rank
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(
                {"loader": self.controller.loader.state_dict(), "controller": controller_state},
                os.path.join(folder, STATE_FILE),
            )


class TikMixTrainer(Trainer):
    """A ``transformers.Trainer`` whose training data and mixture come from ``controller`` (see the module).

    Args:
        *args: Passed to ``Trainer`` (``model``, ``args``, ...). Leave ``train_dataset`` unset.
        controller (MixtureController): Drives the weights of ``controller.loader``, which must have
            ``label_convention="hf"``.
        **kwargs: Passed to ``Trainer``.
    """

    def __init__(self, *args, controller, **kwargs):
        convention = controller.loader.label_convention
        if convention != "hf":
            raise ConfigError(
                f"TikMixTrainer: the loader has label_convention={convention!r}, but Hugging Face causal LMs "
                f"shift labels themselves; build it with MixtureLoader(..., label_convention='hf')."
            )
        super().__init__(*args, **kwargs)
        replaced = {
            "label_smoothing_factor": self.label_smoother,
            "compute_loss_func": self.compute_loss_func,
        }
        replaced = [name for name, value in replaced.items() if value is not None]
        if replaced:
            raise ConfigError(
                f"TikMixTrainer: {replaced} replace the model's next-token cross-entropy (and take `labels` "
                "out of the batch), but the controller's training losses and the influence statistics are "
                "defined on that cross-entropy; train without them."
            )
        self.controller = controller
        self.args.ignore_data_skip = True  # the loader resumes from its own state (see the module docstring)
        self.add_callback(TikMixCallback(controller))
        self._rng_checkpoint: str | None = None  # restore its RNG state before the first resumed step

    def get_train_dataloader(self):
        options = {
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
        }
        if self.args.dataloader_num_workers > 0:
            options["prefetch_factor"] = self.args.dataloader_prefetch_factor
            options["persistent_workers"] = self.args.dataloader_persistent_workers
        return self.controller.loader.as_dataloader(**options)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._rng_checkpoint is not None:
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        if not self.controller.online:
            return super().training_step(model, inputs, num_items_in_batch)
        scale = self._loss_scale(inputs, num_items_in_batch)
        with self.controller.influence.observe(inputs, loss_scale=scale):
            return super().training_step(model, inputs, num_items_in_batch)

    def _loss_scale(self, inputs, num_items_in_batch) -> float:
        """The factor the loss ``Trainer.training_step`` backpropagates applies to the sum of this
        micro-batch's per-token losses (the reductions of ``compute_loss``, ``training_step`` and
        ``accelerator.backward`` in transformers 4.57)."""
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # The model sums the per-token losses and divides by the loss tokens of the whole accumulated
            # batch; with average_tokens_across_devices that count is over every rank and compute_loss
            # multiplies the loss by the number of processes (DDP's gradient average then undoes it).
            scale = 1.0 / max(float(num_items_in_batch), 1.0)
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
        else:
            # A per-micro-batch mean, divided by the micro-batches of this accumulation (fewer than
            # gradient_accumulation_steps when the data ends mid-accumulation).
            tokens = max(int(loss_mask(inputs).sum()), 1)
            scale = 1.0 / (tokens * self.current_gradient_accumulation_steps)
        if self.accelerator.scaler is not None:  # fp16: accelerator.backward scales the loss
            scale *= float(self.accelerator.scaler.get_scale())
        return scale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.no_grad():
            self.controller.record_losses(inputs, token_cross_entropy(logits_of(outputs), inputs))
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; with ``resume_from_checkpoint`` the loader and controller resume too."""
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise StateError(
                        f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint folder; "
                        f"pass a checkpoint path or resume_from_checkpoint=None."
                    )
            path = os.path.join(folder, STATE_FILE)
            if not os.path.exists(path):
                raise StateError(
                    f"{path} is missing: checkpoint {folder} was not written by TikMixTrainer, so the loader "
                    f"and controller cannot resume; resume from a TikMixTrainer checkpoint."
                )
            state = torch.load(path, weights_only=False)
            self.controller.loader.load_state_dict(state["loader"])
            self.controller.load_state_dict(state["controller"])
            self._rng_checkpoint = folder
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
