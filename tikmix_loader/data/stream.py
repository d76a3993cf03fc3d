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

# A run of rows needing under 1/SPARSE_RATIO of an uncached chunk's windows reads only their documents;
# more, and reading the whole chunk (and caching it) is cheaper.
SPARSE_RATIO = 4
_INDEX_CACHE = 64  # block indexes kept for sparse reads


class DomainStream:
    """Sample ``j`` of a domain's endless shuffled stream as ``seq_len + 1`` token ids.

    Args:
        domain (Domain): The domain to read.
        seq_len (int): Model context; samples hold ``seq_len + 1`` tokens (inputs plus shifted labels).
        seed (int): Global seed.
        block_docs (int): Documents per shuffle block. Default: 256.
        shuffle_window (int): Packed windows shuffled together. Default: 256.
    """

    def __init__(
        self, domain: Domain, *, seq_len: int, seed: int, block_docs: int = 256, shuffle_window: int = 256
    ):
        self.domain = domain
        self.seq_len = seq_len
        self.seed = seed
        self.block_docs = block_docs
        self.shuffle_window = shuffle_window
        self.domain_key = stable_key(domain.name)
        self.samples_per_epoch = domain.num_samples(seq_len)
        lengths = domain.doc_lengths
        starts = np.arange(0, len(lengths), block_docs)
        # Tokens (documents plus one EOS each) and documents per block, in storage order.
        self._block_tokens = np.add.reduceat(lengths + 1, starts) if len(lengths) else np.zeros(0, np.int64)
        self._block_docs = np.diff(np.append(starts, len(lengths)))
        self._epoch_layout: tuple[int, BlockShuffle, np.ndarray] | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
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
        are wanted, just the documents under them are read, so a rank's I/O follows its share of the
        batch. The result never depends on which way a sample was read.
        """
        indices = np.asarray(indices, dtype=np.int64)
        count = len(indices)
        tokens = np.empty((count, self.seq_len + 1), dtype=np.int64)
        valid = np.full(count, self.seq_len + 1, dtype=np.int64)
        epochs, positions = np.divmod(indices, self.samples_per_epoch)
        if count == 0:
            return tokens, valid
        if self.domain.mode == "document":
            for row in range(count):
                valid[row] = self._document_sample(int(epochs[row]), int(positions[row]), tokens[row])
            return tokens, valid
        chunks, offsets = np.divmod(positions, self.shuffle_window)
        # Runs of consecutive rows in one (epoch, chunk): each run is one gather.
        breaks = np.flatnonzero((np.diff(epochs) != 0) | (np.diff(chunks) != 0)) + 1
        for first, stop in zip(np.concatenate(([0], breaks)), np.append(breaks, count)):
            epoch, chunk = int(epochs[first]), int(chunks[first])
            if (stop - first) * SPARSE_RATIO < self.shuffle_window and not self._chunk_cached(epoch, chunk):
                # A few windows of this chunk (a rank's share at large world size): read only their documents.
                order = self._window_order(epoch, chunk)
                for row in range(first, stop):
                    window = (chunk * self.shuffle_window + int(order[offsets[row]])) * self.seq_len
                    tokens[row] = self._token_span(epoch, window, window + self.seq_len + 1, sparse=True)
                continue
            chunk_tokens, order = self._chunk(epoch, chunk)
            windows = order[offsets[first:stop]] * self.seq_len
            tokens[first:stop] = chunk_tokens[windows[:, None] + np.arange(self.seq_len + 1)]
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

    def _block(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the block at ``position`` in the epoch's block order, documents in shuffled order.

        Returns ``(tokens, doc_starts)``: in packed mode ``tokens`` has an EOS after each document.
        """
        key = (epoch, position)
        if self._block_cache is None or self._block_cache[0] != key:
            shuffle, _ = self._layout(epoch)
            block = int(shuffle.block_order[position])
            documents = self.domain.read_docs(*shuffle.block_range(block))
            ordered = [documents[i] for i in shuffle.within_block(block)]
            if self.domain.mode == "packed":
                eos = np.array([self.domain.eos_id], dtype=np.int64)
                pieces = [piece for document in ordered for piece in (document, eos)]
            else:
                pieces = ordered
            lengths = np.array([len(piece) for piece in ordered], dtype=np.int64)
            starts = np.concatenate(([0], np.cumsum(lengths + (self.domain.mode == "packed"))))
            self._block_cache = (key, np.concatenate(pieces).astype(np.int64, copy=False), starts)
        return self._block_cache[1], self._block_cache[2]

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

    def _token_span(self, epoch: int, start: int, stop: int, *, sparse: bool = False) -> np.ndarray:
        """Tokens ``[start, stop)`` of the epoch's packed stream.

        Dense (default): whole blocks are read and the last one is cached, which is fastest when the next
        reads are nearby. Sparse: only the documents that overlap the span are read, nothing is cached.
        """
        _, cumulative = self._layout(epoch)
        position = int(np.searchsorted(cumulative, start, side="right")) - 1
        pieces = []
        cursor = start
        while cursor < stop:
            block_start = int(cumulative[position])
            if sparse:
                take = self._block_span(epoch, position, cursor - block_start, stop - block_start)
            else:
                tokens, _ = self._block(epoch, position)
                take = tokens[cursor - block_start : stop - block_start]
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

    def _block_span(self, epoch: int, position: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the packed block at ``position``, reading only the documents in it."""
        documents, ends = self._block_index(epoch, position)
        stop = min(stop, int(ends[-1]))
        low = int(np.searchsorted(ends, start, side="right"))
        high = int(np.searchsorted(ends, stop - 1, side="right")) + 1
        eos = np.array([self.domain.eos_id], dtype=np.int64)
        pieces = [
            piece
            for document in documents[low:high].tolist()
            for piece in (self.domain.read_docs(document, document + 1)[0], eos)
        ]
        offset = int(ends[low - 1]) if low else 0
        return np.concatenate(pieces).astype(np.int64, copy=False)[start - offset : stop - offset]

    # -- document mode ----------------------------------------------------------------------------

    def _document_sample(self, epoch: int, position: int, out: np.ndarray) -> int:
        _, cumulative = self._layout(epoch)
        block_position = int(np.searchsorted(cumulative, position, side="right")) - 1
        tokens, starts = self._block(epoch, block_position)
        index = position - int(cumulative[block_position])
        document = tokens[starts[index] : starts[index + 1]]
        length = min(len(document) + 1, self.seq_len + 1)  # the EOS closes the document when it fits
        out[:] = self.domain.pad_id
        out[: min(len(document), length)] = document[:length]
        if len(document) < length:
            out[len(document)] = self.domain.eos_id
        return length


@functools.lru_cache(maxsize=1024)
def _window_permutation(seed: int, domain_key: int, epoch: int, chunk: int, count: int) -> np.ndarray:
    # Cached: sparse reads revisit a chunk once per sample, and seeding a generator costs more than the read.
    order = rng_for(seed, domain_key, epoch, WINDOW_ORDER, chunk).permutation(count)
    order.flags.writeable = False
    return order
