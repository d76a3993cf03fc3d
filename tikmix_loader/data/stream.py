"""``DomainStream``: random access to the n-th training sample of one domain, across epochs.

A domain's samples form one infinite, deterministic sequence: epoch 0's samples, then epoch 1's, ...,
each epoch in its own shuffled order (``shuffle.BlockShuffle``). Sample ``j`` depends only on
``(seed, domain name, j)`` and the data, never on weights, batch size, ranks or the samples drawn before,
which is what lets the loader change weights, resume and rescale exactly.

Packed mode: the epoch's documents, each followed by EOS, form one token stream cut into windows of
``seq_len + 1`` tokens with stride ``seq_len``. Windows are shuffled within chunks of ``shuffle_window``
consecutive windows so that neighbouring windows of one long document rarely share a batch.
Document mode: sample ``i`` of an epoch is the ``i``-th document in shuffled order, truncated and padded.

Quality sampling (QuaDMix, ``docs/quadmix.md``): under ``QualityParams`` an epoch holds each document as
many times as ``QualitySampler.copies(seed, domain, epoch)`` says; each shuffle block expands to its
documents repeated by their copies before the within-block shuffle, and a document with 0 copies is never
served. Epochs then differ in size, so the stream is a list of *segments* ``(first index, first epoch,
params)`` (a parameter change starts a fresh epoch at the next unplanned sample) and the epoch of an index
comes from cumulative epoch sizes, grown lazily. All of it is index math over lengths and copies.
"""

from __future__ import annotations

import bisect
import functools
import threading

import numpy as np

from tikmix_loader.data import _compiled
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.shuffle import WINDOW_ORDER, BlockShuffle, keyed_permutation, stable_key
from tikmix_loader.data.sources.base import concatenated_ranges
from tikmix_loader.errors import ScoreError, StateError
from tikmix_loader.quality.sampler import QualityParams, QualitySampler
from tikmix_loader.quality.scores import read_scores

# A run of rows needing under 1/SPARSE_RATIO of an uncached chunk's windows reads only the token ranges
# under them; more, and reading the whole chunk (and caching it) is cheaper. A reader that will take at
# least 1/SPARSE_RATIO of all samples (``share``) reads whole chunks even in small runs: it comes back for
# the rest of the chunk, and a format that decodes whole documents (MDS, Parquet) would otherwise decode
# a document once per window over it.
SPARSE_RATIO = 4
_INDEX_CACHE = 64  # block indexes kept for token-range reads
# Packed reads of at most this many rows keep their bookkeeping in Python ints (``_sparse_window_starts``)
# and cut their windows in compiled code or Python ints (``_window_pieces_scalar``): a rank at large world
# size reads a few rows per domain, and each numpy call on arrays that small costs more than the arithmetic.
SCALAR_ROWS = 16

# A stretch of the stream: from stream index ``start`` on, epochs ``epoch, epoch + 1, ...`` under ``params``
# (``None``: every document once per epoch).
Segment = tuple[int, int, "QualityParams | None"]
PLAIN: tuple[Segment, ...] = ((0, 0, None),)


