"""MixtureController: schedules, online TiKMiX-D on a tiny GPT, observation mode, ODM losses, exact resume."""

import copy

import numpy as np
import pytest
import torch
from testkit.domains import write_domains
from testkit.resume import assert_resumes_exactly

from tikmix_loader import ConfigError, MixtureLoader, StateError
from tikmix_loader.controller import DecisionSchedule, MixtureController, at_tokens, every
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.ledger import MixtureLedger, verify
from tikmix_loader.mixing import get_mixer
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT, per_token_loss

SEQ_LEN = 16


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("domains"), {"a": 40, "b": 60, "c": 30}, max_len=80)


def _loader(domains, **options):
    return MixtureLoader(domains, batch_size=6, seq_len=SEQ_LEN, seed=1, num_workers=0, **options)


class Run:
    """A tiny training run driven by a controller, exactly as the README's loop does it."""

    def __init__(
        self,
        domains,
        ledger_path=None,
        *,
        mixer="tikmix_d",
        schedule=None,
        online=True,
        preconditioner="kfac",
    ):
        torch.manual_seed(0)
        self.loader = _loader(domains)
        self.model = TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        targets = {name: [self.loader.sample_domain(name, 4, seed=99)] for name in ("a", "c")}
        influence = GroupInfluence(
            self.model,
            k=8,
            preconditioner=preconditioner,
            domains=self.loader.domain_names if online else None,
        )
        self.controller = MixtureController(
            self.loader,
            mixer,
            influence=influence,
            targets=targets,
            schedule=schedule or every(3),
            ledger=None if ledger_path is None else MixtureLedger(ledger_path),
            observation_samples=None if online else 8,
        )
        self.controller.bind_optimizer(self.optimizer)

    def step(self, step):
        batch = self.loader.next_batch()
        with self.controller.observe(batch):
            losses = per_token_loss(self.model, batch)
            loss = losses.sum() / (batch["labels"] != -100).sum()
            loss.backward()
        self.controller.record_losses(batch, losses)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.controller.step(step)
        return float(loss.detach())

    def state_dict(self):
        # A deep copy stands in for torch.save: training after the checkpoint must not alter it.
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(),
                "controller": self.controller.state_dict(),
            }
        )

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.controller.load_state_dict(state["controller"])


def test_schedules():
    assert [s for s in range(10) if every(4).due(s, 0, 0)] == [3, 7]
    stages = at_tokens(100, 250)
    assert not stages.due(0, 99, 0) and stages.due(0, 100, 0)
    assert not stages.due(5, 200, 1) and stages.due(5, 260, 1) and not stages.due(9, 10**6, 2)
    with pytest.raises(ConfigError, match="exactly one"):
        DecisionSchedule()
    with pytest.raises(ConfigError, match="increasing"):
        at_tokens(5, 3)


def test_online_tikmix_d_changes_weights_on_schedule_and_records_every_decision(domains, tmp_path):
    run = Run(domains, tmp_path / "ledger.jsonl")
    weights = [run.loader.weights]
    for step in range(9):
        run.step(step)
        weights.append(run.loader.weights)
    assert weights[1] == weights[0] and weights[3] != weights[2]  # decisions after steps 2, 5, 8
    records = list(run.controller.ledger.records())
    assert [r["step"] for r in records] == [2, 5, 8]
    assert records[0]["influence"]["domains"] == ["a", "b", "c"]
    assert records[0]["influence"]["targets"] == ["a", "c"]
    assert records[-1]["weights_after"] == run.loader.weights
    assert verify(tmp_path / "ledger.jsonl").ok
    solution = run.controller.last_solution
    assert np.isclose(solution.weights.sum(), 1) and solution.status in {"optimal", "fallback"}


def test_stage_wise_observation_mode_keeps_initial_weights_for_stage_one(domains, tmp_path):
    run = Run(domains, tmp_path / "l.jsonl", schedule=at_tokens(4 * 6 * SEQ_LEN), online=False)
    initial = run.loader.weights
    for step in range(3):
        run.step(step)
        assert run.loader.weights == initial
    run.step(3)
    assert run.controller.decisions == 1 and run.loader.weights != initial
    for step in range(4, 8):
        run.step(step)
    assert run.controller.decisions == 1


def test_odm_gets_per_domain_training_losses(domains, tmp_path):
    run = Run(domains, tmp_path / "l.jsonl", mixer=get_mixer("odm"))
    captured = []
    propose = run.controller.mixer.propose
    run.controller.mixer.propose = lambda context: captured.append(context.domain_losses) or propose(context)
    for step in range(3):
        run.step(step)
    assert np.all(np.isfinite(captured[0])) and np.all(captured[0] > 0)


@pytest.mark.parametrize("preconditioner", ["kfac", "adam"])
def test_resume_makes_the_same_decisions_at_every_midpoint(domains, preconditioner):
    assert_resumes_exactly(
        lambda: Run(domains, preconditioner=preconditioner),
        lambda run, step: (run.step(step), run.loader.weights),
        total=8,
        midpoints=[1, 2, 3, 6],  # before, at and after the decisions of steps 2 and 5
        round_trip=lambda state: state,  # Run.state_dict already deep-copies (model and optimizer tensors)
    )


def test_kill_and_resume_reproduces_the_same_ledger(domains, tmp_path):
    straight = Run(domains, tmp_path / "straight.jsonl")
    for step in range(10):
        straight.step(step)

    first = Run(domains, tmp_path / "resumed.jsonl")
    for step in range(4):
        first.step(step)
    checkpoint = first.state_dict()
    for step in range(4, 7):  # work after the checkpoint that the crash loses (one decision at step 5)
        first.step(step)
    second = Run(domains, tmp_path / "resumed.jsonl")
    second.load_state_dict(checkpoint)
    for step in range(4, 10):
        second.step(step)
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert second.loader.state_dict() == straight.loader.state_dict()


def test_bad_configuration_is_rejected(domains, tmp_path):
    loader = _loader(domains)
    model = TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=0)
    with pytest.raises(ConfigError, match="go together"):
        MixtureController(
            loader, "stratified", influence=GroupInfluence(model, k=4, domains=loader.domain_names)
        )
    with pytest.raises(ConfigError, match="cannot run online"):
        MixtureController(loader, "tikmix_d", influence=GroupInfluence(model, k=4), targets={"t": []})
    with pytest.raises(ConfigError, match="Unknown mixer 'nope'"):
        MixtureController(loader, "nope")
    controller = MixtureController(loader, "stratified", schedule=every(2))
    state = controller.state_dict()
    with pytest.raises(StateError, match="schedule"):
        MixtureController(loader, "stratified", schedule=every(3)).load_state_dict(state)


@pytest.mark.parametrize("online", [True, False])
def test_adam_influence_decides_with_the_bound_optimizer(domains, tmp_path, online):
    run = Run(domains, tmp_path / "l.jsonl", preconditioner="adam", online=online)
    for step in range(6):
        run.step(step)
    assert run.controller.decisions == 2 and run.controller.last_influence.preconditioner == "adam"
    values = run.controller.last_influence.values
    assert np.isfinite(values).all() and np.any(values != 0)
    assert run.controller.influence.optimizer is run.optimizer


def test_adam_influence_without_the_optimizer_names_the_fix(domains):
    run = Run(domains, preconditioner="adam")
    run.controller.influence.optimizer = None  # as if bind_optimizer had not been called
    with pytest.raises(ConfigError, match=r"needs the training optimizer.*bind_optimizer"):
        run.step(0)
