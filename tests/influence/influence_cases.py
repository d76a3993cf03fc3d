"""Synthetic byte-level domains and batches for the influence tests: three distinguishable distributions."""

from __future__ import annotations

import torch

from tikmix_loader.losses import IGNORE_INDEX, mark_labels
from tikmix_loader.models import TinyGPT, per_token_loss

KINDS = ("alpha", "digits", "random")


def sequences(kind: str, rows: int, length: int, *, seed: int) -> torch.Tensor:
    """``rows`` token sequences of ``length`` from one distribution.

    ``alpha``: letters a..p, each step +1 (80%) or +3 (20%) mod 16. ``digits``: '0'..'9' with
    ``next = 3 prev + 1 mod 10`` (80%) or a random digit. ``random``: uniform bytes.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, 256, (rows, length), generator=gen)
    out = torch.empty(rows, length, dtype=torch.long)
    size, base = (16, ord("a")) if kind == "alpha" else (10, ord("0"))
    state = torch.randint(0, size, (rows,), generator=gen)
    for t in range(length):
        out[:, t] = base + state
        jump = torch.rand(rows, generator=gen) < 0.8
        if kind == "alpha":
            state = (state + torch.where(jump, 1, 3)) % size
        else:
            state = torch.where(jump, (3 * state + 1) % size, torch.randint(0, size, (rows,), generator=gen))
    return out


def batches(
    kind: str, n: int, *, batch_size: int = 4, seq_len: int = 32, seed: int = 0, domain: int = 0
) -> list[dict]:
    """``n`` loader-style batches (``input_ids``, shifted ``labels``, ``label_shift``, ``domain``)."""
    out = []
    for i in range(n):
        tokens = sequences(kind, batch_size, seq_len + 1, seed=seed * 1000 + i)
        batch = {
            "input_ids": tokens[:, :-1],
            "labels": tokens[:, 1:].clone(),
            "domain": torch.full((batch_size,), domain, dtype=torch.long),
        }
        out.append(mark_labels(batch, "shifted"))
    return out


def with_masks(batch: dict) -> dict:
    """A copy with a loss-masked prefix on row 0, right padding on row 1 and a fully masked last row."""
    batch = {key: value.clone() for key, value in batch.items()}
    batch["labels"][0, :3] = IGNORE_INDEX
    batch["labels"][1, -7:] = IGNORE_INDEX
    batch["input_ids"][1, -6:] = 257
    batch["labels"][-1, :] = IGNORE_INDEX
    return batch


def mixed(batches_by_domain: list[list[dict]], index: int) -> dict:
    """Batch ``index`` of every domain stacked into one mixed batch (rows keep their ``domain``)."""
    parts = [group[index] for group in batches_by_domain]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def train(model: TinyGPT, kinds: tuple[str, ...], *, steps: int, seq_len: int = 32, seed: int = 0) -> TinyGPT:
    """Train ``model`` briefly on an equal mix of ``kinds`` (Adam, lr 3e-3)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = mixed(
            [
                batches(kind, 1, batch_size=8, seq_len=seq_len, seed=seed + 7919 * step + k)
                for k, kind in enumerate(kinds)
            ],
            0,
        )
        loss = per_token_loss(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model
