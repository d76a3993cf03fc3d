"""Label conventions: the loader's two batch layouts, the loss that follows them, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testkit.domains import write_domains

from tikmix_loader import MixtureLoader
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.data.loader import samples_to_batch
from tikmix_loader.errors import LabelConventionError
from tikmix_loader.losses import (
    IGNORE_INDEX,
    LABEL_SHIFT_KEY,
    batch_convention,
    logits_of,
    loss_mask,
    mark_labels,
    next_token_targets,
    per_token_loss,
)
from tikmix_loader.models import TinyGPT

SEQ_LEN = 12


def _samples(valid: list[int], *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``SEQ_LEN + 1`` random tokens with ``valid`` real ones each (PAD 257 after them)."""
    tokens = np.random.default_rng(seed).integers(0, 256, size=(len(valid), SEQ_LEN + 1))
    for row, count in enumerate(valid):
        tokens[row, count:] = 257
    return tokens, np.asarray(valid)


def _batch(convention: str, valid=(SEQ_LEN + 1, 7, 2), *, seed: int = 0) -> dict:
    tokens, valid = _samples(list(valid), seed=seed)
    return samples_to_batch(
        tokens, valid, np.zeros(len(valid), np.int64), needs_mask=True, label_convention=convention
    )


def test_the_two_layouts_label_the_same_tokens():
    tokens, valid = _samples([SEQ_LEN + 1, 7, 2])
    shifted, hf = _batch("shifted"), _batch("hf")
    assert torch.equal(shifted["input_ids"], hf["input_ids"])
    assert torch.equal(shifted["input_ids"], torch.from_numpy(tokens[:, :-1]))
    # shifted: labels[t] = tokens[t + 1] while t + 1 < valid.
    expected_shifted = np.full((3, SEQ_LEN), IGNORE_INDEX)
    # hf: labels[t] = input_ids[t] for 1 <= t < valid (position 0 is never a target).
    expected_hf = np.full((3, SEQ_LEN), IGNORE_INDEX)
    for row, count in enumerate(valid):
        expected_shifted[row, : count - 1] = tokens[row, 1:count][:SEQ_LEN]
        expected_hf[row, 1:count] = tokens[row, 1:count][: SEQ_LEN - 1]
    np.testing.assert_array_equal(shifted["labels"].numpy(), expected_shifted)
    np.testing.assert_array_equal(hf["labels"].numpy(), expected_hf)
    assert shifted[LABEL_SHIFT_KEY].tolist() == [1, 1, 1] and hf[LABEL_SHIFT_KEY].tolist() == [0, 0, 0]
    assert batch_convention(shifted) == "shifted" and batch_convention(hf) == "hf"
    # Position-aligned targets agree except the full row's last position, which only "shifted" can label.
    targets_shifted, targets_hf = next_token_targets(shifted), next_token_targets(hf)
    assert torch.equal(targets_shifted[:, :-1], targets_hf[:, :-1])
    assert targets_hf[:, -1].tolist() == [IGNORE_INDEX] * 3 and targets_shifted[0, -1] == tokens[0, -1]
    # Under both conventions `labels != IGNORE_INDEX` counts exactly the loss tokens.
    for batch in (shifted, hf):
        assert loss_mask(batch).sum(1).tolist() == (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert loss_mask(shifted).sum(1).tolist() == [SEQ_LEN, 6, 1]
    assert loss_mask(hf).sum(1).tolist() == [SEQ_LEN - 1, 6, 1]


def test_tiny_gpt_gives_the_same_loss_under_both_conventions():
    model = TinyGPT.from_preset("micro", seed=0).requires_grad_(False)
    padded = (SEQ_LEN, 7, 2)  # no full window: both conventions label exactly the same tokens
    shifted, hf = _batch("shifted", padded, seed=3), _batch("hf", padded, seed=3)
    loss_shifted, loss_hf = per_token_loss(model, shifted), per_token_loss(model, hf)
    torch.testing.assert_close(loss_hf, loss_shifted, rtol=0, atol=0)
    assert float(loss_hf.sum()) > 0
    mean = lambda losses, batch: float(losses.sum() / loss_mask(batch).sum())
    assert mean(loss_hf, hf) == pytest.approx(mean(loss_shifted, shifted), rel=1e-7)
    # A full window: equal everywhere but the last position, which "hf" leaves unlabelled.
    full_shifted, full_hf = _batch("shifted", seed=4), _batch("hf", seed=4)
    loss_shifted, loss_hf = per_token_loss(model, full_shifted), per_token_loss(model, full_hf)
    torch.testing.assert_close(loss_hf[:, :-1], loss_shifted[:, :-1], rtol=0, atol=0)
    assert loss_hf[0, -1] == 0 and loss_shifted[0, -1] > 0


def test_the_loss_reads_the_convention_from_each_row():
    shifted, hf = _batch("shifted", seed=5), _batch("hf", seed=5)
    mixed = {key: torch.cat([shifted[key], hf[key]]) for key in shifted}
    targets = next_token_targets(mixed)
    assert torch.equal(targets[:3], next_token_targets(shifted))
    assert torch.equal(targets[3:], next_token_targets(hf))
    with pytest.raises(LabelConventionError, match=r"rows follow different label conventions .*\[0, 1\]"):
        batch_convention(mixed)
    # Mislabelled: hf labels declared "shifted" predict the current token, a different loss.
    model = TinyGPT.from_preset("micro", seed=0)
    wrong = mark_labels(hf, "shifted")
    assert not torch.allclose(per_token_loss(model, wrong)[:, 1:-1], per_token_loss(model, hf)[:, :-2])


def test_loader_batches_record_their_convention(tmp_path):
    domains = write_domains(tmp_path, {"a": 40, "b": 40})
    shifted = MixtureLoader(domains, batch_size=4, seq_len=SEQ_LEN, seed=0, num_workers=0)
    hf = MixtureLoader(domains, batch_size=4, seq_len=SEQ_LEN, seed=0, num_workers=0, label_convention="hf")
    assert (shifted.label_convention, hf.label_convention) == ("shifted", "hf")
    for a, b in zip(shifted, hf):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert batch_convention(a) == "shifted" and batch_convention(b) == "hf"
        assert torch.equal(b["labels"][:, 1:], b["input_ids"][:, 1:])  # packed: every later token counts
        assert torch.equal(a["labels"][:, :-1], b["labels"][:, 1:])
        break
    sample = hf.sample_batches("a", 6, batch_size=4)
    assert [batch[LABEL_SHIFT_KEY].tolist() for batch in sample] == [[0] * 4, [0] * 2]


def test_controller_counts_loss_tokens_by_the_batch_convention(tmp_path):
    domains = write_domains(tmp_path, {"a": 40, "b": 40})
    loader = MixtureLoader(domains, batch_size=3, seq_len=SEQ_LEN, num_workers=0)
    controller = MixtureController(loader, "natural", schedule=every(100))
    for convention in ("shifted", "hf"):
        batch = _batch(convention)
        with torch.no_grad():
            controller.record_losses(batch, per_token_loss(TinyGPT.from_preset("micro", seed=0), batch))
    # shifted rows count 12 + 6 + 1 tokens, hf rows 11 + 6 + 1; both batches are domain 0.
    assert controller.state_dict()["loss_tokens"] == [37.0, 0.0]


def test_convention_errors_name_the_fix(tmp_path):
    domains = write_domains(tmp_path, {"a": 10})
    with pytest.raises(
        LabelConventionError, match=r"`label_convention` must be one of \['hf', 'shifted'\], got 'HF'"
    ):
        MixtureLoader(domains, batch_size=2, seq_len=SEQ_LEN, label_convention="HF")
    batch = _batch("shifted")
    del batch[LABEL_SHIFT_KEY]
    with pytest.raises(LabelConventionError, match=r"needs `labels` and `label_shift`.*mark_labels"):
        loss_mask(batch)
    batch[LABEL_SHIFT_KEY] = torch.tensor([2, 1, 1])
    with pytest.raises(LabelConventionError, match=r"one 0 \('hf'\) or 1 \('shifted'\) per row.*\[2, 1, 1\]"):
        loss_mask(batch)
    with pytest.raises(LabelConventionError, match=r"cannot find \[B, T, vocab\] logits in .* dict"):
        logits_of({"loss": torch.zeros(())})
    assert issubclass(LabelConventionError, ValueError)
