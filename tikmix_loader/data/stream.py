"""``DomainStream``: random access to the n-th training sample of one domain, across epochs.

A domain's samples form one infinite, deterministic sequence: epoch 0's samples, then epoch 1's, ...,
each epoch in its own shuffled order (``shuffle.BlockShuffle``). Sample ``j`` depends only on
``(seed, domain name, j)`` and the data, never on weights, batch size, ranks or the samples drawn before,
which is what lets the loader change weights, resume and rescale exactly.

Packed mode: the epoch's documents, each followed by EOS, form one token stream cut into windows of
``seq_len + 1`` tokens with stride ``seq_len``. Windows are shuffled within chunks of ``shuffle_window``
consecutive windows so that neighbouring windows of one long document rarely share a batch.
Document mode: sample ``i`` of an epoch is the ``i``-th document in shuffled order, truncated and padded.
"""

from __future__ import annotations

import functools

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.shuffle import WINDOW_ORDER, BlockShuffle, rng_for, stable_key
from tikmix_loader.data.sources.base import concatenated_ranges

# A run of rows needing under 1/SPARSE_RATIO of an uncached chunk's windows reads only the token ranges
# under them; more, and reading the whole chunk (and caching it) is cheaper. A reader that will take at
# least 1/SPARSE_RATIO of all samples (``share``) reads whole chunks even in small runs: it comes back for
# the rest of the chunk, and a format that decodes whole documents (MDS, Parquet) would otherwise decode
# a document once per window over it.
SPARSE_RATIO = 4
_INDEX_CACHE = 64  # block indexes kept for token-range reads


