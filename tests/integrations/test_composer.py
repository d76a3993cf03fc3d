"""A real ``composer.Trainer.fit`` with MixtureLoader and TikMixCallback: weights change, resume exactly; and
the callback's loss scale under Composer's microbatch and fp16 scaling."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, Precision
from composer.models import ComposerModel
from testkit.domains import write_domains

from tikmix_loader import MixtureLoader
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.integrations.composer import TikMixCallback
from tikmix_loader.ledger import MixtureLedger
from tikmix_loader.losses import loss_mask, per_token_loss
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT

pytestmark = pytest.mark.composer
SEQ_LEN = 16


class ComposerTinyGPT(ComposerModel):
    def __init__(self):
        super().__init__()
        self.model = TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=0)

    def forward(self, batch):
        return self.model(batch["input_ids"])

    def loss(self, outputs, batch):
        return F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100
        )


class RecordBatches(Callback):
    def __init__(self):
        self.batches = []
        self.contexts = []  # the MixingContext of every decision

    def after_dataloader(self, state, logger):
        self.batches.append(state.batch["input_ids"].clone())


def _recording(propose, recorder):
    def recorded(context):
        recorder.contexts.append(context)
        return propose(context)

    return recorded


def _trainer(domains, tmp_path, ledger_name, *, preconditioner="kfac", **options):
    torch.manual_seed(0)
    loader = MixtureLoader(domains, batch_size=6, seq_len=SEQ_LEN, seed=2, num_workers=1)
    model = ComposerTinyGPT()
    targets = {"b": [loader.sample_domain("b", 4, seed=5)]}
    influence = GroupInfluence(
        model.model, k=8, preconditioner=preconditioner, domains=loader.domain_names, backend="torch"
    )
    controller = MixtureController(
        loader,
        "tikmix_d",
        influence=influence,
        targets=targets,
        schedule=every(3),
        ledger=MixtureLedger(tmp_path / ledger_name),
    )
    controller.mixer.propose = _recording(controller.mixer.propose, recorder := RecordBatches())
    trainer = Trainer(
        model=model,
        train_dataloader=loader.as_dataloader(),
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        callbacks=[TikMixCallback(controller), recorder],
        device="cpu",
        device_train_microbatch_size=6,  # the DataLoader yields whole batches (batch_size=None)
        progress_bar=False,
        log_to_console=False,
        save_folder=str(tmp_path / "checkpoints"),
        save_interval="5ba",
        save_filename="ba{batch}.pt",
        **options,
    )
    return trainer, loader, recorder


def test_fit_changes_weights_checkpoints_and_resumes_the_same_stream(tmp_path):
    (tmp_path / "data").mkdir()
    domains = write_domains(tmp_path / "data", {"a": 30, "b": 40, "c": 25}, max_len=60)

    straight, straight_loader, straight_batches = _trainer(
        domains, tmp_path / "straight", "ledger.jsonl", max_duration="10ba"
    )
    initial = straight_loader.weights
    straight.fit()
    history = straight_loader.state_dict()["weight_history"]
    assert len(history) >= 3 and straight_loader.weights != initial  # decisions after batches 3, 6 and 9
    assert (tmp_path / "straight" / "checkpoints" / "ba5.pt").exists()
    # The callback records training losses: the first decision sees each domain's mean training loss since
    # the start (ODM's input), not NaN.
    assert len(straight_batches.contexts) == 3
    losses = np.asarray(straight_batches.contexts[0].domain_losses)
    assert np.isfinite(losses).all() and (losses > 2).all()
    straight.close()

    # A crashed run left its ledger with every decision, also those after the checkpoint written at batch 5.
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ledger.jsonl", tmp_path / "resumed" / "ledger.jsonl")
    shutil.copy(tmp_path / "straight" / "ledger.jsonl.head", tmp_path / "resumed" / "ledger.jsonl.head")
    # Resuming from that checkpoint cuts the ledger back to it and finishes the same 10 batches.
    resumed, resumed_loader, resumed_batches = _trainer(
        domains,
        tmp_path / "resumed",
        "ledger.jsonl",
        max_duration="10ba",
        load_path=str(tmp_path / "straight" / "checkpoints" / "ba5.pt"),
    )
    resumed.fit()
    assert len(resumed_batches.batches) == 5
    for got, expected in zip(resumed_batches.batches, straight_batches.batches[5:]):
        assert torch.equal(got, expected)
    assert resumed_loader.state_dict()["weight_history"] == history
    assert (tmp_path / "resumed" / "ledger.jsonl").read_bytes() == (
        tmp_path / "straight" / "ledger.jsonl"
    ).read_bytes()
    resumed.close()


def test_adam_influence_reads_the_trainers_optimizer(tmp_path):
    (tmp_path / "data").mkdir()
    domains = write_domains(tmp_path / "data", {"a": 30, "b": 40, "c": 25}, max_len=60)
    trainer, _, recorder = _trainer(
        domains, tmp_path / "adam", "ledger.jsonl", preconditioner="adam", max_duration="4ba"
    )
    trainer.fit()
    callback = next(c for c in trainer.state.callbacks if isinstance(c, TikMixCallback))
    influence = callback.controller.influence
    assert influence.optimizer is trainer.state.optimizers[0] and len(recorder.contexts) == 1
    assert influence.steps == 3  # the first batch ran before the optimizer had second moments
    assert callback.controller.last_influence.preconditioner == "adam"
    assert np.isfinite(callback.controller.last_influence.values).all()
    trainer.close()


@pytest.mark.parametrize("precision", ["fp32", "amp_fp16"])
def test_microbatch_statistics_are_those_of_its_mean_loss_whatever_composer_scales(tmp_path, precision):
    # Composer's _train_microbatch backpropagates each microbatch's mean loss times microbatch/batch rows
    # and, under amp_fp16, times the GradScaler's scale (1024 here); replayed on a 6-row batch in two
    # microbatches, the statistics must equal a plain observe of each microbatch's mean loss on a copy.
    domains = write_domains(tmp_path, {"a": 30, "b": 40, "c": 25}, max_len=60)
    loader = MixtureLoader(domains, batch_size=6, seq_len=SEQ_LEN, seed=2, num_workers=0)
    batch = next(iter(loader))
    models = [TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=0) for _ in range(2)]
    trained, reference = (
        GroupInfluence(m, k=8, domains=loader.domain_names, backend="torch") for m in models
    )
    targets = {"b": [loader.sample_domain("b", 4, seed=5)]}
    callback = TikMixCallback(MixtureController(loader, "tikmix_d", influence=trained, targets=targets))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = SimpleNamespace(batch=batch, precision=Precision(precision), scaler=scaler)
    callback.before_train_batch(state, None)
    for rows in (slice(0, 3), slice(3, 6)):
        state.batch = micro = {key: value[rows] for key, value in batch.items()}
        callback.before_forward(state, None)
        loss = ComposerTinyGPT.loss(None, models[0](micro["input_ids"]), micro)
        if precision == "amp_fp16":
            loss = scaler.scale(loss)
        (loss * (3 / 6)).backward()
        callback.after_backward(state, None)
        with reference.observe(micro):
            (per_token_loss(models[1], micro).sum() / loss_mask(micro).sum()).backward()
    got, expected = (engine.state_dict()["statistics"] for engine in (trained, reference))
    assert float(expected["phi"][0].abs().max()) > 0
    for key in ("phi", "b", "tokens"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
