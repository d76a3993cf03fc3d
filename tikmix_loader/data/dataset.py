"""The ``torch.utils.data`` face of ``MixtureLoader``: a resumable DataLoader whose main process plans.

``as_dataloader(loader, **kwargs)`` builds a ``MixtureDataLoader``: a ``DataLoader`` (or torchdata's
``StatefulDataLoader``) over ``MixtureDataset`` with ``PlanSampler`` as its sampler and ``batch_size=None``.
The sampler runs in the main process and yields a ``BatchPlan`` per global batch (which samples of which
domain, from counts alone); the dataset turns a plan into this rank's batch. The design follows the
sampler/dataset split of ``torch.utils.data``: workers only read what the main process planned, so the
batch order, the weights and the state never depend on worker timing.

Without worker processes (``num_workers=0``, recommended: the loader already prefetches with its own
threads) the sampler plans on the loader itself, so ``set_weights`` applies from the next batch, exactly as
when iterating the loader.

With ``W`` worker processes and ``prefetch_factor`` ``F`` the DataLoader has always asked for ``P = W * F``
batches more than it delivered (``torch.utils.data`` keeps that many in flight, in order). Those are
planned by a copy of the loader's planner running ``P`` batches ahead, so ``set_weights`` called after
``m`` delivered batches applies from batch ``m + P``, the first one not yet planned. ``loader.weights`` and
``state_dict()`` show the change at once: it is stored as a change scheduled at batch ``m + P``, so a
resume reproduces it. ``set_quality`` applies at the same batch; each plan carries the quality segments it
was planned under, so the workers' loader copies read what the plan meant. The main process replays each
delivered batch's plan (counts only) on the loader, so ``state_dict()`` is always the state after the last
delivered batch, and a new iterator (also with ``persistent_workers=True``) continues from there; batches
in flight from an abandoned iterator are dropped.

State: ``dataloader.state_dict()`` / ``load_state_dict()`` (Lightning 2.x and ``StatefulDataLoader`` look
for these) and ``dataloader.dataset.state_dict(num_samples, from_beginning)`` / ``load_state_dict`` (the
dataset-state protocol Composer uses to resume without spinning through batches) all carry the loader's
``state_dict()``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from tikmix_loader.data import _compiled
from tikmix_loader.data.planner import BatchPlan
from tikmix_loader.errors import ConfigError, MissingExtraError


class MixtureDataset(Dataset):
    """Batches of a ``MixtureLoader`` indexed by the ``BatchPlan`` that ``PlanSampler`` yields.

    Args:
        loader (MixtureLoader): The loader whose domains are read.
    """

    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def __getitem__(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        if get_worker_info() is None:  # main process: the plan is the loader's next; its threads prefetch
            return self.loader.take_batch(plan)
        return self.loader.read_batch(plan)

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict:
        """The loader's state after the last delivered batch (``num_samples`` is implied by it and unused)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the loader at ``state``; no batches are replayed."""
        self.loader.load_state_dict(state)


class PlanSampler(Sampler):
    """Yields the plan of every global batch, in order, from the main process.

    Args:
        loader (MixtureLoader): The loader that owns the plan.
        ahead (bool): Plan on a copy running ahead of the loader (``loader.plan_ahead``), for worker
            processes; else plan on the loader itself.
    """

    def __init__(self, loader, *, ahead: bool):
        self.loader = loader
        self.ahead = ahead
        self.planner = None  # the copy planning for the current iterator, when ``ahead``

    def __iter__(self) -> Iterator[BatchPlan]:
        if not self.ahead:
            while (plan := self.loader.plan_next()) is not None:
                yield plan
            return
        self.planner = planner = self.loader.plan_ahead()
        while (plan := planner.plan()) is not None:
            yield plan


