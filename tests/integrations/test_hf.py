"""A real ``transformers.Trainer.train`` on a local-config GPT-2: weights change, a checkpoint resumes, and
gradient accumulation observes what one larger batch does."""

import copy

import numpy as np
import pytest
import torch
from testkit.domains import write_domains
from testkit.hf_models import tiny_gpt2
from transformers import TrainingArguments

from tikmix_loader import ConfigError, MixtureLoader, StateError
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.influence.task import HFCausalLMTask
from tikmix_loader.integrations.hf import STATE_FILE, TikMixTrainer
from tikmix_loader.losses import IGNORE_INDEX, loss_mask

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


def _trainer(
    domains,
    output_dir,
    *,
    max_steps=8,
    save_steps=None,
    batch_size=4,
    accumulation=1,
    label_convention="hf",
    preconditioner="kfac",
):
    """A dropout-free GPT-2 trained ``max_steps`` steps, deciding with TiKMiX-D every 3, on batches of
    ``batch_size`` accumulated ``accumulation`` times per optimizer step; a checkpoint every ``save_steps``
    steps when given."""
    loader = MixtureLoader(
        domains,
        batch_size=batch_size,
        seq_len=SEQ_LEN,
        seed=2,
        num_workers=0,
        label_convention=label_convention,
    )
    model = tiny_gpt2(seq_len=SEQ_LEN)
    influence = GroupInfluence(
        model,
        task=HFCausalLMTask(),
        k=8,
        preconditioner=preconditioner,
        domains=loader.domain_names,
        backend="torch",
    )
    targets = {"b": [loader.sample_domain("b", 4, seed=5)]}
    controller = MixtureController(
        loader, "tikmix_d", influence=influence, targets=targets, schedule=every(3)
    )
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **saving,
    )
    return RecordingTrainer(model=model, args=args, controller=controller)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("data"), {"a": 30, "b": 40, "c": 25}, max_len=60)


def test_train_changes_weights_and_resumes_from_a_trainer_checkpoint(domains, tmp_path):
    straight = _trainer(domains, tmp_path / "straight", save_steps=4)
    loader = straight.controller.loader
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

    resumed = _trainer(domains, tmp_path / "resumed", save_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.batches) == 4
    for got, expected in zip(resumed.batches, straight.batches[4:], strict=True):
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert resumed.controller.loader.state_dict()["weight_history"] == history
    assert resumed.controller.decisions == 2


def test_adam_influence_reads_the_trainers_optimizer(domains, tmp_path):
    trainer = _trainer(domains, tmp_path / "adam", max_steps=4, preconditioner="adam")
    trainer.train()
    influence = trainer.controller.influence
    assert influence.optimizer is trainer.optimizer and trainer.controller.decisions == 1
    assert influence.steps == 3  # the first step ran before the optimizer had second moments: not observed
    values = trainer.controller.last_influence.values
    assert trainer.controller.last_influence.preconditioner == "adam"
    assert np.isfinite(values).all() and np.any(values != 0)


def test_trainer_refuses_shifted_labels(domains, tmp_path):
    with pytest.raises(ConfigError, match=r"label_convention='shifted'.*label_convention='hf'"):
        _trainer(domains, tmp_path, label_convention="shifted")


