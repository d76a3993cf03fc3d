"""``MixtureLoader``: a drop-in DataLoader replacement that samples a changeable mixture of domains.

Three parts cooperate: ``MixturePlanner`` decides, from counts alone, which samples of which domain form
each global batch; one ``DomainStream`` per domain turns a stream index into tokens; ``DomainPrefetcher``
threads read ahead the samples planned for this rank. Each rank reads only the samples of its own slice of
a global batch, a weight change applies from the very next batch, and the state needed to resume exactly
is a handful of counters.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.planner import BatchPlan, MixturePlanner, normalize_weights
from tikmix_loader.data.prefetch import DomainPrefetcher
from tikmix_loader.data.shuffle import OBSERVATION, rng_for, stable_key
from tikmix_loader.data.stream import DomainStream
from tikmix_loader.errors import ConfigError, DomainError, TikmixError
from tikmix_loader.losses import IGNORE_INDEX, LABEL_SHIFT_KEY, check_convention
from tikmix_loader.quality.config import QualityConfig
from tikmix_loader.quality.sampler import QualityParams

logger = logging.getLogger(__name__)


class MixtureLoader:
    """Iterate batches drawn from several domains with weights that may change at any step.

    Each global batch (``batch_size * world_size`` samples) takes from domain ``d`` a quota set by the
    current weights plus the rounding error carried from earlier batches, so cumulative counts track the
    weights to within one sample. Every domain is read in its own shuffled order, fixed by
    ``(seed, domain name, epoch)`` and independent of weights and ranks. Rank ``r`` yields its slice of every
    global batch, so ranks see disjoint samples that together form the global stream, and it reads only
    the samples of its slice (``batch_size`` per batch, whatever the world size).

    Batches are dicts: ``input_ids`` and ``labels`` (LongTensor ``[batch_size, seq_len]``; labels follow
    ``label_convention``, ``IGNORE_INDEX`` where masked), ``label_shift`` (LongTensor ``[batch_size]``,
    the convention: 1 = shifted, 0 = hf; see ``tikmix_loader.losses``), ``domain`` (LongTensor
    ``[batch_size]``, an index into ``domain_names``) and, when a domain is in document mode,
    ``attention_mask``.

    Planning interface (for code that reads batches itself, e.g. DataLoader worker processes): ``plan_next()``
    plans the next global batch and moves the position past it (``state_dict()`` then counts it), and
    ``read_batch(plan)`` reads this rank's slice of a plan; ``next_batch()`` is the two together, with the
    background threads reading ahead. Plans are planned in order; ``read_batch`` may be called for any
    plan, in any process that holds a copy of the loader.

    ``state_dict()`` records the settings the stream depends on (domains, seed, global batch size,
    ``seq_len``, ``block_docs``, ``shuffle_window``, each domain's mode, EOS and pad ids), and
    ``load_state_dict`` refuses a state saved under other values, naming each.

    Quality sampling (QuaDMix, ``docs/quadmix.md``): with ``quality=QualityConfig(criteria, params)`` each
    epoch of a domain with parameters holds each document as many times as its quality scores give
    (``DomainStream``); ``set_quality`` changes parameters at a step boundary like ``set_weights``, and
    ``served_document_tokens()`` counts what each document has served.

    Args:
        domains (Sequence[Domain]): The domains, with unique names.
        batch_size (int): Samples per batch on this rank.
        seq_len (int): Tokens per sample (inputs); each sample reads ``seq_len + 1`` tokens.
        weights (Mapping[str, float] | Sequence[float], optional): Initial mixture; ``None`` means the
            natural token shares. Normalised to sum to 1; a dict must name every domain. Default: ``None``.
        seed (int): Seeds every shuffle. Default: 0.
        num_workers (int): Background threads filling the per-domain queues; 0 reads on demand. Default: 2.
        prefetch (int): Samples of this rank read ahead per domain: the loader plans
            ``ceil(prefetch * num_domains / batch_size)`` batches ahead. Default: 64.
        exhaustion (str): What happens when a domain has been read ``max_epochs`` times: ``"repeat"``
            (default ``max_epochs`` unlimited; when a limit is given, the domain is then dropped), ``"drop"``
            (remove the domain and renormalise the others) or ``"stop"`` (end iteration). With ``"drop"``
            and ``"stop"`` the default ``max_epochs`` is 1. Default: ``"repeat"``.
        max_epochs (int | Mapping[str, int], optional): Epochs each domain may be read. Default: ``None``.
        rank (int, optional): This process's rank; default from ``torch.distributed`` if initialised, else 0.
        world_size (int, optional): Number of ranks; default from ``torch.distributed``, else 1.
        block_docs (int): Documents per shuffle block. Default: 256.
        shuffle_window (int): Packed windows shuffled together. Default: 256.
        label_convention (str): ``"shifted"``: ``labels`` are the next tokens (nanoGPT, torchtitan, TinyGPT);
            ``"hf"``: ``labels`` are aligned with ``input_ids`` and the model shifts them (Hugging Face causal
            LMs). Default: ``"shifted"`` (what the loader has always produced).
        quality (QualityConfig, optional): Quality criteria and per-domain ``QualityParams``; domains it
            does not name take every document once per epoch until ``set_quality`` names them. Epochs then
            vary in size; ``max_epochs`` counts them (an epoch cut short by ``set_quality`` counts as one).
            Default: ``None``.
    """

    def __init__(
        self,
        domains: Sequence[Domain],
        *,
        batch_size: int,
        seq_len: int,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        seed: int = 0,
        num_workers: int = 2,
        prefetch: int = 64,
        exhaustion: str = "repeat",
        max_epochs: int | Mapping[str, int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        block_docs: int = 256,
        shuffle_window: int = 256,
        label_convention: str = "shifted",
        quality: QualityConfig | None = None,
    ):
        domains = list(domains)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("seq_len", seq_len)
        _check_positive_int("prefetch", prefetch)
        _check_positive_int("block_docs", block_docs)
        _check_positive_int("shuffle_window", shuffle_window)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        if not domains:
            raise DomainError("`domains` is empty; pass at least one Domain.")
        names = [domain.name for domain in domains]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DomainError(f"Domain names must be unique; {duplicates} appear more than once.")
        for domain in domains:
            if domain.num_samples(seq_len) < 1:
                raise DomainError(
                    f"Domain {domain.name!r} ({domain.path}) has {domain.num_tokens} tokens, too few for one "
                    f"sample of seq_len + 1 = {seq_len + 1} tokens; lower `seq_len` or add data."
                )
        _check_quality(quality, names)
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        check_convention(label_convention)
        self.label_convention = label_convention
        self.domains = domains
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch = prefetch
        self._stream_options = {
            "seq_len": seq_len,
            "seed": seed,
            "block_docs": block_docs,
            "shuffle_window": shuffle_window,
            "criteria": None if quality is None else quality.criteria,
        }
        self._quality = quality
        share = 1 / self.world_size  # of each domain's stream, which this rank reads
        self._streams = [DomainStream(domain, **self._stream_options, share=share) for domain in domains]
        segments = None
        if quality is not None:
            segments = [((0, 0, quality.params.get(name)),) for name in names]
            for stream, domain_segments in zip(self._streams, segments):
                stream.set_segments(domain_segments)  # reads the scores: a missing one fails here
        self._planner = MixturePlanner(
            names=names,
            samples_per_epoch=[stream.samples_per_epoch for stream in self._streams],
            global_batch_size=batch_size * self.world_size,
            weights=self._natural_weights()
            if weights is None
            else normalize_weights(weights, names, missing="error"),
            seed=seed,
            exhaustion=exhaustion,
            max_epochs=_resolve_max_epochs(max_epochs, exhaustion, names),
            settings={
                "seq_len": seq_len,
                "block_docs": block_docs,
                "shuffle_window": shuffle_window,
                "modes": [domain.mode for domain in domains],
                "eos_ids": [domain.eos_id for domain in domains],
                "pad_ids": [domain.pad_id for domain in domains],
                **({} if quality is None else _quality_settings(quality)),
            },
            quality_segments=segments,
        )
        self._lookahead = -(-prefetch * len(domains) // batch_size)
        self._prefetcher: DomainPrefetcher | None = None
        self._scout: MixturePlanner | None = None  # a fork of the planner that plans ahead for the prefetcher
        self._ahead: MixturePlanner | None = None  # planning ahead for DataLoader worker processes
        self._needs_mask = any(domain.mode == "document" for domain in domains)
        if quality is not None:
            self._set_capacity()

    # -- mixture ----------------------------------------------------------------------------------

    @property
    def domain_names(self) -> list[str]:
        """Domain names; ``batch["domain"]`` indexes this list."""
        return list(self._planner.names)

    @property
    def weights(self) -> dict[str, float]:
        """The mixture by domain name as last set, also when the change is scheduled for a later batch
        (see ``set_weights``); exhausted domains keep their entry."""
        return dict(zip(self._planner.names, self._planner.latest_weights.tolist()))

    def set_weights(self, weights: Mapping[str, float] | Sequence[float], *, missing: str = "error") -> None:
        """Use ``weights`` (dict by name or one value per domain; normalised) from the next batch on.

        Every rank must call this with the same weights at the same step (the controller broadcasts them).
        While a DataLoader with worker processes iterates (``as_dataloader(num_workers=W)``), the batches it
        has already handed to workers keep their weights and the change applies from the first batch not
        yet planned (see ``tikmix_loader.data.dataset``); ``weights`` and ``state_dict()`` show it at once.

        Args:
            weights (Mapping[str, float] | Sequence[float]): The new mixture.
            missing (str): ``"error"`` (a dict must name every domain) or ``"zero"`` (domains a dict leaves
                out get weight 0). Default: ``"error"``.

        Raises:
            MixtureWeightError: A weight is not a number, NaN, infinite or negative, all are zero, a dict
                names an unknown domain or leaves one out (unless ``missing="zero"``), or a sequence has
                the wrong length.
        """
        values = normalize_weights(weights, self._planner.names, missing=missing)
        at_batch = None
        if self._ahead is not None:
            at_batch = self._ahead.batch_index
            self._ahead.set_weights(values)
        self._planner.set_weights(values, at_batch=at_batch)
        self._scout = None  # what it planned ahead assumed the old weights
        logger.info("weights set to %s from batch %d", self.weights, self._planner.weight_history[-1][0])

    @property
    def quality_params(self) -> dict[str, QualityParams]:
        """The quality parameters by domain name as last set; domains taking every document once are left
        out (empty without ``quality=``)."""
        segments = self._planner.quality_segments or ()
        return {
            name: domain[-1][2]
            for name, domain in zip(self.domain_names, segments)
            if domain[-1][2] is not None
        }

    def set_quality(self, params: Mapping[str, QualityParams | Mapping | None]) -> None:
        """Use new quality parameters for the named domains (``None``: every document once) from the next
        batch on; other domains keep theirs.

        Each named domain whose parameters change starts a fresh epoch under the new ones at its first
        sample not yet planned; the rest of its current epoch is skipped (a domain given its current
        parameters is left as it is). Like ``set_weights``: every rank calls it at the same step; with
        DataLoader worker processes it applies from the first batch not yet planned; the change is part of
        ``state_dict()``.

        Raises:
            ConfigError: The loader was built without ``quality=``.
            DomainError: A name is not a domain of the loader.
            ScoreError: Parameters are malformed, have the wrong number of ``alpha`` weights, or keep less
                than one sample per epoch. Nothing is changed then.
        """
        if self._quality is None:
            raise ConfigError("set_quality() needs a loader built with `quality=QualityConfig(...)`.")
        unknown = sorted(set(params) - set(self.domain_names))
        if unknown:
            raise DomainError(
                f"Unknown domain(s) {unknown} in `set_quality`; the domains are {self.domain_names}."
            )
        checked = {name: self._quality.checked_params(name, value) for name, value in params.items()}
        current = self._planner.quality_segments
        checked = {  # unchanged parameters keep their epoch going
            name: value
            for name, value in checked.items()
            if value != current[self.domain_names.index(name)][-1][2]
        }
        for name, value in checked.items():
            if value is not None:
                self._streams[self.domain_names.index(name)].check_params(value)
        if not checked:
            return
        self.close()  # samples read ahead past the change were read under the old parameters
        planners = [planner for planner in (self._planner, self._ahead) if planner is not None]
        for name, value in checked.items():
            domain = self.domain_names.index(name)
            stream = self._streams[domain]
            start = int(planners[-1].consumed[domain])  # the first sample not yet planned
            epoch = stream.next_epoch(start)
            for planner in planners:
                planner.set_quality_segment(domain, start, epoch, value)
            stream.set_segments(self._planner.quality_segments[domain])
            logger.info("quality of domain %r set to %s from sample %d (epoch %d)", name, value, start, epoch)
        self._set_capacity()

    def _set_capacity(self) -> None:
        """Under quality sampling, end each domain's ``max_epochs`` where its epoch ``max_epochs`` starts
        (epochs vary in size, so the planner cannot count them itself)."""
        capacity = [
            math.inf if math.isinf(limit) else stream.epoch_start(int(limit))
            for stream, limit in zip(self._streams, self._planner.max_epochs)
        ]
        for planner in (self._planner, self._ahead):
            if planner is not None:
                planner.set_capacity(capacity)

    def served_document_tokens(self) -> dict[str, np.ndarray]:
        """Per domain, the tokens each stored document (storage order) has served as inputs so far, over all
        ranks: int64 ``[num_docs]``. Index math over the planned counts and the epoch layouts (see
        ``DomainStream.served_tokens``); nothing is read."""
        return {
            name: stream.served_tokens(int(count))
            for name, stream, count in zip(self.domain_names, self._streams, self._planner.consumed)
        }

    def natural_weights(self) -> dict[str, float]:
        """Each domain's share of all tokens."""
        return dict(zip(self.domain_names, self._natural_weights().tolist()))

    def _natural_weights(self) -> np.ndarray:
        tokens = np.array([domain.num_tokens for domain in self.domains], dtype=np.float64)
        return tokens / tokens.sum()

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches from the current position until the mixture is exhausted (never, by default)."""
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        """The next batch of this rank, or ``None`` once the mixture is exhausted."""
        plan = self.plan_next()
        if plan is None:
            return None
        return self.take_batch(plan)

    def plan_next(self) -> BatchPlan | None:
        """Plan the next global batch and move past it (``state_dict()`` counts it); ``None`` once exhausted.

        Reads nothing: pass the plan to ``take_batch`` (this process, prefetched) or ``read_batch``
        (on demand, e.g. in a DataLoader worker process).
        """
        plan = self._planner.plan()
        if plan is None:
            self.close()
        return plan

    def plan_ahead(self) -> MixturePlanner:
        """A copy of the planner that runs ahead of this loader: ``set_weights`` also reaches it and is
        scheduled in this loader at the copy's position, until ``stop_planning_ahead``. The DataLoader's
        plan sampler uses it to plan batches that worker processes read before they are delivered."""
        self._ahead = copy.deepcopy(self._planner)
        return self._ahead

    def stop_planning_ahead(self, ahead: MixturePlanner) -> None:
        """End ``plan_ahead`` (no-op when a newer copy has replaced ``ahead``)."""
        if self._ahead is ahead:
            self._ahead = None

    def take_batch(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """This rank's batch of the plan ``plan_next`` just returned, through the prefetch threads."""
        if self.num_workers > 0:
            self._read_ahead()
        return self._rank_batch(plan, self._prefetcher)

    def read_batch(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """This rank's batch of ``plan``, read on demand (no threads: safe in DataLoader worker processes)."""
        return self._rank_batch(plan, None)

    def _rank_batch(self, plan: BatchPlan, prefetcher: DomainPrefetcher | None) -> dict[str, torch.Tensor]:
        """Read only the samples of this rank's slice of the global batch ``plan``."""
        first = self.rank * self.batch_size
        domains, indices = plan.samples(first, first + self.batch_size)
        tokens = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        valid = np.empty(self.batch_size, dtype=np.int64)
        # Rows grouped by domain, each group in ascending stream order (reads fastest): one sort for all.
        order = np.lexsort((indices, domains))
        bounds = [0, *(np.flatnonzero(np.diff(domains[order])) + 1).tolist(), len(order)]
        for first, stop in zip(bounds[:-1], bounds[1:]):
            rows = order[first:stop]
            domain = int(domains[rows[0]])
            if prefetcher is None:
                if plan.segments is not None:  # a worker process's copy learns changes from the plan
                    self._streams[domain].set_segments(plan.segments[domain])
                tokens[rows], valid[rows] = self._streams[domain].read_at(indices[rows])
            else:
                tokens[rows], valid[rows] = prefetcher.take(domain, indices[rows])
        if prefetcher is not None:
            for domain, start in enumerate(plan.starts.tolist()):
                prefetcher.release_below(domain, start)
        return samples_to_batch(
            tokens, valid, domains, self._needs_mask, label_convention=self.label_convention
        )

    def _read_ahead(self) -> None:
        """Plan up to ``self._lookahead`` batches ahead on a fork and request this rank's samples of them."""
        if self._prefetcher is None:
            self._prefetcher = DomainPrefetcher(self._streams, num_workers=self.num_workers)
        if self._scout is None or self._scout.batch_index < self._planner.batch_index:
            self._scout = self._planner.fork()
        first = self.rank * self.batch_size
        while self._scout.batch_index < self._planner.batch_index + self._lookahead:
            plan = self._scout.plan()
            if plan is None:
                return
            domains, indices = plan.samples(first, first + self.batch_size)
            for domain in np.unique(domains):
                self._prefetcher.request(int(domain), np.sort(indices[domains == domain]))

    def close(self) -> None:
        """Stop the background threads (iteration restarts them)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self._scout = None

    def __getstate__(self) -> dict:
        # Pickled into spawned DataLoader workers, which only call read_batch: no threads, no planner copy.
        state = self.__dict__.copy()
        state["_prefetcher"], state["_ahead"] = None, None
        return state

    def __del__(self):
        if getattr(self, "_prefetcher", None) is not None:  # may run on a half-constructed loader
            self.close()

    # -- observation samples ----------------------------------------------------------------------

    def sample_domain(
        self, name: str, num_samples: int, *, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """A batch of ``num_samples`` random samples of one domain, leaving the training stream untouched.

        Samples are drawn uniformly from the domain's first epoch with a generator keyed by ``seed``
        (default: the loader seed and the current batch index, so successive decisions see fresh samples).
        Reads go through a private stream, so neither the state nor the prefetch queues change.
        """
        if name not in self.domain_names:
            raise DomainError(f"Unknown domain {name!r}; the domains are {self.domain_names}.")
        _check_positive_int("num_samples", num_samples)
        index = self.domain_names.index(name)
        stream = copy.copy(self._streams[index])  # shares the scores, not the caches
        stream.set_segments(((0, 0, self.quality_params.get(name)),))  # epoch 0 under today's quality
        stream.share = None  # a few scattered picks: read only the windows under them
        key = self._planner.batch_index if seed is None else seed
        rng = rng_for(self.seed, stable_key(name), OBSERVATION, key)
        epoch_samples = stream.epoch_samples(0)
        picks = rng.choice(epoch_samples, size=num_samples, replace=num_samples > epoch_samples)
        tokens, valid = stream.read_at(picks)
        return samples_to_batch(
            tokens,
            valid,
            np.full(num_samples, index),
            self._needs_mask,
            label_convention=self.label_convention,
        )

    def sample_batches(
        self, name: str, num_samples: int, *, batch_size: int, seed: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """``sample_domain(name, num_samples, seed=seed)`` cut into batches of at most ``batch_size`` rows
        (the form ``GroupInfluence`` takes targets and observation samples in)."""
        _check_positive_int("batch_size", batch_size)
        sample = self.sample_domain(name, num_samples, seed=seed)
        return [
            {key: value[start : start + batch_size] for key, value in sample.items()}
            for start in range(0, num_samples, batch_size)
        ]

    # -- accounting and state ---------------------------------------------------------------------

    @property
    def batches_seen(self) -> int:
        """Global batches planned so far."""
        return self._planner.batch_index

    def stats(self) -> dict[str, dict[str, float]]:
        """Per domain: samples and tokens consumed (all ranks), target share, realized share and epochs
        (under quality sampling: the current epoch plus the share of it consumed)."""
        consumed = self._planner.consumed
        total = max(int(consumed.sum()), 1)
        targets = self._planner.effective_weights()
        return {
            name: {
                "samples": int(consumed[index]),
                "tokens": int(consumed[index]) * self.seq_len,
                "target_share": float(targets[index]),
                "realized_share": float(consumed[index]) / total,
                "epochs": self._epochs_consumed(index),
            }
            for index, name in enumerate(self._planner.names)
        }

    def _epochs_consumed(self, domain: int) -> float:
        stream, count = self._streams[domain], int(self._planner.consumed[domain])
        if self._quality is None:
            return count / stream.samples_per_epoch
        epochs, positions = stream.locate(np.array([count]))
        return int(epochs[0]) + int(positions[0]) / max(stream.epoch_samples(int(epochs[0])), 1)

    def tokens_left(self) -> dict[str, float]:
        """Training tokens each domain can still supply before its ``max_epochs`` (``inf`` when unlimited)."""
        planner = self._planner
        left = np.maximum(planner.capacity - planner.consumed, 0) * self.seq_len
        return dict(zip(planner.names, np.where(planner.active, left, 0.0).tolist()))

    def state_dict(self) -> dict:
        """Flat JSON-able state: the settings it depends on, weight history, per-domain cursors, carried
        quota error."""
        return self._planner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (also under another world size, same global batch).

        Raises:
            StateError: ``state`` was saved under other settings (other domains, seed, global batch size,
                ``seq_len``, ``block_docs``, ``shuffle_window``, domain modes, EOS or pad ids; each changed
                one is named with both values), or a key is missing or malformed. The loader is unchanged.
                A version-1 state (saved before the settings were recorded) loads with a warning that the
                settings it lacks are assumed to match.
        """
        previous = self._planner.state_dict()
        self._planner.load_state_dict(state)
        self.close()
        if self._planner.quality_segments is not None:
            try:
                for stream, segments in zip(self._streams, self._planner.quality_segments):
                    stream.set_segments(segments)
            except TikmixError:
                self._planner.load_state_dict(previous)
                for stream, segments in zip(self._streams, self._planner.quality_segments):
                    stream.set_segments(segments)
                raise
            self._set_capacity()

    def as_dataloader(self, **kwargs):
        """A ``torch.utils.data.DataLoader`` over ``dataset`` that yields this loader's batches."""
        from tikmix_loader.data.dataset import as_dataloader

        return as_dataloader(self, **kwargs)


def samples_to_batch(
    tokens: np.ndarray,
    valid: np.ndarray,
    domain_ids: np.ndarray,
    needs_mask: bool,
    *,
    label_convention: str,
) -> dict[str, torch.Tensor]:
    """Samples of ``seq_len + 1`` tokens (``valid`` real ones each) as model inputs and labels.

    ``"shifted"``: ``labels[t] = tokens[t + 1]`` while ``t + 1 < valid``. ``"hf"``: ``labels[t] = tokens[t]``
    for ``1 <= t < valid`` (position 0 is never a target, so it is masked and ``labels != IGNORE_INDEX``
    counts the loss tokens); the window's last token then only serves the ``"shifted"`` convention.
    """
    shift = check_convention(label_convention)
    positions = np.arange(tokens.shape[1] - 1)
    labels = tokens[:, shift : shift + len(positions)].copy()  # a copy, never a view of the inputs
    # Only padded rows have positions past their end; full ones (every packed row) keep all their targets.
    padded = np.flatnonzero(valid < tokens.shape[1])
    if len(padded):
        past_end = positions[None, :] + shift >= valid[padded, None]
        labels[padded] = np.where(past_end, IGNORE_INDEX, labels[padded])
    if shift == 0:
        labels[:, 0] = IGNORE_INDEX
    batch = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "labels": torch.from_numpy(labels),
        LABEL_SHIFT_KEY: torch.full((len(tokens),), shift, dtype=torch.long),
        "domain": torch.from_numpy(domain_ids.astype(np.int64)),
    }
    if needs_mask:
        batch["attention_mask"] = torch.from_numpy((positions[None, :] < valid[:, None]).astype(np.int64))
    return batch


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"`{name}` must be a positive int, got {value!r}.")


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    _check_positive_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"`rank` must be in [0, world_size={world_size}), got {rank!r}.")
    return int(rank), int(world_size)