class DomainStream:
    """Sample ``j`` of a domain's endless shuffled stream as ``seq_len + 1`` token ids.

    Args:
        domain (Domain): The domain to read.
        seq_len (int): Model context; samples hold ``seq_len + 1`` tokens (inputs plus shifted labels).
        seed (int): Global seed.
        block_docs (int): Documents per shuffle block. Default: 256.
        shuffle_window (int): Packed windows shuffled together. Default: 256.
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
        share: float | None = None,
    ):
        self.domain = domain
        self.seq_len = seq_len
        self.seed = seed
        self.block_docs = block_docs
        self.shuffle_window = shuffle_window
        self._reads_whole_chunks = share is not None and share * SPARSE_RATIO >= 1
        self.domain_key = stable_key(domain.name)
        self.samples_per_epoch = domain.num_samples(seq_len)
        lengths = domain.doc_lengths
        starts = np.arange(0, len(lengths), block_docs)
        # Tokens (documents plus one EOS each) and documents per block, in storage order.
        self._block_tokens = np.add.reduceat(lengths + 1, starts) if len(lengths) else np.zeros(0, np.int64)
        self._block_docs = np.diff(np.append(starts, len(lengths)))
        self._epoch_layout: tuple[int, BlockShuffle, np.ndarray] | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._chunk_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._index_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    # -- public -----------------------------------------------------------------------------------

    def epoch_of(self, index: int) -> int:
        """Epoch that sample ``index`` of the endless stream belongs to."""
        return index // self.samples_per_epoch

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
        for all such windows), so a rank's I/O follows its share of the batch. In document mode only each
        document's first ``seq_len + 1`` tokens are read. The result never depends on which way a sample
        was read.
        """
        indices = np.asarray(indices, dtype=np.int64)
        count = len(indices)
        tokens = np.empty((count, self.seq_len + 1), dtype=np.int64)
        valid = np.full(count, self.seq_len + 1, dtype=np.int64)
        if count == 0:
            return tokens, valid
        epochs, positions = np.divmod(indices, self.samples_per_epoch)
        if self.domain.mode == "document":
            for epoch in np.unique(epochs).tolist():
                rows = np.flatnonzero(epochs == epoch)
                tokens[rows], valid[rows] = self._documents(epoch, positions[rows])
            return tokens, valid
        chunks, offsets = np.divmod(positions, self.shuffle_window)
        sparse = np.zeros(count, dtype=bool)
        window_starts = np.zeros(count, dtype=np.int64)  # of sparse rows, in tokens of the epoch's stream
        # Runs of consecutive rows in one (epoch, chunk): each dense run is one gather.
        breaks = np.flatnonzero((np.diff(epochs) != 0) | (np.diff(chunks) != 0)) + 1
        for first, stop in zip(np.concatenate(([0], breaks)), np.append(breaks, count)):
            epoch, chunk = int(epochs[first]), int(chunks[first])
            if (
                not self._reads_whole_chunks
                and (stop - first) * SPARSE_RATIO < self.shuffle_window
                and not self._chunk_cached(epoch, chunk)
            ):
                # A few windows of this chunk (a rank's share at large world size): read them sparsely below.
                order = self._window_order(epoch, chunk)
                sparse[first:stop] = True
                window_starts[first:stop] = (
                    chunk * self.shuffle_window + order[offsets[first:stop]]
                ) * self.seq_len
                continue
            chunk_tokens, order = self._chunk(epoch, chunk)
            windows = order[offsets[first:stop]] * self.seq_len
            tokens[first:stop] = chunk_tokens[windows[:, None] + np.arange(self.seq_len + 1)]
        for epoch in np.unique(epochs[sparse]).tolist():
            rows = np.flatnonzero(sparse & (epochs == epoch))
            tokens[rows] = self._packed_windows(epoch, window_starts[rows])
        return tokens, valid

    # -- epoch layout -----------------------------------------------------------------------------

    def _layout(self, epoch: int) -> tuple[BlockShuffle, np.ndarray]:
        """The epoch's block shuffle and the cumulative size (tokens or docs) of blocks in shuffled order."""
        if self._epoch_layout is None or self._epoch_layout[0] != epoch:
            shuffle = BlockShuffle(self.domain.num_docs, self.block_docs, self.seed, self.domain_key, epoch)
            sizes = self._block_tokens if self.domain.mode == "packed" else self._block_docs
            cumulative = np.concatenate(([0], np.cumsum(sizes[shuffle.block_order])))
            self._epoch_layout = (epoch, shuffle, cumulative)
        return self._epoch_layout[1], self._epoch_layout[2]

    def _block(self, epoch: int, position: int) -> np.ndarray:
        """Packed tokens of the block at ``position`` in the epoch's block order: its documents in shuffled
        order, each followed by EOS. The last one read is kept."""
        key = (epoch, position)
        if self._block_cache is None or self._block_cache[0] != key:
            shuffle, _ = self._layout(epoch)
            block = int(shuffle.block_order[position])
            documents = self.domain.read_docs(*shuffle.block_range(block))
            eos = np.array([self.domain.eos_id], dtype=np.int64)
            pieces = [piece for i in shuffle.within_block(block) for piece in (documents[i], eos)]
            self._block_cache = (key, np.concatenate(pieces).astype(np.int64, copy=False))
        return self._block_cache[1]

    # -- packed mode ------------------------------------------------------------------------------

    def _chunk_cached(self, epoch: int, chunk: int) -> bool:
        return self._chunk_cache is not None and self._chunk_cache[0] == (epoch, chunk)

    def _window_order(self, epoch: int, chunk: int) -> np.ndarray:
        """The shuffled order of the chunk's windows (offsets into the chunk)."""
        count = min(self.shuffle_window, self.samples_per_epoch - chunk * self.shuffle_window)
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
        _, cumulative = self._layout(epoch)
        position = int(np.searchsorted(cumulative, start, side="right")) - 1
        pieces = []
        cursor = start
        while cursor < stop:
            block_start = int(cumulative[position])
            take = self._block(epoch, position)[cursor - block_start : stop - block_start]
            pieces.append(take)
            cursor += len(take)
            position += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _block_index(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Storage ids of the block's documents in shuffled order, and where each ends in the packed block.

        Computed from the document lengths alone (no data read); the last ``_INDEX_CACHE`` are kept, since
        a rank's next sample is often in a block it just read from.
        """
        key = (epoch, position)
        if key not in self._index_cache:
            if len(self._index_cache) >= _INDEX_CACHE:
                self._index_cache.pop(next(iter(self._index_cache)))  # oldest first
            shuffle, _ = self._layout(epoch)
            block = int(shuffle.block_order[position])
            documents = shuffle.block_range(block)[0] + shuffle.within_block(block)
            ends = np.cumsum(self.domain.doc_lengths[documents] + 1)  # each document plus its EOS
            self._index_cache[key] = (documents, ends)
        return self._index_cache[key]

    def _packed_windows(self, epoch: int, starts: np.ndarray) -> np.ndarray:
        """The windows of ``seq_len + 1`` tokens at token offsets ``starts`` of the epoch's packed stream,
        ``int64 [len(starts), seq_len + 1]``, reading only the token ranges of documents under them.

        Vectorised over windows: a window is cut into pieces, one per document it overlaps (the part of
        the document inside the window, then its EOS if that is inside too), and all pieces' tokens come
        from one ``read_doc_ranges`` call. Only the touched blocks' indexes are built.
        """
        width = self.seq_len + 1
        stops = starts + width
        _, cumulative = self._layout(epoch)
        first_block = np.searchsorted(cumulative, starts, side="right") - 1
        last_block = np.searchsorted(cumulative, stops - 1, side="right") - 1
        blocks = np.unique(concatenated_ranges(first_block, last_block - first_block + 1)).tolist()
        indexes = [self._block_index(epoch, block) for block in blocks]
        # The touched blocks' documents in stream order, and where each ends (after its EOS) in the epoch.
        docs = np.concatenate([documents for documents, _ in indexes])
        ends = np.concatenate(
            [int(cumulative[block]) + block_ends for block, (_, block_ends) in zip(blocks, indexes)]
        )
        doc_starts = ends - self.domain.doc_lengths[docs] - 1
        low = np.searchsorted(ends, starts, side="right")  # first and last document under each window
        high = np.searchsorted(ends, stops - 1, side="right")
        counts = high - low + 1
        piece_doc = concatenated_ranges(low, counts)
        piece_window = np.repeat(np.arange(len(starts)), counts)
        piece_start = np.maximum(starts[piece_window], doc_starts[piece_doc])
        piece_stop = np.minimum(stops[piece_window], ends[piece_doc])
        with_eos = piece_stop == ends[piece_doc]
        content = self.domain.read_doc_ranges(
            docs[piece_doc],
            piece_start - doc_starts[piece_doc],
            piece_stop - with_eos - doc_starts[piece_doc],
        )
        # Pieces tile each window in order, so the content fills every position that is not an EOS.
        eos = np.zeros(len(starts) * width, dtype=bool)
        eos[(piece_window * width + ends[piece_doc] - 1 - starts[piece_window])[with_eos]] = True
        windows = np.empty(len(starts) * width, dtype=np.int64)
        windows[eos] = self.domain.eos_id
        windows[~eos] = content
        return windows.reshape(len(starts), width)

    # -- document mode ----------------------------------------------------------------------------

    def _documents(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Document-mode samples at ``positions`` of the epoch, like ``read_at``'s result.

        Only each document's first ``seq_len + 1`` tokens are read; the EOS closes a document that fits.
        """
        width = self.seq_len + 1
        _, cumulative = self._layout(epoch)
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


@functools.lru_cache(maxsize=1024)
def _window_permutation(seed: int, domain_key: int, epoch: int, chunk: int, count: int) -> np.ndarray:
    # Cached: sparse reads revisit a chunk once per sample, and seeding a generator costs more than the read.
    order = rng_for(seed, domain_key, epoch, WINDOW_ORDER, chunk).permutation(count)
    order.flags.writeable = False
    return order