class _MixtureDataLoaderMixin:
    """Iteration and state shared by the plain and the torchdata DataLoader (see the module docstring).

    ``held_batches`` (default 0) is for trainers that fetch batches before they train on them (Lightning's
    fetcher holds one): ``state_dict()`` then reports the state after the last batch not held, so a resume
    starts with the first held batch. Weight changes made since are kept, scheduled where they applied.
    ``batches_delivered`` counts the batches the current iterator has yielded (a trainer's read-ahead is what
    it received beyond the batches it has started).
    """

    held_batches = 0
    batches_delivered = 0
    _MAX_HELD = 8

    def __iter__(self):
        loader = self.dataset.loader
        self._recent_states = collections.deque([loader.state_dict()], maxlen=self._MAX_HELD + 1)
        self.batches_delivered = 0
        batches = super().__iter__()  # starts the sampler, which may start planning ahead
        ahead = self.sampler.planner if self.num_workers > 0 else None
        try:
            for batch in batches:
                if ahead is not None:
                    loader.plan_next()  # the delivered batch's plan, replayed so the loader's state is exact
                self._recent_states.append(loader.state_dict())
                self.batches_delivered += 1
                yield batch
        finally:
            if ahead is not None:
                loader.stop_planning_ahead(ahead)

    def state_dict(self) -> dict:
        """The loader's state after the last delivered batch (less ``held_batches``)."""
        state = self.dataset.loader.state_dict()
        recent = getattr(self, "_recent_states", None)
        if not self.held_batches or not recent:
            return state
        if self.held_batches > self._MAX_HELD:
            raise ConfigError(f"`held_batches` must be at most {self._MAX_HELD}, got {self.held_batches}.")
        before = recent[max(len(recent) - 1 - self.held_batches, 0)]
        changes = {key: state[key] for key in ("weight_history", "quality_segments") if key in state}
        return {**before, **changes}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: the next iterator starts with the batch after the saved one."""
        self._recent_states = None
        self.dataset.loader.load_state_dict(state)


class MixtureDataLoader(_MixtureDataLoaderMixin, DataLoader):
    """A ``DataLoader`` yielding a ``MixtureLoader``'s batches, exact with worker processes, resumable."""


def as_dataloader(loader, *, stateful: bool = False, **kwargs) -> DataLoader:
    """A DataLoader yielding ``loader``'s batches (see the module docstring for the semantics).

    Args:
        loader (MixtureLoader): The loader.
        stateful (bool): Build on torchdata's ``StatefulDataLoader`` (needs the ``torchdata`` extra) instead
            of ``torch.utils.data.DataLoader``. Default: ``False``.
        **kwargs: Passed to the DataLoader (``num_workers``, ``prefetch_factor``, ``persistent_workers``,
            ``multiprocessing_context``, ``pin_memory``, ...). Batching and sampling are the loader's.
    """
    taken = sorted({"batch_size", "sampler", "batch_sampler", "shuffle", "drop_last"} & set(kwargs))
    if taken:
        raise ConfigError(
            f"as_dataloader(): {taken} are set by the MixtureLoader (batch_size={loader.batch_size}, its own "
            f"mixture sampling); remove them from the call."
        )
    cls = _stateful_dataloader_class() if stateful else MixtureDataLoader
    workers = kwargs.get("num_workers", 0) > 0
    if workers:  # build or load the compiled helpers once, here: workers inherit the library or the fallback
        _compiled.module()
    return cls(MixtureDataset(loader), batch_size=None, sampler=PlanSampler(loader, ahead=workers), **kwargs)


@functools.cache
def _stateful_dataloader_class() -> type:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError as error:
        raise MissingExtraError(
            'as_dataloader(stateful=True) needs torchdata; install it with `pip install -e ".[torchdata]"`.'
        ) from error

    class MixtureStatefulDataLoader(_MixtureDataLoaderMixin, StatefulDataLoader):
        """``MixtureDataLoader`` on torchdata's ``StatefulDataLoader``."""

    return MixtureStatefulDataLoader
