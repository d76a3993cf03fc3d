"""Tasks: what the influence engine needs to know about a model: its loss, what counts, what to track.

Modelled on Kronfluence's ``Task``: a ``Task`` gives the per-token loss of a batch, the mask of positions
whose loss counts, and the modules whose weights are tracked. Two ready implementations:

- ``CausalLMTask`` (the default): ``model(input_ids)`` returns logits, a Hugging Face output with ``.logits``
  or a ``(logits, ...)`` tuple: TinyGPT, nanoGPT-style models, and HF models fed only ``input_ids``.
- ``HFCausalLMTask``: a Hugging Face causal LM called as ``model(input_ids=..., attention_mask=...)`` (the
  mask matters for left padding), reading ``.logits``.

Both take the targets and the mask from the batch's recorded label convention (``tikmix_loader.losses``), so
the same task serves ``"hf"`` and ``"shifted"`` batches. Both track every ``nn.Linear`` and every Hugging Face
``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from tikmix_loader.losses import logits_of, loss_mask, token_cross_entropy


def conv1d_type() -> type | None:
    """Hugging Face's ``Conv1D`` class if transformers is loaded (a model using it has loaded it), else None.

    Looked up instead of imported so the core never imports transformers itself.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (a Linear whose weight is stored ``[in, out]``)."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_trackable(module: nn.Module) -> bool:
    """Whether the influence hooks can track ``module``: an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class Task:
    """How the influence engine runs a model. Subclasses implement ``logits``; the rest has defaults."""

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The model's logits [B, T, vocab] on ``batch``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `logits(model, batch)`")

    def per_token_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Position-aligned next-token cross-entropy [B, T] float32, 0 where masked (reduction none)."""
        return token_cross_entropy(self.logits(model, batch), batch)

    def loss_mask(self, batch: dict) -> torch.Tensor:
        """[B, T] bool: the positions whose loss counts (the batch's label convention decides)."""
        return loss_mask(batch)

    def tracked_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module whose weight may be tracked, in module order."""
        return [(name, module) for name, module in model.named_modules() if is_trackable(module)]


class CausalLMTask(Task):
    """A causal LM called as ``model(input_ids)``: TinyGPT, nanoGPT-style models (the default task)."""

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        return logits_of(model(batch["input_ids"].to(device)))


class HFCausalLMTask(Task):
    """A Hugging Face causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), given its attention mask.

    The model is called without ``labels``, so its own loss is not computed; the per-token loss is the same
    next-token cross-entropy HF's ``ForCausalLMLoss`` averages. A head tied to the input embedding (GPT-2's
    ``lm_head``) is tracked through its use as the head only (``GroupInfluence`` warns; docs/methods.md §2);
    ``exclude=["lm_head"]`` leaves it out.
    """

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device)}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        return logits_of(model(**inputs))
