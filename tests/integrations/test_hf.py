"""A real ``transformers.Trainer.train`` on a local-config GPT-2: weights change, a checkpoint resumes."""

import numpy as np
import pytest
import torch
from testkit.domains import write_domains
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from tikmix_loader import ConfigError, MixtureLoader, StateError
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.influence.task import HFCausalLMTask
from tikmix_loader.integrations.hf import STATE_FILE, TikMixTrainer
from tikmix_loader.losses import IGNORE_INDEX

SEQ_LEN = 16


class RecordingTrainer(TikMixTrainer):
    """Keeps every training batch and every decision's mixing context (what the mixer saw)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.contexts = [], []
        propose = self.controller.mixer.propose
        self.controller.mixer.propose = lambda context: self.contexts.append(context) or propose(context)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({key: value.clone() for key, value in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def _model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=258, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def _trainer(domains, output_dir, *, label_convention="hf"):
    loader = MixtureLoader(
        domains, batch_size=4, seq_len=SEQ_LEN, seed=2, num_workers=0, label_convention=label_convention
    )
    model = _model()
    influence = GroupInfluence(
        model, task=HFCausalLMTask(), k=8, domains=loader.domain_names, backend="torch"
    )
    targets = {"b": [loader.sample_domain("b", 4, seed=5)]}
    controller = MixtureController(
        loader, "tikmix_d", influence=influence, targets=targets, schedule=every(3)
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=8,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return RecordingTrainer(model=model, args=args, controller=controller), loader


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("data"), {"a": 30, "b": 40, "c": 25}, max_len=60)


def test_train_changes_weights_and_resumes_from_a_trainer_checkpoint(domains, tmp_path):
    straight, loader = _trainer(domains, tmp_path / "straight")
    initial = loader.weights
    straight.train()
    history = loader.state_dict()["weight_history"]
    assert straight.controller.decisions == 2 and len(history) == 3 and loader.weights != initial
    # HF's convention: labels aligned with input_ids (the model shifts them), position 0 masked.
    batch = straight.batches[0]
    kept = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][kept], batch["input_ids"][kept]) and not kept[:, 0].any()
    # Training losses reach the controller: the first decision sees every domain's mean loss (ln 258 ~ 5.6).
    losses = np.asarray(straight.contexts[0].domain_losses)
    assert np.isfinite(losses).all() and ((losses > 4) & (losses < 7)).all()
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    assert (checkpoint / STATE_FILE).exists()

    resumed, resumed_loader = _trainer(domains, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.batches) == 4
    for got, expected in zip(resumed.batches, straight.batches[4:], strict=True):
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert resumed_loader.state_dict()["weight_history"] == history
    assert resumed.controller.decisions == 2


def test_trainer_refuses_shifted_labels(domains, tmp_path):
    with pytest.raises(ConfigError, match=r"label_convention='shifted'.*label_convention='hf'"):
        _trainer(domains, tmp_path, label_convention="shifted")


def test_resume_from_a_checkpoint_without_loader_state_names_the_file(domains, tmp_path):
    trainer, _ = _trainer(domains, tmp_path / "run")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(StateError, match=rf"foreign/{STATE_FILE} is missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "foreign"))