@pytest.mark.parametrize("replacement", ["label_smoothing_factor", "compute_loss_func"])
def test_trainer_refuses_a_loss_other_than_the_models_cross_entropy(domains, tmp_path, replacement):
    # Either pops `labels` from the batch in Trainer.compute_loss (record_losses then finds none) and
    # backpropagates another loss than the cross-entropy the influence statistics are scaled for.
    loader = MixtureLoader(domains, batch_size=4, seq_len=SEQ_LEN, num_workers=0, label_convention="hf")
    smoothing = 0.1 if replacement == "label_smoothing_factor" else 0.0
    args = TrainingArguments(
        str(tmp_path), max_steps=2, report_to=[], use_cpu=True, label_smoothing_factor=smoothing
    )
    options = {}
    if replacement == "compute_loss_func":
        options["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum()
    with pytest.raises(
        ConfigError, match=rf"\['{replacement}'\] replace the model's next-token cross-entropy"
    ):
        TikMixTrainer(
            model=tiny_gpt2(seq_len=SEQ_LEN),
            args=args,
            controller=MixtureController(loader, "natural"),
            **options,
        )


def test_resume_from_a_checkpoint_without_loader_state_names_the_file(domains, tmp_path):
    trainer = _trainer(domains, tmp_path / "run")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(StateError, match=rf"foreign/{STATE_FILE} is missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "foreign"))


def test_accumulating_two_batches_of_four_decides_like_one_batch_of_eight(domains, tmp_path):
    # Two batches of 4 hold the same samples as one batch of 8 (the loader's quotas carry over), so the
    # training losses, the influence statistics and the decisions must agree, up to float summation order.
    runs = [
        _trainer(domains, tmp_path / f"{b}x{n}", max_steps=6, batch_size=b, accumulation=n)
        for b, n in ((8, 1), (4, 2))
    ]
    for trainer in runs:
        trainer.train()
    one, accumulated = runs
    assert len(one.batches) == 6 and len(accumulated.batches) == 12
    assert one.controller.decisions == accumulated.controller.decisions == 2
    for expected, got in zip(one.contexts, accumulated.contexts, strict=True):
        np.testing.assert_allclose(got.domain_losses, expected.domain_losses, rtol=1e-5)
        np.testing.assert_allclose(got.influence, expected.influence, rtol=1e-3, atol=1e-6)
    # The statistics behind the influence: per-domain projected gradients, token counts, curvature sums.
    _assert_same_statistics(accumulated.controller.influence, one.controller.influence, rtol=1e-3)
    # The same weights, from the same sample on (a change at batch i of 8 is one at batch 2i of 4).
    histories = [trainer.controller.loader.state_dict()["weight_history"] for trainer in runs]
    assert [index for index, _ in histories[1]] == [2 * index for index, _ in histories[0]] == [0, 6, 12]
    # The solver amplifies the 1e-6 float-summation differences of the statistics (seen: 1.2e-6 on a weight).
    np.testing.assert_allclose(
        [weights for _, weights in histories[1]], [weights for _, weights in histories[0]], atol=1e-4
    )
    assert histories[0][1][1] != histories[0][0][1]  # the decisions did change the weights


def _assert_same_statistics(got: GroupInfluence, expected: GroupInfluence, *, rtol: float) -> None:
    got_stats, expected_stats = (gi.state_dict()["statistics"] for gi in (got, expected))
    for key, value in expected_stats.items():
        pairs = (
            zip(value, got_stats[key], strict=True) if isinstance(value, list) else [(value, got_stats[key])]
        )
        for e, g in pairs:
            torch.testing.assert_close(
                g, e, rtol=rtol, atol=1e-6, msg=lambda m, key=key: f"statistic {key}: {m}"
            )


@pytest.mark.parametrize("reduction", ["last_accumulation_of_one_batch", "tokens_of_two_processes", "fp16"])
def test_training_step_observes_the_summed_loss_gradient_whatever_the_trainer_scales(
    domains, tmp_path, monkeypatch, reduction
):
    # Whatever factor the Trainer's backpropagated loss carries, the online statistics of one micro-batch
    # are those of a plain observe around the batch's mean loss (independently computed on a copy).
    trainer = _trainer(domains, tmp_path, max_steps=6, accumulation=2)
    reference_model = copy.deepcopy(trainer.model)
    reference = GroupInfluence(
        reference_model,
        task=HFCausalLMTask(),
        k=8,
        domains=trainer.controller.loader.domain_names,
        backend="torch",
    )
    batch = next(iter(trainer.controller.loader))
    tokens = int(loss_mask(batch).sum())
    if reduction == "last_accumulation_of_one_batch":
        # A model without loss kwargs returns its mean; the Trainer divides it by the micro-batches of this
        # accumulation: one, when the data ends after one of the two configured.
        trainer.model_accepts_loss_kwargs = False
        trainer.current_gradient_accumulation_steps = 1
        num_items = None
    elif reduction == "tokens_of_two_processes":
        # average_tokens_across_devices: the count covers both ranks (here as many tokens on the other) and
        # compute_loss multiplies the loss by the 2 processes.
        monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
        num_items = torch.tensor(2 * tokens)
    else:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        num_items = torch.tensor(tokens)
    trainer.training_step(trainer.model, batch, num_items)
    with reference.observe(batch):
        (reference.task.per_token_loss(reference_model, batch).sum() / tokens).backward()
    assert reference.state_dict()["statistics"]["phi"][0].abs().max() > 0
    _assert_same_statistics(trainer.controller.influence, reference, rtol=1e-4)