class DomainStream:
    """Sample ``j`` of a domain's endless shuffled stream as ``seq_len + 1`` token ids.

    Args:
        domain (Domain): The domain to read.
        seq_len (int): Model context; samples hold ``seq_len + 1`` tokens (inputs plus shifted labels).
        seed (int): Global seed.
        block_docs (int): Documents per shuffle block. Default: 256.
        shuffle_window (int): Packed windows shuffled together. Default: 256.
        criteria (Mapping[str, str], optional): Quality criteria (name -> ``"lower"``/``"higher"``) that
            ``QualityParams.alpha`` follows; needed before ``set_segments`` names parameters. The scores are
            read on first use. Default: ``None``.
        share (float, optional): The fraction of the stream's samples this reader will take, in order
            (``1 / world_size`` for one rank of a loader); it decides how packed windows are read, never
            what they hold. Default: ``None`` (unknown: only the size of each read decides).
    """

    def __init__(
        self,
        domain: Domain,
        *,
        seq_len: int,
        seed: int,
        block_docs: int = 256,
        shuffle_window: int = 256,
        criteria=None,
        share: float | None = None,
    ):
        self.domain = domain
        self.seq_len = seq_len
        self.seed = seed
        self.block_docs = block_docs
        self.shuffle_window = shuffle_window
        self.share = share
        self.domain_key = stable_key(domain.name)
        self.samples_per_epoch = domain.num_samples(seq_len)
        lengths = domain.doc_lengths
        starts = np.arange(0, len(lengths), block_docs)
        # Tokens (documents plus one EOS each) and documents per block, in storage order.
        self._block_starts = starts
        self._block_tokens = np.add.reduceat(lengths + 1, starts) if len(lengths) else np.zeros(0, np.int64)
        self._block_docs = np.diff(np.append(starts, len(lengths)))
        self.criteria = None if criteria is None else dict(criteria)
        self._scores: dict[str, np.ndarray] | None = None
        self._samplers: dict[QualityParams, QualitySampler] = {}
        self.segments: tuple[Segment, ...] = PLAIN
        self._reset()

    def _reset(self) -> None:
        """Forget everything derived from the segments (epoch sizes and layouts, block caches)."""
        self._lock = threading.Lock()  # guards the lazily grown epoch starts (prefetch thread and caller)
        self._epoch_starts = [np.zeros(1, dtype=np.int64) for _ in self.segments]
        self._epoch_sizes: dict[int, int] = {}
        self._epoch_layout: tuple | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._chunk_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._index_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # What ``_reset`` rebuilds; left out of pickles and copies.
    _DERIVED = (
        "_lock",
        "_epoch_starts",
        "_epoch_sizes",
        "_epoch_layout",
        "_block_cache",
        "_chunk_cache",
        "_index_cache",
    )

    def __getstate__(self) -> dict:
        # Pickled into DataLoader worker processes and copied for observation samples: a lock does not
        # pickle, and a copy must not share the caches a prefetch thread of the original is filling.
        return {key: value for key, value in self.__dict__.items() if key not in self._DERIVED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- quality segments -------------------------------------------------------------------------

    def set_segments(self, segments) -> None:
        """Read the stream as ``segments``: ``(start index, first epoch, QualityParams | None)`` triples,
        the first starting at index 0 and epoch 0, starts and epochs increasing.

        Raises:
            ScoreError: Parameters are given but the stream has no ``criteria`` or its scores are missing,
                or parameters keep less than one sample per epoch on average.
            StateError: The segments are not in that form.
        """
        segments = tuple((int(start), int(epoch), params) for start, epoch, params in segments)
        if segments == self.segments:
            return
        starts = [start for start, _, _ in segments]
        epochs = [epoch for _, epoch, _ in segments]
        if (
            not segments
            or segments[0][:2] != (0, 0)
            or starts != sorted(set(starts))
            or epochs != sorted(epochs)
        ):
            raise StateError(
                f"Domain {self.domain.name!r}: quality segments {segments} must start at (0, 0) with "
                f"increasing start indices and epochs."
            )
        for _, _, params in segments:
            if params is not None:
                self.check_params(params)
        previous, self.segments = self.segments, segments
        self._reset()
        for start, epoch, _ in segments[1:]:
            if epoch < self.next_epoch(start):  # epochs are keys: one must never be read under two params
                self.segments = previous
                self._reset()
                raise StateError(
                    f"Domain {self.domain.name!r}: the quality segment at sample {start} starts at epoch "
                    f"{epoch}, but the samples before it reach epoch {self.next_epoch(start) - 1}."
                )

    def sampler(self, params: QualityParams) -> QualitySampler:
        """The domain's ``QualitySampler`` under ``params`` (scores are read once, on first use)."""
        if params not in self._samplers:
            if self.criteria is None:
                raise ScoreError(
                    f"Domain {self.domain.name!r}: quality parameters need criteria; pass `quality=` to "
                    f"the loader."
                )
            if self._scores is None:
                self._scores = read_scores(self.domain, self.criteria)
            self._samplers[params] = QualitySampler(
                self.domain.name, self._scores, self.domain.doc_lengths, self.criteria, params
            )
        return self._samplers[params]

    def check_params(self, params: QualityParams) -> None:
        """``ScoreError`` unless the domain's scores fit ``params`` and they keep a sample per epoch."""
        expected = self.sampler(params).expected_copies
        lengths = self.domain.doc_lengths
        if self.domain.mode == "packed":
            samples = (float(np.dot(lengths + 1, expected)) - 1) / self.seq_len
        else:
            samples = float(expected.sum())
        if samples < 1:
            raise ScoreError(
                f"Domain {self.domain.name!r}: quality parameters {params} keep {samples:.2f} samples per "
                f"epoch on average, less than one; raise `eps` or `omega`."
            )

    def epoch_copies(self, epoch: int) -> np.ndarray | None:
        """Copies of each stored document in ``epoch``; ``None`` when the epoch takes each once."""
        params = next(params for _, first, params in reversed(self.segments) if first <= epoch)
        return None if params is None else self.sampler(params).copies(self.seed, self.domain_key, epoch)

    def epoch_samples(self, epoch: int) -> int:
        """Samples in ``epoch`` (``samples_per_epoch`` unless quality sampling resizes it)."""
        size = self._epoch_sizes.get(epoch)
        if size is None:
            copies = self.epoch_copies(epoch)
            if copies is None:
                size = self.samples_per_epoch
            elif self.domain.mode == "packed":
                size = max(0, int(np.dot(self.domain.doc_lengths + 1, copies)) - 1) // self.seq_len
            else:
                size = int(copies.sum())
            self._epoch_sizes[epoch] = size
        return size

    def _segment_epoch_starts(self, segment: int, local: int) -> np.ndarray:
        """Cumulative epoch sizes of ``segment`` from its first index, grown until they pass ``local``."""
        with self._lock:
            cumulative = self._epoch_starts[segment]
            if cumulative[-1] <= local:
                first = self.segments[segment][1]
                grown = list(cumulative)
                while grown[-1] <= local:
                    grown.append(grown[-1] + self.epoch_samples(first + len(grown) - 1))
                cumulative = self._epoch_starts[segment] = np.asarray(grown, dtype=np.int64)
            return cumulative

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, positions)``: the epoch of each stream index and its sample position in that epoch."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.segments == PLAIN:
            return np.divmod(indices, self.samples_per_epoch)
        epochs = np.empty_like(indices)
        positions = np.empty_like(indices)
        starts = np.array([start for start, _, _ in self.segments], dtype=np.int64)
        which = np.searchsorted(starts, indices, side="right") - 1
        for segment in np.unique(which).tolist():
            rows = which == segment
            local = indices[rows] - starts[segment]
            cumulative = self._segment_epoch_starts(segment, int(local.max()))
            epoch = np.searchsorted(cumulative, local, side="right") - 1  # skips epochs of 0 samples
            epochs[rows] = self.segments[segment][1] + epoch
            positions[rows] = local - cumulative[epoch]
        return epochs, positions

    def epoch_start(self, epoch: int) -> int:
        """The stream index where ``epoch`` starts (where the samples of the epochs before it end)."""
        segment = max(k for k, (_, first, _) in enumerate(self.segments) if first <= epoch)
        start, first, _ = self.segments[segment]
        cumulative = self._segment_epoch_starts(segment, 0)
        while len(cumulative) <= epoch - first:
            cumulative = self._segment_epoch_starts(segment, int(cumulative[-1]))
        return start + int(cumulative[epoch - first])

    def next_epoch(self, index: int) -> int:
        """The epoch a segment starting at stream index ``index`` begins with: one past ``index - 1``'s."""
        return 0 if index == 0 else int(self.locate(np.array([index - 1]))[0][0]) + 1

    # -- public -----------------------------------------------------------------------------------

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``start .. start+count-1`` as ``(tokens int64 [count, seq_len+1], valid int64 [count])``.

        ``valid[i]`` is the number of real (non-padding) tokens of sample ``i``; padding is ``pad_id``.
        """
        return self.read_at(np.arange(start, start + count, dtype=np.int64))

    def read_at(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream ``indices`` (any order; ascending is fastest), laid out like ``read``'s.

        A rank reads its own, scattered samples of a global batch this way. In packed mode the samples
        that share a shuffle chunk are gathered in one vectorised step; when only a few windows of a chunk
        are wanted, only the token ranges of the documents under them are read (in one vectorised call
        for all such windows), so a rank's I/O follows its share of the batch; a read of at most
        ``SCALAR_ROWS`` such windows does its bookkeeping in Python ints. In document mode only each
        document's first ``seq_len + 1`` tokens are read. The result never depends on which way a sample
        was read.
        """
        indices = np.asarray(indices, dtype=np.int64)
        count = len(indices)
        valid = np.full(count, self.seq_len + 1, dtype=np.int64)
        if 0 < count <= SCALAR_ROWS and self.domain.mode == "packed":
            sparse = self._sparse_window_starts(indices.tolist())
            if sparse is not None:
                return self._read_sparse_windows(*sparse), valid
        tokens = np.empty((count, self.seq_len + 1), dtype=np.int64)
        if count == 0:
            return tokens, valid
        epochs, positions = self.locate(indices)
        if self.domain.mode == "document":
            for epoch in np.unique(epochs).tolist():
                rows = np.flatnonzero(epochs == epoch)
                tokens[rows], valid[rows] = self._documents(epoch, positions[rows])
            return tokens, valid
        chunks, offsets = np.divmod(positions, self.shuffle_window)
        # Runs of consecutive rows in one (epoch, chunk): each dense run is one gather; the windows of the
        # sparse runs are read together below. Loop bookkeeping is in Python ints: a rank at large world
        # size has a few rows per domain, where numpy scalars would cost more than the arrays.
        bounds = [0, *(np.flatnonzero((np.diff(epochs) != 0) | (np.diff(chunks) != 0)) + 1).tolist(), count]
        firsts = bounds[:-1]
        few_reads = self.share is None or self.share * SPARSE_RATIO < 1
        sparse = np.zeros(count, dtype=bool)
        windows = np.zeros(count, dtype=np.int64)  # of sparse rows: window index in its chunk
        for first, stop, epoch, chunk in zip(
            firsts, bounds[1:], epochs[firsts].tolist(), chunks[firsts].tolist()
        ):
            if (
                few_reads
                and (stop - first) * SPARSE_RATIO < self.shuffle_window
                and not self._chunk_cached(epoch, chunk)
            ):
                # A few windows of this chunk (a rank's share at large world size): read them sparsely below.
                sparse[first:stop] = True
                windows[first:stop] = self._window_order(epoch, chunk)[offsets[first:stop]]
                continue
            chunk_tokens, order = self._chunk(epoch, chunk)
            starts = order[offsets[first:stop]] * self.seq_len
            tokens[first:stop] = chunk_tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        if not sparse.any():
            return tokens, valid
        window_starts = (chunks * self.shuffle_window + windows) * self.seq_len  # in the epoch's token stream
        if sparse.all() and (epochs == epochs[0]).all():  # the usual sparse read: one epoch, no dense run
            return self._packed_windows(int(epochs[0]), window_starts), valid
        for epoch in np.unique(epochs[sparse]).tolist():
            rows = np.flatnonzero(sparse & (epochs == epoch))
            tokens[rows] = self._packed_windows(epoch, window_starts[rows])
        return tokens, valid

    def _sparse_window_starts(self, indices: list[int]) -> tuple[list[int], list[int]] | None:
        """The scalar path's bookkeeping for a few packed rows: ``(epochs, window starts)`` of each row (the
        window's token offset in its epoch's packed stream), in Python ints; ``None`` when any row would be
        read densely (then the vectorised path reads them all). Rows are read sparsely under the same rule as
        the vectorised path's: few reads, a run of rows in one chunk under 1/SPARSE_RATIO of it, uncached.
        """
        if self.share is not None and self.share * SPARSE_RATIO >= 1:
            return None
        if self.segments == PLAIN:
            epochs, positions = zip(*(divmod(index, self.samples_per_epoch) for index in indices))
        else:
            epochs, positions = (values.tolist() for values in self.locate(np.asarray(indices)))
        window, seq_len = self.shuffle_window, self.seq_len
        starts, orders = [], {}  # window orders of the chunks met so far, by (epoch, chunk)
        run, previous = 0, None  # rows so far in the current run of one (epoch, chunk)
        for epoch, position in zip(epochs, positions):
            chunk, offset = divmod(position, window)
            run = run + 1 if (epoch, chunk) == previous else 1
            previous = (epoch, chunk)
            if run * SPARSE_RATIO >= window:
                return None
            order = orders.get(previous)
            if order is None:
                if self._chunk_cached(epoch, chunk):
                    return None
                order = orders[previous] = self._window_order(epoch, chunk)
            starts.append((chunk * window + int(order[offset])) * seq_len)
        return list(epochs), starts

    def _read_sparse_windows(self, epochs: list[int], starts: list[int]) -> np.ndarray:
        """Packed windows at token offsets ``starts`` of epochs ``epochs`` (one per row), read sparsely."""
        if all(epoch == epochs[0] for epoch in epochs):
            return self._packed_windows(epochs[0], starts)
        tokens = np.empty((len(starts), self.seq_len + 1), dtype=np.int64)
        for epoch in sorted(set(epochs)):
            rows = [row for row, row_epoch in enumerate(epochs) if row_epoch == epoch]
            tokens[rows] = self._packed_windows(epoch, [starts[row] for row in rows])
        return tokens

    def served_tokens(self, count: int) -> np.ndarray:
        """Tokens of each stored document that samples ``0 .. count-1`` hold as inputs, int64 ``[num_docs]``.

        A packed sample's inputs are its window's first ``seq_len`` tokens, so each token of an epoch's
        packed stream is counted once when its window is served (a window spanning documents counts the
        tokens of each; EOS tokens belong to no document). A document-mode sample's inputs are the
        document's first ``seq_len`` tokens. Index math over lengths and copies only; no data is read.
        """
        served = np.zeros(self.domain.num_docs, dtype=np.int64)
        lengths = self.domain.doc_lengths
        for epoch, taken in self._epoch_prefixes(count):
            shuffle, _, copies = self._compute_layout(epoch)  # not the cached one: a prefetch thread uses it
            order = np.concatenate([shuffle.documents(int(block), copies) for block in shuffle.block_order])
            if self.domain.mode == "document":
                np.add.at(served, order[:taken], np.minimum(lengths[order[:taken]], self.seq_len))
                continue
            windows = np.zeros(self.epoch_samples(epoch), dtype=np.int64)  # 1 where the window was served
            whole = taken // self.shuffle_window * self.shuffle_window
            windows[:whole] = 1
            if taken > whole:
                windows[whole + self._window_order(epoch, taken // self.shuffle_window)[: taken - whole]] = 1
            starts = np.cumsum(lengths[order] + 1) - lengths[order] - 1  # each document's first token
            covered = _served_below(starts + lengths[order], windows, self.seq_len)
            np.add.at(served, order, covered - _served_below(starts, windows, self.seq_len))
        return served

    def _epoch_prefixes(self, count: int):
        """``(epoch, samples taken from its start)`` for every epoch that samples ``0 .. count-1`` reach."""
        bounds = [start for start, _, _ in self.segments[1:]] + [count]
        for segment, (start, first_epoch, _) in enumerate(self.segments):
            end = min(bounds[segment], count) - start  # samples of this segment that were taken
            if end <= 0:
                return
            cumulative = self._segment_epoch_starts(segment, end - 1)
            for epoch, (low, high) in enumerate(zip(cumulative[:-1].tolist(), cumulative[1:].tolist())):
                if low >= end:
                    break
                if high > low:
                    yield first_epoch + epoch, min(high, end) - low

    # -- epoch layout -----------------------------------------------------------------------------

    def _layout(self, epoch: int) -> tuple[BlockShuffle, np.ndarray, np.ndarray | None]:
        """The epoch's block shuffle, the cumulative size (tokens or docs) of blocks in shuffled order, and
        the copies of each document (``None``: one each); the last epoch's is cached."""
        layout = self._epoch_layout
        if layout is None or layout[0] != epoch:
            layout = self._epoch_layout = (epoch, *self._compute_layout(epoch))
        return layout[1], layout[2], layout[3]

    def _compute_layout(self, epoch: int) -> tuple[BlockShuffle, np.ndarray, np.ndarray | None]:
        shuffle = BlockShuffle(self.domain.num_docs, self.block_docs, self.seed, self.domain_key, epoch)
        copies = self.epoch_copies(epoch)
        packed = self.domain.mode == "packed"
        if copies is None:
            sizes = self._block_tokens if packed else self._block_docs
        else:
            sizes = np.add.reduceat(
                (self.domain.doc_lengths + 1) * copies if packed else copies, self._block_starts
            )
        cumulative = np.concatenate(([0], np.cumsum(sizes[shuffle.block_order])))
        return shuffle, cumulative, copies

    def _block(self, epoch: int, position: int) -> np.ndarray:
        """Packed tokens of the block at ``position`` in the epoch's block order: its documents in shuffled
        order, each followed by EOS. The last one read is kept."""
        key = (epoch, position)
        if self._block_cache is None or self._block_cache[0] != key:
            shuffle, _, copies = self._layout(epoch)
            order = shuffle.documents(int(shuffle.block_order[position]), copies)
            # One read per run of consecutive served documents (the whole block without quality sampling),
            # so a document with 0 copies is never read.
            served = np.unique(order)
            documents = {}
            for run in np.split(served, np.flatnonzero(np.diff(served) > 1) + 1):
                documents.update(zip(run.tolist(), self.domain.read_docs(int(run[0]), int(run[-1]) + 1)))
            eos = np.array([self.domain.eos_id], dtype=np.int64)
            pieces = [piece for i in order.tolist() for piece in (documents[i], eos)]
            self._block_cache = (key, np.concatenate(pieces).astype(np.int64, copy=False))
        return self._block_cache[1]

    # -- packed mode ------------------------------------------------------------------------------

    def _chunk_cached(self, epoch: int, chunk: int) -> bool:
        return self._chunk_cache is not None and self._chunk_cache[0] == (epoch, chunk)

    def _window_order(self, epoch: int, chunk: int) -> np.ndarray:
        """The shuffled order of the chunk's windows (offsets into the chunk)."""
        count = min(self.shuffle_window, self.epoch_samples(epoch) - chunk * self.shuffle_window)
        return _window_permutation(self.seed, self.domain_key, epoch, chunk, count)

    def _chunk(self, epoch: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Token span of ``shuffle_window`` consecutive windows and their shuffled order."""
        if not self._chunk_cached(epoch, chunk):
            order = self._window_order(epoch, chunk)
            start = chunk * self.shuffle_window * self.seq_len
            stop = start + len(order) * self.seq_len + 1
            self._chunk_cache = ((epoch, chunk), self._token_span(epoch, start, stop), order)
        return self._chunk_cache[1], self._chunk_cache[2]

    def _token_span(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the epoch's packed stream, read as whole blocks (the last one kept),
        which is fastest when the next reads are nearby."""
        _, cumulative, _ = self._layout(epoch)
        position = int(np.searchsorted(cumulative, start, side="right")) - 1
        pieces = []
        cursor = start
        while cursor < stop:
            block_start = int(cumulative[position])
            if cumulative[position + 1] == block_start:  # every document of the block has 0 copies
                position += 1
                continue
            take = self._block(epoch, position)[cursor - block_start : stop - block_start]
            pieces.append(take)
            cursor += len(take)
            position += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _block_index(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Storage ids of the block's documents in shuffled order, and (packed mode) where each starts and
        ends (after its EOS) in the epoch's packed stream.

        Computed from the document lengths alone (no data read); the last ``_INDEX_CACHE`` are kept, since
        a rank's next sample is often in a block it just read from.
        """
        key = (epoch, position)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) >= _INDEX_CACHE:
                self._index_cache.pop(next(iter(self._index_cache)))  # oldest first
            shuffle, cumulative, copies = self._layout(epoch)
            documents = shuffle.documents(int(shuffle.block_order[position]), copies)
            sizes = self.domain.doc_lengths[documents] + 1  # each document plus its EOS
            ends = int(cumulative[position]) + np.cumsum(sizes)
            index = self._index_cache[key] = (documents, ends - sizes, ends)
        return index

    def _packed_windows(self, epoch: int, starts) -> np.ndarray:
        """The windows of ``seq_len + 1`` tokens at token offsets ``starts`` of the epoch's packed stream,
        ``int64 [len(starts), seq_len + 1]``, reading only the token ranges of documents under them.

        A window is cut into pieces, one per document it overlaps (the part of the document inside the
        window, then its EOS if that is inside too), and all pieces' tokens come from one
        ``read_doc_ranges`` call. Only the touched blocks' indexes are built. The cutting is vectorised over
        windows, or compiled (else a Python loop) for at most ``SCALAR_ROWS`` windows (numpy calls on arrays
        of a few elements cost more than the arithmetic); all give the same pieces.
        """
        width = self.seq_len + 1
        cut = self._window_pieces_scalar if len(starts) <= SCALAR_ROWS else self._window_pieces
        docs, lows, highs, eos_at = cut(epoch, starts)
        ranges = (np.asarray(values, dtype=np.int64) for values in (docs, lows, highs))  # the API's arrays
        content = self.domain.read_doc_ranges(*ranges)
        if not len(eos_at):  # no document ends inside the windows: the content is the windows
            return content.astype(np.int64, copy=False).reshape(len(starts), width)
        # Pieces tile each window in order, so the content fills every position that is not an EOS.
        windows = np.full(len(starts) * width, self.domain.eos_id, dtype=np.int64)
        is_content = np.ones(len(windows), dtype=bool)
        is_content[eos_at] = False
        windows[is_content] = content
        return windows.reshape(len(starts), width)

    def _window_pieces(self, epoch: int, starts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The pieces of the windows at ``starts``: ``(docs, lows, highs, eos_at)``, piece ``i`` being tokens
        ``lows[i] .. highs[i]-1`` of document ``docs[i]``, in window order, and ``eos_at`` the flat
        positions (row * width + column) of the EOS tokens in the windows. Vectorised over windows."""
        starts = np.asarray(starts, dtype=np.int64)
        width = self.seq_len + 1
        stops = starts + width
        _, cumulative, _ = self._layout(epoch)
        # The blocks under each window's first and last token, and any between: a Python set, cheaper than
        # numpy's unique for the few windows of a rank's read.
        bounds = (np.searchsorted(cumulative, np.concatenate((starts, stops - 1)), side="right") - 1).tolist()
        blocks = sorted(
            {block for first, last in zip(bounds, bounds[len(starts) :]) for block in range(first, last + 1)}
        )
        indexes = [self._block_index(epoch, block) for block in blocks]
        # The touched blocks' documents in stream order, and where each starts and ends in the epoch.
        if len(indexes) == 1:
            docs, doc_starts, ends = indexes[0]
        else:
            docs, doc_starts, ends = (np.concatenate(parts) for parts in zip(*indexes))
        low = np.searchsorted(ends, starts, side="right")  # first and last document under each window
        high = np.searchsorted(ends, stops - 1, side="right")
        counts = high - low + 1
        piece_doc = concatenated_ranges(low, counts)
        piece_window = np.repeat(np.arange(len(starts)), counts)
        piece_ends = ends[piece_doc]
        piece_doc_starts = doc_starts[piece_doc]
        piece_start = np.maximum(starts[piece_window], piece_doc_starts)
        piece_stop = np.minimum(stops[piece_window], piece_ends)
        with_eos = piece_stop == piece_ends
        eos_at = (piece_window * width + piece_ends - 1 - starts[piece_window])[with_eos]
        lows, highs = piece_start - piece_doc_starts, piece_stop - with_eos - piece_doc_starts
        return docs[piece_doc], lows, highs, eos_at

    def _window_pieces_scalar(self, epoch: int, starts) -> tuple:
        """``_window_pieces`` for a few windows, without numpy calls on arrays of a few elements: in compiled
        code (``_compiled``'s ``window_pieces``) or, when that is unavailable, walking each window's
        documents in Python ints (the same walk; a Python loop per document piece costs more than the rest
        of a rank's read)."""
        width = self.seq_len + 1
        _, cumulative, _ = self._layout(epoch)
        first_blocks = (np.searchsorted(cumulative, starts, side="right") - 1).tolist()
        library = _compiled.module()
        if library is not None:
            return library.window_pieces(
                starts, width, first_blocks, functools.partial(self._block_index, epoch)
            )
        docs, lows, highs, eos_at = [], [], [], []
        indexes = {}  # the block indexes met so far
        for row, (start, block) in enumerate(zip(starts, first_blocks)):
            cursor, stop = start, start + width
            while cursor < stop:  # one block per pass (a block of documents with 0 copies adds nothing)
                index = indexes.get(block)
                if index is None:
                    index = indexes[block] = self._block_index(epoch, block)
                ids, doc_starts, ends = index
                doc = bisect.bisect_right(ends, cursor)  # the first document ending after the cursor
                while doc < len(ids) and cursor < stop:
                    doc_start, end = int(doc_starts[doc]), int(ends[doc])
                    piece_stop = min(stop, end)
                    docs.append(int(ids[doc]))
                    lows.append(cursor - doc_start)
                    if piece_stop == end:  # the document's EOS is inside the window
                        highs.append(end - 1 - doc_start)
                        eos_at.append(row * width + end - 1 - start)
                    else:
                        highs.append(piece_stop - doc_start)
                    cursor = piece_stop
                    doc += 1
                block += 1
        return docs, lows, highs, eos_at

    # -- document mode ----------------------------------------------------------------------------

    def _documents(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Document-mode samples at ``positions`` of the epoch, like ``read_at``'s result.

        Only each document's first ``seq_len + 1`` tokens are read; the EOS closes a document that fits.
        """
        width = self.seq_len + 1
        _, cumulative, _ = self._layout(epoch)
        blocks = np.searchsorted(cumulative, positions, side="right") - 1
        docs = np.empty(len(positions), dtype=np.int64)
        for block in np.unique(blocks).tolist():
            rows = np.flatnonzero(blocks == block)
            docs[rows] = self._block_index(epoch, block)[0][positions[rows] - cumulative[block]]
        lengths = self.domain.doc_lengths[docs]
        kept = np.minimum(lengths, width)
        tokens = np.full((len(positions), width), self.domain.pad_id, dtype=np.int64)
        tokens[np.arange(width) < kept[:, None]] = self.domain.read_doc_ranges(
            docs, np.zeros_like(kept), kept
        )
        short = np.flatnonzero(lengths < width)
        tokens[short, lengths[short]] = self.domain.eos_id
        return tokens, np.minimum(lengths + 1, width)


def _served_below(positions: np.ndarray, windows: np.ndarray, seq_len: int) -> np.ndarray:
    """Input tokens before each packed-stream position that lie in served windows (window ``w``'s inputs
    are tokens ``[w * seq_len, (w + 1) * seq_len)``; ``windows[w]`` is 1 when it was served)."""
    before = np.concatenate(([0], np.cumsum(windows))) * seq_len  # served tokens below window w's start
    window = positions // seq_len
    inside = window < len(windows)
    partial = np.where(
        inside, windows[np.minimum(window, len(windows) - 1)] * (positions - window * seq_len), 0
    )
    return before[np.minimum(window, len(windows))] + partial


@functools.lru_cache(maxsize=1024)
def _window_permutation(seed: int, domain_key: int, epoch: int, chunk: int, count: int) -> np.ndarray:
    # Cached: sparse reads revisit a chunk once per sample, and seeding a generator costs more than the read.
    order = keyed_permutation(seed, domain_key, epoch, WINDOW_ORDER, chunk, n=count)
    order.flags.writeable = False
    return order
