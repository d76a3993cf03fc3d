"""A real Lightning ``Trainer.fit``: weights change, and ``ckpt_path=`` resumes the same batch stream."""

import lightning.pytorch as pl
import lightning.pytorch.loops.utilities
import lightning.pytorch.plugins.precision
import numpy as np
import pytest
import torch
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
from testkit.domains import write_domains

from tikmix_loader import MixtureLoader
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.integrations.lightning import TikMixLightningCallback
from tikmix_loader.losses import loss_mask, token_cross_entropy
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT

SEQ_LEN = 16


class TinyGPTModule(pl.LightningModule):
    def __init__(self, loader):
        super().__init__()
        self.loader = loader
        self.model = TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=0)
        self.batches, self.contexts = [], []
        self.read_ahead = []  # per trained batch: batches the DataLoader had delivered beyond it

    def train_dataloader(self):
        self.dataloader = self.loader.as_dataloader()
        return self.dataloader

    def training_step(self, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())
        self.read_ahead.append(self.dataloader.batches_delivered - len(self.batches))
        logits = self.model(batch["input_ids"])
        loss = token_cross_entropy(logits, batch).sum() / loss_mask(batch).sum()
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _fit(domains, root, *, max_steps, ckpt_path=None, plugins=None, preconditioner="kfac"):
    loader = MixtureLoader(domains, batch_size=4, seq_len=SEQ_LEN, seed=2, num_workers=0)
    module = TinyGPTModule(loader)
    influence = GroupInfluence(
        module.model, k=8, preconditioner=preconditioner, domains=loader.domain_names, backend="torch"
    )
    targets = {"b": [loader.sample_domain("b", 4, seed=5)]}
    controller = MixtureController(
        loader, "tikmix_d", influence=influence, targets=targets, schedule=every(3)
    )
    propose = controller.mixer.propose
    controller.mixer.propose = lambda context: module.contexts.append(context) or propose(context)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[TikMixLightningCallback(controller), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=plugins,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    module.trainer_optimizer = trainer.optimizers[0]
    return module, loader, controller


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("data"), {"a": 30, "b": 40, "c": 25}, max_len=60)


class DeeperFetcher(_PrefetchDataFetcher):
    """Lightning's fetcher reading two batches ahead instead of its default."""

    def __init__(self):
        super().__init__(prefetch_batches=2)


@pytest.mark.parametrize("depth", [1, 2], ids=["lightning_fetcher", "two_ahead"])
def test_fit_changes_weights_and_resumes_mid_epoch_from_a_checkpoint(domains, tmp_path, monkeypatch, depth):
    # The callback measures how far Lightning's fetcher reads ahead (one batch in the locked Lightning 2.6;
    # two when patched), so the checkpoint's loader state is that of the last trained batch either way.
    if depth == 2:
        monkeypatch.setattr(lightning.pytorch.loops.utilities, "_PrefetchDataFetcher", DeeperFetcher)
    straight, loader, controller = _fit(domains, tmp_path / "straight", max_steps=8)
    assert set(straight.read_ahead) == {depth} and straight.dataloader.held_batches == depth
    history = loader.state_dict()["weight_history"]
    assert controller.decisions == 2 and len(history) == 3
    losses = np.asarray(straight.contexts[0].domain_losses)  # training losses reached the controller
    assert np.isfinite(losses).all() and (losses > 2).all()
    checkpoint = tmp_path / "straight" / "epoch=0-step=4.ckpt"
    assert checkpoint.exists()

    resumed, resumed_loader, resumed_controller = _fit(
        domains, tmp_path / "resumed", max_steps=8, ckpt_path=str(checkpoint)
    )
    assert len(resumed.batches) == 4  # Lightning 2.x resumed at batch 4, not at batch 0 (issue 15)
    for got, expected in zip(resumed.batches, straight.batches[4:], strict=True):
        assert torch.equal(got, expected)
    assert resumed_loader.state_dict()["weight_history"] == history
    assert resumed_controller.decisions == 2


def test_fp16_grad_scaling_does_not_scale_the_online_statistics(domains, tmp_path):
    # "16-mixed" backpropagates the loss times the GradScaler's scale (1024 here); the statistics of the
    # first step must be those of the fp32 run, up to fp16 autocast rounding (1% of the largest entry).
    runs = []
    for name, plugins in (("fp32", None), ("fp16", [_fp16_plugin()])):
        _, _, controller = _fit(domains, tmp_path / name, max_steps=1, plugins=plugins)
        runs.append(controller.influence.state_dict()["statistics"])
    fp32, fp16 = runs
    for layer, (expected, got) in enumerate(zip(fp32["phi"], fp16["phi"], strict=True)):
        tolerance = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(
            got, expected, rtol=0, atol=tolerance, msg=lambda m, i=layer: f"phi {i}: {m}"
        )
    torch.testing.assert_close(fp16["tokens"], fp32["tokens"])


def _fp16_plugin():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return lightning.pytorch.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_adam_influence_reads_the_trainers_optimizer(domains, tmp_path):
    module, _, controller = _fit(domains, tmp_path, max_steps=4, preconditioner="adam")
    assert controller.influence.optimizer is module.trainer_optimizer and controller.decisions == 1
    assert controller.influence.steps == 3  # the first step ran before the optimizer had second moments
    assert controller.last_influence.preconditioner == "adam"
    assert np.isfinite(controller.last_influence.values).all() and np.any(controller.last_influence.values)
