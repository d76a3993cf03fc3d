"""Two gloo ranks: rank 0 solves, every rank applies the broadcast weights at the same batch, one ledger."""

import os

import torch.multiprocessing as mp
from testkit.distributed import run_on_ranks
from testkit.domains import write_domains

from tikmix_loader import Domain, MixtureLoader
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.ledger import verify
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT, per_token_loss

STEPS, EVERY = 6, 3


def _worker(rank, world_size, directory, results):
    domains = [Domain(name, os.path.join(directory, f"{name}.bin")) for name in ("a", "b", "c")]
    loader = MixtureLoader(domains, batch_size=4, seq_len=16, seed=3, num_workers=0)
    model = TinyGPT(GPTConfig.preset("micro", seq_len=16), seed=0)  # same weights on both ranks
    targets = {"b": [loader.sample_domain("b", 4, seed=9)]}
    influence = GroupInfluence(model, k=8, domains=loader.domain_names, backend="torch")
    ledger = os.path.join(directory, "ledger.jsonl")
    controller = MixtureController(
        loader, "tikmix_d", influence=influence, targets=targets, schedule=every(EVERY), ledger=ledger
    )
    if rank != 0:  # only rank 0 may solve; the others receive its weights
        controller.mixer.propose = None
    history = []
    for step in range(STEPS):
        batch = loader.next_batch()
        with controller.observe(batch):
            losses = per_token_loss(model, batch)
            (losses.sum() / (batch["labels"] != -100).sum()).backward()
        model.zero_grad()
        controller.step(step)
        history.append(loader.weights)
    results[rank] = {"history": history, "has_ledger": controller.ledger is not None}


def test_rank_zero_solves_and_every_rank_switches_at_the_same_batch(tmp_path):
    write_domains(tmp_path, {"a": 30, "b": 40, "c": 20}, max_len=60)
    results = mp.Manager().dict()
    run_on_ranks(_worker, 2, tmp_path, str(tmp_path), results)
    assert results[0]["history"] == results[1]["history"]
    history = results[0]["history"]
    assert history[EVERY - 1] != history[EVERY - 2]  # the first decision lands after step EVERY - 1
    assert results[0]["has_ledger"] and not results[1]["has_ledger"]
    assert verify(tmp_path / "ledger.jsonl").num_records == STEPS // EVERY
