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

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.data.shuffle import WINDOW_ORDER, BlockShuffle, rng_for, stable_key


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
        that share a shuffle chunk are gathered in one vectorised step.
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
            chunk_tokens, order = self._chunk(int(epochs[first]), int(chunks[first]))
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

    def _chunk(self, epoch: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Token span of ``shuffle_window`` consecutive windows and their shuffled order."""
        key = (epoch, chunk)
        if self._chunk_cache is None or self._chunk_cache[0] != key:
            first = chunk * self.shuffle_window
            count = min(self.shuffle_window, self.samples_per_epoch - first)
            start = first * self.seq_len
            stop = (first + count) * self.seq_len + 1
            order = rng_for(self.seed, self.domain_key, epoch, WINDOW_ORDER, chunk).permutation(count)
            self._chunk_cache = (key, self._token_span(epoch, start, stop), order)
        return self._chunk_cache[1], self._chunk_cache[2]

    def _token_span(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the epoch's packed stream."""
        _, cumulative = self._layout(epoch)
        position = int(np.searchsorted(cumulative, start, side="right")) - 1
        pieces = []
        cursor = start
        while cursor < stop:
            tokens, _ = self._block(epoch, position)
            block_start = int(cumulative[position])
            take = tokens[cursor - block_start : stop - block_start]
            pieces.append(take)
            cursor += len(take)
            position += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

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
