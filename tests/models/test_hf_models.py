"""Hugging Face causal LMs (tiny local configs, random init, no download) train on ``label_convention="hf"``
batches with exactly the next-token loss, and the core loss agrees with theirs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from testkit.corpus import make_text_corpus
from testkit.domains import write_domains
from testkit.hf_models import VOCAB, tiny_gpt2, tiny_llama

from tikmix_loader import MixtureLoader
from tikmix_loader.losses import IGNORE_INDEX, LABEL_SHIFT_KEY, per_token_loss

SEQ_LEN = 16


def hand_computed_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy from ``input_ids`` alone: position t predicts token t + 1 if real."""
    targets = batch["input_ids"][:, 1:]
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), targets.reshape(-1), reduction="none")
    return losses[real.reshape(-1)].mean()


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["packed", "document"])
def test_hf_models_train_on_hf_batches_with_the_next_token_loss(tmp_path, build, mode):
    domains = write_domains(tmp_path, {"a": 30, "b": 30}, mode=mode, max_len=24)
    loader = MixtureLoader(
        domains, batch_size=4, seq_len=SEQ_LEN, seed=0, num_workers=0, label_convention="hf"
    )
    model = build(seq_len=SEQ_LEN)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _, batch in zip(range(3), loader):
        assert set(batch) >= {"input_ids", "labels", LABEL_SHIFT_KEY, "domain"}
        output = model(**batch)  # the extra `label_shift` and `domain` keys are accepted and ignored
        expected = hand_computed_loss(output.logits, batch)
        torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
        ours = per_token_loss(model, batch)  # the core loss reads the batch's convention
        mask_total = (batch["labels"] != IGNORE_INDEX).sum()  # the loss tokens, under either convention
        torch.testing.assert_close(ours.sum() / mask_total, expected, rtol=1e-5, atol=1e-6)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_shifted_batches_would_train_an_hf_model_two_tokens_ahead(tmp_path):
    """The bug the convention fixes: HF shifts "shifted" labels again, so the loss is not next-token."""
    domains = write_domains(tmp_path, {"a": 30})
    loader = MixtureLoader(domains, batch_size=4, seq_len=SEQ_LEN, num_workers=0, label_convention="shifted")
    model = tiny_gpt2(seq_len=SEQ_LEN)
    batch = next(iter(loader))
    with torch.no_grad():
        output = model(**batch)
        assert not torch.allclose(output.loss, hand_computed_loss(output.logits, batch), rtol=1e-3)
        # The core loss follows the batch: the same next-token loss on the positions both cover.
        torch.testing.assert_close(
            per_token_loss(model, batch)[:, :-1].mean(),
            hand_computed_loss(output.logits, batch),
            rtol=1e-5,
            atol=1e-6,
        )


def test_readme_hf_section_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- hf-labels:start -->\s*```python\n(.*?)```\s*<!-- hf-labels:end -->", text, re.S)
    assert block, "README.md lost its hf-labels code block"
    make_text_corpus(tmp_path)  # writes tmp_path/corpus, where the README code looks
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    influence = namespace["influence"]
    assert namespace["loader"].label_convention == "hf" and influence.steps == 3
    assert len(influence.layer_names) == 9  # 4 Conv1D per block and the head
    assert f"9 layers, {influence.tracked_fraction:.0%} of the parameters tracked" in capsys.readouterr().out
