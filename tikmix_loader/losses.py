"""Label conventions of causal-LM batches and the per-token next-token loss that follows them.

Two conventions exist in the wild, and a batch must say which one its ``labels`` follow:

- ``"shifted"`` (nanoGPT, torchtitan, this project's ``TinyGPT``): ``labels[b, t]`` is the token that position
  ``t`` predicts, so ``labels[:, :-1] == input_ids[:, 1:]``. The loss is ``cross_entropy(logits, labels)``.
- ``"hf"`` (Hugging Face causal LMs): ``labels`` are aligned with ``input_ids`` (``labels == input_ids``
  where not masked) and the model shifts them itself: position ``t`` predicts ``labels[b, t + 1]``. Position
  0 is never a target, so the loader masks it too; then ``labels != IGNORE_INDEX`` counts exactly the loss
  tokens under either convention (HF ``Trainer`` counts ``num_items_in_batch`` that way).

Every batch the loader builds carries ``label_shift`` (``LABEL_SHIFT_KEY``), a LongTensor ``[B]`` holding
how far each row's labels are already shifted: 1 for ``"shifted"``, 0 for ``"hf"``. One value per row keeps
it valid through everything trainers do to a batch (row slicing, micro-batch splits, ``torch.cat``,
``.to(device)``), and Hugging Face models accept it (their ``forward(**batch)`` passes unknown keyword
arguments on to the loss function, which ignores them). Code here reads that key and never guesses: a batch
without it raises ``LabelConventionError``; ``mark_labels`` adds it to a hand-built batch.

All losses here are position-aligned: entry ``[b, t]`` is the loss of the prediction made at position ``t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tikmix_loader.errors import LabelConventionError

IGNORE_INDEX = -100
LABEL_SHIFT_KEY = "label_shift"
LABEL_SHIFTS = {"hf": 0, "shifted": 1}
LABEL_CONVENTIONS = tuple(sorted(LABEL_SHIFTS))


def check_convention(label_convention: str, *, what: str = "label_convention") -> int:
    """The ``label_shift`` of a convention name.

    Raises:
        LabelConventionError: the name is not ``"hf"`` or ``"shifted"``.
    """
    if label_convention not in LABEL_SHIFTS:
        raise LabelConventionError(
            f"`{what}` must be one of {list(LABEL_CONVENTIONS)}, got {label_convention!r}: use 'hf' for "
            "Hugging Face causal LMs (they shift labels inside the model), 'shifted' for models that take "
            "labels already shifted (nanoGPT, torchtitan, TinyGPT)"
        )
    return LABEL_SHIFTS[label_convention]


def mark_labels(batch: dict, label_convention: str) -> dict:
    """A shallow copy of ``batch`` recording that its ``labels`` follow ``label_convention``.

    For batches built by hand; the loader's batches already carry the key.
    """
    shift = check_convention(label_convention)
    rows = batch["labels"].shape[0]
    device = batch["labels"].device
    return {**batch, LABEL_SHIFT_KEY: torch.full((rows,), shift, dtype=torch.long, device=device)}


def label_shifts(batch: dict) -> torch.Tensor:
    """The batch's ``label_shift`` [B] (0 = ``"hf"``, 1 = ``"shifted"``), checked.

    Raises:
        LabelConventionError: the batch has no ``labels`` or no ``label_shift``, or a value other than 0 or 1.
    """
    labels, shift = batch.get("labels"), batch.get(LABEL_SHIFT_KEY)
    if labels is None or shift is None:
        raise LabelConventionError(
            f"a batch needs `labels` and `{LABEL_SHIFT_KEY}` (which label convention the labels follow), got "
            f"keys {sorted(batch)}; build batches with MixtureLoader(..., label_convention=...) or mark a "
            "hand-built batch with tikmix_loader.losses.mark_labels(batch, 'hf' | 'shifted')"
        )
    shift = torch.as_tensor(shift).reshape(-1)
    if shift.numel() != labels.shape[0] or bool(((shift != 0) & (shift != 1)).any()):
        raise LabelConventionError(
            f"batch `{LABEL_SHIFT_KEY}` must hold one 0 ('hf') or 1 ('shifted') per row of `labels` "
            f"{tuple(labels.shape)}, got {shift.tolist()}; rebuild it with mark_labels(batch, convention)"
        )
    return shift


def batch_convention(batch: dict) -> str:
    """The label convention every row of ``batch`` follows (``"hf"`` or ``"shifted"``).

    Raises:
        LabelConventionError: no convention is recorded, or the rows disagree.
    """
    values = set(label_shifts(batch).tolist())
    if len(values) != 1:
        raise LabelConventionError(
            f"batch rows follow different label conventions ({LABEL_SHIFT_KEY} values {sorted(values)}); "
            "build every row with the same MixtureLoader(label_convention=...)"
        )
    return {shift: name for name, shift in LABEL_SHIFTS.items()}[values.pop()]


def next_token_targets(batch: dict) -> torch.Tensor:
    """Position-aligned targets [B, T]: the token each position predicts, ``IGNORE_INDEX`` where masked."""
    labels = batch["labels"]
    shift = label_shifts(batch).to(labels.device)
    ignored = torch.full_like(labels[:, :1], IGNORE_INDEX)
    realigned = torch.cat([labels[:, 1:], ignored], dim=1)  # "hf": position t predicts labels[t + 1]
    return torch.where(shift[:, None].bool(), labels, realigned)


def loss_mask(batch: dict) -> torch.Tensor:
    """[B, T] bool: True where a position's prediction counts in the loss (under the batch's convention)."""
    return next_token_targets(batch) != IGNORE_INDEX


def logits_of(output) -> torch.Tensor:
    """The logits in a model output: the tensor itself, its ``.logits`` (Hugging Face) or its first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]  # nanoGPT-style (logits, loss) tuples
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise LabelConventionError(
            f"cannot find [B, T, vocab] logits in a model output of type {type(output).__name__}; return the "
            "logits, an object with `.logits`, or a tuple starting with them, or pass your own loss_fn"
        )
    return logits


def token_cross_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-position next-token cross-entropy [B, T] float32 of ``logits`` [B, T, V]; 0 where masked."""
    targets = next_token_targets(batch).to(logits.device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return loss.view(targets.shape)


def per_token_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of every position: [B, T] float32, 0 where the loss is masked.

    Calls ``model(input_ids)`` (moved to the model's device) and reads the logits from its output (a tensor,
    a Hugging Face output's ``.logits`` or a tuple's first item); the targets follow the batch's
    ``label_shift``. The default loss of ``GroupInfluence`` and ``MixtureController``.
    """
    device = next(model.parameters()).device
    return token_cross_entropy(logits_of(model(batch["input_ids"].to(device))), batch)