def _check_quality(quality, names: list[str]) -> None:
    if quality is None:
        return
    if not isinstance(quality, QualityConfig):
        raise ConfigError(f"`quality` must be a QualityConfig, got {type(quality).__name__}.")
    unknown = sorted(set(quality.params) - set(names))
    if unknown:
        raise DomainError(f"Unknown domain(s) {unknown} in `quality.params`; the domains are {names}.")


def _quality_settings(quality: QualityConfig) -> dict:
    """The quality configuration as loader settings: a state saved under another one is refused."""
    values = quality.to_dict()
    return {"quality_criteria": values["criteria"], "quality_params": values["params"]}


def _resolve_max_epochs(max_epochs, exhaustion: str, names: list[str]) -> np.ndarray:
    default = math.inf if exhaustion == "repeat" else 1
    if max_epochs is None:
        return np.full(len(names), default, dtype=np.float64)
    if isinstance(max_epochs, Mapping):
        unknown = sorted(set(max_epochs) - set(names))
        if unknown:
            raise DomainError(f"Unknown domain(s) {unknown} in `max_epochs`; the domains are {names}.")
        values = [max_epochs.get(name, default) for name in names]
    else:
        values = [max_epochs] * len(names)
    for name, value in zip(names, values):
        if not (value == math.inf or (isinstance(value, (int, np.integer)) and value >= 1)):
            raise ConfigError(f"`max_epochs` for domain {name!r} must be a positive int, got {value!r}.")
    return np.asarray(values, dtype=np.float64)
