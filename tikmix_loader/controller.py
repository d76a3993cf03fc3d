"""``MixtureController``: decides when to re-mix, asks a mixer for new weights, applies and records them.

A training loop calls, per step (the order matters)::

    for step, batch in enumerate(loader):
        with controller.observe(batch):      # online influence: the hooks read this backward
            losses = per_token_loss(model, batch)
            loss = losses.sum() / loss_mask(batch).sum()
            loss.backward()
        controller.record_losses(batch, losses)   # only mixers that use training losses (ODM) need it
        optimizer.step()
        optimizer.zero_grad()
        controller.step(step)                # may decide; new weights apply from the next batch

With ``GroupInfluence(..., preconditioner="adam")`` call ``controller.bind_optimizer(optimizer)`` once before
the loop (or pass ``optimizer_hook=controller.bind_optimizer`` to ``train``).

At a decision the controller measures Group Influence on the targets (online: from the statistics the
training backward passes accumulated; observation mode: from fresh samples of each domain drawn with
``loader.sample_domain``), builds a ``MixingContext``, lets rank 0's mixer propose, broadcasts the weights
so every rank switches at the same batch, sets them on the loader and appends a ledger record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from tikmix_loader.errors import ConfigError, StateError
from tikmix_loader.ledger import MixtureLedger
from tikmix_loader.losses import loss_mask
from tikmix_loader.mixing import Mixer, MixingContext, MixtureSolution, get_mixer

STATE_VERSION = 1


@dataclass(frozen=True)
class DecisionSchedule:
    """When the controller decides: every ``every_steps`` steps, or once as each token milestone is passed.

    Token milestones are the paper's stage-wise schedule: training before the first milestone uses the
    initial weights, and each later stage uses the weights decided at its start.
    """

    every_steps: int | None = field(default=None, metadata={"help": "Decide after every N-th step."})
    token_milestones: tuple[int, ...] = field(default=(), metadata={"help": "Decide once each is reached."})

    def __post_init__(self):
        if (self.every_steps is None) == (not self.token_milestones):
            raise ConfigError("DecisionSchedule needs exactly one of `every_steps` or `token_milestones`.")
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ConfigError(f"`every_steps` must be a positive int, got {self.every_steps!r}.")
        milestones = tuple(int(m) for m in self.token_milestones)
        if any(m <= 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ConfigError(
                f"`token_milestones` must be increasing positive token counts, got {milestones}."
            )
        object.__setattr__(self, "token_milestones", milestones)

    def due(self, step: int, tokens_seen: int, decisions: int) -> bool:
        """Whether a decision is due after step ``step`` (0-based), ``decisions`` having been made so far."""
        if self.every_steps is not None:
            return (step + 1) % self.every_steps == 0
        return decisions < len(self.token_milestones) and tokens_seen >= self.token_milestones[decisions]

    def to_dict(self) -> dict:
        return {"every_steps": self.every_steps, "token_milestones": list(self.token_milestones)}


def every(steps: int) -> DecisionSchedule:
    """Decide after every ``steps`` training steps."""
    return DecisionSchedule(every_steps=steps)


def at_tokens(*milestones: int) -> DecisionSchedule:
    """Stage-wise: decide once as each token milestone is reached."""
    return DecisionSchedule(token_milestones=milestones)


def _torch_broadcast(objects: list) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)


class MixtureController:
    """Drives a ``MixtureLoader``'s weights from a mixer, on a schedule, with a ledger of every decision.

    Args:
        loader (MixtureLoader): The loader whose weights are controlled.
        mixer (Mixer | str): A mixer, or a registry name (``tikmix_d``, ``odm``, ...) built with defaults.
        influence (GroupInfluence, optional): Measures S for mixers that use it. Built with
            ``domains=loader.domain_names`` it runs online (statistics from ``observe``); otherwise set
            ``observation_samples`` for observation mode. Default: ``None``.
        targets (Mapping[str, Iterable[dict]], optional): Target name -> batches (re-iterable, e.g. a list),
            whose mean loss the influence is measured on. Default: ``None``.
        loss_fn (callable, optional): ``loss_fn(model, batch)`` -> per-token loss of the influence passes.
            Default: ``None`` (the influence engine's task loss, which follows the batch's label convention).
        schedule (DecisionSchedule): When to decide. Default: ``every(100)``.
        ledger (MixtureLedger | str, optional): Where decisions are recorded (rank 0 writes). Default: None.
        observation_samples (int, optional): Observation mode: samples per domain drawn at each decision.
        observation_batch_size (int): Batch size of observation passes. Default: 16.
        total_tokens (int, optional): Planned training tokens; enables availability caps (a domain is never
            scheduled past the loader's ``max_epochs``). Default: ``None``.
        broadcast (callable): ``broadcast(objects)`` in place from rank 0; default ``torch.distributed``'s
            ``broadcast_object_list`` when initialised (Composer passes its ``dist`` wrapper).
    """

    def __init__(
        self,
        loader,
        mixer: Mixer | str,
        *,
        influence=None,
        targets: Mapping[str, Iterable[dict]] | None = None,
        loss_fn: Callable | None = None,
        schedule: DecisionSchedule | None = None,
        ledger: MixtureLedger | str | None = None,
        observation_samples: int | None = None,
        observation_batch_size: int = 16,
        total_tokens: int | None = None,
        broadcast: Callable[[list], None] = _torch_broadcast,
    ):
        self.loader = loader
        self.mixer = get_mixer(mixer) if isinstance(mixer, str) else mixer
        self.influence = influence
        self.targets = None if targets is None else {name: list(batches) for name, batches in targets.items()}
        if (influence is None) != (self.targets is None):
            raise ConfigError("`influence` and `targets` go together: pass both or neither.")
        self.online = influence is not None and influence.domains is not None
        if influence is not None and not self.online and not observation_samples:
            raise ConfigError(
                "`influence` was built without `domains=`, so it cannot run online; build it with "
                "`domains=loader.domain_names` or pass `observation_samples=` for observation mode."
            )
        if self.online and list(influence.domains) != loader.domain_names:
            raise ConfigError(
                f"`influence` domains {list(influence.domains)} != loader domains {loader.domain_names}."
            )
        self.loss_fn = loss_fn
        self.schedule = schedule or every(100)
        self.is_writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        self.ledger = MixtureLedger(ledger) if isinstance(ledger, str) and self.is_writer else ledger
        if not self.is_writer:
            self.ledger = None
        self.observation_samples = observation_samples
        self.observation_batch_size = observation_batch_size
        self.total_tokens = total_tokens
        self.broadcast = broadcast
        self.decisions = 0
        self.last_solution: MixtureSolution | None = None
        self.last_influence = None
        # Row 0: summed per-token training loss per domain, row 1: loss tokens. Kept on the loss's device and
        # read only at a decision, so record_losses never synchronises the GPU.
        self._loss_stats = torch.zeros(2, len(loader.domain_names), dtype=torch.float64)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand the training optimizer to the influence engine, before the first step (its ``"adam"``
        preconditioner reads the second moments; the others ignore it). A no-op without an engine."""
        if self.influence is not None:
            self.influence.bind_optimizer(optimizer)

    # -- per step ---------------------------------------------------------------------------------

    def observe(self, batch: dict):
        """Context for the forward and backward of a training step (collects online influence statistics)."""
        if self.online:
            return self.influence.observe(batch)
        return contextlib.nullcontext()

    def record_losses(self, batch: dict, losses: torch.Tensor) -> None:
        """Accumulate per-domain training loss from position-aligned per-token ``losses`` [B, T] (masked
        entries 0), counting the loss tokens the batch's label convention marks."""
        losses = losses.detach().double()
        self._loss_stats = self._loss_stats.to(losses.device)
        mask = loss_mask(batch).to(losses.device).double()
        domain = batch["domain"].to(losses.device)
        self._loss_stats.index_add_(1, domain, torch.stack([losses.sum(1), mask.sum(1)]))

    @property
    def tokens_seen(self) -> int:
        """Training tokens planned so far (all ranks)."""
        return (
            self.loader.batches_seen * self.loader.batch_size * self.loader.world_size * self.loader.seq_len
        )

    def step(self, step: int) -> MixtureSolution | None:
        """Call after ``optimizer.step()``; decides when the schedule says so and returns the decision."""
        if not self.schedule.due(step, self.tokens_seen, self.decisions):
            return None
        return self.decide(step)

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, step: int) -> MixtureSolution:
        """Measure, solve on rank 0, broadcast, apply and record; every rank must call it at the same step."""
        names = self.loader.domain_names
        before = self.loader.weights
        influence = self._measure_influence() if self.influence is not None else None
        payload = [None]
        if self.is_writer:
            solution = self.mixer.propose(self._context(step, before, influence))
            payload = [(solution.weights.tolist(), solution.to_dict())]
        self.broadcast(payload)
        weights, solver = payload[0]
        solution = MixtureSolution(weights=np.asarray(weights), **solver)
        self.loader.set_weights(dict(zip(names, weights)))
        if self.ledger is not None:
            self.ledger.append(
                {
                    "step": int(step),
                    "tokens_seen": int(self.tokens_seen),
                    "method": self.mixer.name,
                    "weights_before": before,
                    "weights_after": self.loader.weights,
                    "influence": influence,
                    "solver": solver,
                }
            )
        self.decisions += 1
        self.last_solution, self.last_influence = solution, influence
        self._loss_stats.zero_()
        return solution

    def set_quality(self, params: Mapping, step: int) -> None:
        """``loader.set_quality(params)`` plus a ledger record (method ``"quality"``, weights unchanged,
        ``quality``: every domain's parameters after the change). Every rank calls it at the same step with
        the same ``params`` (e.g. a QuaDMix search result); nothing is broadcast."""
        weights = self.loader.weights
        self.loader.set_quality(params)
        if self.ledger is not None:
            self.ledger.append(
                {
                    "step": int(step),
                    "tokens_seen": int(self.tokens_seen),
                    "method": "quality",
                    "weights_before": weights,
                    "weights_after": weights,
                    "quality": {name: value.to_dict() for name, value in self.loader.quality_params.items()},
                }
            )

    def _measure_influence(self):
        if self.online:
            return self.influence.influence(self.targets, self.loss_fn)
        batches = {
            name: self.loader.sample_batches(
                name, self.observation_samples, batch_size=self.observation_batch_size
            )
            for name in self.loader.domain_names
        }
        return self.influence.compute(domains=batches, targets=self.targets, loss_fn=self.loss_fn)

    def _context(self, step: int, before: dict, influence) -> MixingContext:
        sums, tokens = self._loss_stats.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            losses = np.where(tokens > 0, sums / tokens, np.nan)
        caps = {}
        if self.total_tokens is not None:
            # Tokens each domain can still supply before hitting the loader's max_epochs (unlimited: no cap).
            left = np.array([self.loader.tokens_left()[name] for name in self.loader.domain_names])
            caps = {
                "available_tokens": np.where(np.isfinite(left), left, 1e30),
                "max_epochs": 1.0,
                "remaining_tokens": max(self.total_tokens - self.tokens_seen, 1),
            }
        return MixingContext(
            domains=tuple(self.loader.domain_names),
            w_prior=before,
            influence=influence,
            domain_tokens=[d.num_tokens for d in self.loader.domains],
            domain_losses=losses,
            step=int(step),
            tokens_seen=int(self.tokens_seen),
            **caps,
        )

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Mixer, influence statistics, ledger position and decision count (save with ``torch.save``).

        The loader's own state is saved separately (``loader.state_dict()``; Composer saves it as the dataset
        state). Under torch.distributed this is a collective call (the influence sums are all-reduced).
        """
        return {
            "version": STATE_VERSION,
            "schedule": self.schedule.to_dict(),
            "decisions": self.decisions,
            "mixer": self.mixer.state_dict(),
            "influence": None if not self.online else self.influence.state_dict(),
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
            "loss_sums": self._loss_stats[0].tolist(),
            "loss_tokens": self._loss_stats[1].tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a ledger that ran past the checkpoint is cut back to it, so a resumed
        run writes exactly the records an uninterrupted one would."""
        if state.get("version") != STATE_VERSION:
            raise StateError(f"Controller state version {state.get('version')!r} is not {STATE_VERSION}.")
        if state["schedule"] != self.schedule.to_dict():
            raise StateError(
                f"Controller state has schedule {state['schedule']}, this one {self.schedule.to_dict()}."
            )
        self.mixer.load_state_dict(state["mixer"])
        if self.online and state["influence"] is not None:
            self.influence.load_state_dict(state["influence"])
        if self.ledger is not None and state["ledger"] is not None:
            self.ledger.truncate_to(
                state["ledger"]["num_records"], expected_last_hash=state["ledger"]["last_hash"]
            )
            self.ledger.load_state_dict(state["ledger"])
        self.decisions = int(state["decisions"])
        self._loss_stats = torch.tensor([state["loss_sums"], state["loss_tokens"]], dtype=torch.float64)
