"""The ``torch.utils.data`` face of ``MixtureLoader``: an ``IterableDataset`` and a DataLoader built on it.

``MixtureDataset`` yields whole batches (use ``batch_size=None``) and implements the dataset-state protocol
Composer uses for resumption without spinning through batches: ``state_dict(num_samples, from_beginning)``
and ``load_state_dict(state)``.

With ``num_workers=0`` (recommended: the loader already prefetches with its own threads) the dataset
drives the loader directly. With DataLoader worker processes, worker ``w`` of ``W`` plans every global
batch from the same state (planning is cheap and deterministic) but reads and yields only batches
``w, w + W, ...``, which the DataLoader returns in order. Weight changes reach the workers through a
shared-memory schedule: a change made after ``m`` batches were delivered takes effect at batch
``m + W * prefetch_factor + 1``, the first one no worker can have started, so the batch stream stays
deterministic and the main process's copy of the plan (which ``state_dict`` reports) stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tikmix_loader.data.planner import normalize_weights
from tikmix_loader.errors import StateError

MAX_SCHEDULED_CHANGES = 4096


class MixtureDataset(IterableDataset):
    """Batches of a ``MixtureLoader`` as an ``IterableDataset`` (use with ``batch_size=None``)."""

    def __init__(self, loader):
        super().__init__()
        self.loader = loader
        self.schedule: torch.Tensor | None = None  # [MAX_SCHEDULED_CHANGES + 1, 1 + domains], row 0 = count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        if worker is None:
            yield from self.loader
            return
        yield from self._worker_batches(worker.id, worker.num_workers)

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict:
        """The loader's state at the last delivered batch (``num_samples`` is implied by it and unused)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the loader at ``state``; no batches are replayed."""
        self.loader.load_state_dict(state)

    # -- DataLoader worker processes --------------------------------------------------------------

    def share_schedule(self) -> None:
        """Allocate the shared weight schedule before worker processes start."""
        columns = 1 + len(self.loader.domain_names)
        self.schedule = torch.zeros(MAX_SCHEDULED_CHANGES + 1, columns, dtype=torch.float64).share_memory_()

    def schedule_weights(self, at_batch: int, weights: np.ndarray) -> None:
        """Publish ``weights`` to take effect at global batch ``at_batch`` in every worker."""
        count = int(self.schedule[0, 0])
        if count >= MAX_SCHEDULED_CHANGES:
            raise StateError(
                f"More than {MAX_SCHEDULED_CHANGES} weight changes in one DataLoader iteration with worker "
                f"processes; re-create the iterator (e.g. each epoch) or use num_workers=0."
            )
        self.schedule[count + 1, 0] = at_batch
        self.schedule[count + 1, 1:] = torch.from_numpy(np.asarray(weights, dtype=np.float64))
        self.schedule[0, 0] = count + 1  # published last, so workers never see a half-written row

    def apply_schedule(self, planner, applied: int) -> int:
        """Apply scheduled changes due at ``planner.batch_index``; returns how many are applied in total."""
        if self.schedule is None:
            return applied
        count = int(self.schedule[0, 0])
        while applied < count and int(self.schedule[applied + 1, 0]) <= planner.batch_index:
            planner.set_weights(self.schedule[applied + 1, 1:].numpy().copy())
            applied += 1
        return applied

    def _worker_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, torch.Tensor]]:
        loader = self.loader
        loader.close()  # threads do not survive into worker processes; this worker reads on demand
        planner, applied = loader._planner, 0
        while True:
            applied = self.apply_schedule(planner, applied)
            plan = planner.plan()
            if plan is None:
                return
            if plan.index % num_workers != worker:
                continue
            yield loader.read_batch(plan)


class MixtureDataLoader(DataLoader):
    """A ``DataLoader`` over ``MixtureDataset`` that keeps the loader's state exact with worker processes."""

    def __init__(
        self, dataset: MixtureDataset, *, num_workers: int = 0, prefetch_factor: int | None = None, **kwargs
    ):
        if num_workers > 0:
            prefetch_factor = prefetch_factor or 2
            dataset.share_schedule()
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor, **kwargs
        )

    def __iter__(self):
        if self.num_workers == 0:
            yield from super().__iter__()
            return
        loader, dataset = self.dataset.loader, self.dataset
        planner, applied = loader._planner, 0
        dataset.schedule[0, 0] = 0
        margin = self.num_workers * self.prefetch_factor + 1

        def schedule_change(weights):
            dataset.schedule_weights(planner.batch_index + margin, normalize_weights(weights, planner.names))

        loader._set_weights_hook = schedule_change
        try:
            for batch in super().__iter__():
                # Replay the plan in this process (counts only) so state_dict() matches what was delivered.
                applied = dataset.apply_schedule(planner, applied)
                planner.plan()
                yield batch
        finally:
            loader._set_weights_hook = None


def as_dataloader(loader, **kwargs) -> MixtureDataLoader:
    """A ``MixtureDataLoader`` yielding ``loader``'s batches; ``kwargs`` go to ``DataLoader``."""
    return MixtureDataLoader(MixtureDataset(loader), **kwargs)
