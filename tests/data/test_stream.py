"""DomainStream: each epoch permutes the packed windows; reads are seekable and keyed by (seed, domain)."""

import numpy as np
import pytest
from testkit.domains import random_documents, write_domains

from tikmix_loader import Domain
from tikmix_loader.data import stream as stream_module
from tikmix_loader.data.shuffle import BlockShuffle, stable_key
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.data.stream import DomainStream
from tikmix_loader.quality import QualityParams, write_scores


def _packed_reference(documents, eos, seq_len):
    stream = np.concatenate([np.append(doc, eos) for doc in documents])
    count = (len(stream) - 1) // seq_len
    return {tuple(stream[i * seq_len : i * seq_len + seq_len + 1]) for i in range(count)}, count


def test_block_shuffle_is_a_permutation_of_documents():
    shuffle = BlockShuffle(num_docs=1001, block_docs=64, seed=3, domain_key=11, epoch=2)
    order = np.concatenate(
        [np.arange(*shuffle.block_range(b))[shuffle.within_block(b)] for b in shuffle.block_order]
    )
    assert sorted(order.tolist()) == list(range(1001))
    assert not np.array_equal(order, np.arange(1001))


def test_epoch_windows_are_the_packed_windows_of_the_shuffled_documents(tmp_path):
    (domain,) = write_domains(tmp_path, {"d": 300}, max_len=50)
    stream = DomainStream(domain, seq_len=16, seed=5, block_docs=32, shuffle_window=20)
    tokens, valid = stream.read(0, stream.samples_per_epoch)
    assert (valid == 17).all()
    # Every window is a real slice of the packed stream of the epoch's document order.
    shuffle = BlockShuffle(domain.num_docs, 32, 5, stream.domain_key, 0)
    order = np.concatenate(
        [np.arange(*shuffle.block_range(b))[shuffle.within_block(b)] for b in shuffle.block_order]
    )
    documents = domain.read_docs(0, domain.num_docs)
    expected, count = _packed_reference([documents[i] for i in order], domain.eos_id, 16)
    assert count == stream.samples_per_epoch
    assert {tuple(row) for row in tokens} == expected


def test_epochs_reshuffle_and_reads_are_seekable(tmp_path):
    (domain,) = write_domains(tmp_path, {"d": 120}, max_len=40)
    stream = DomainStream(domain, seq_len=8, seed=1, block_docs=16, shuffle_window=8)
    n = stream.samples_per_epoch
    everything, _ = stream.read(0, 2 * n + 5)
    assert not np.array_equal(everything[:n], everything[n : 2 * n])
    # Random access in any order gives the same samples as the sequential read.
    fresh = DomainStream(domain, seq_len=8, seed=1, block_docs=16, shuffle_window=8)
    for start in (2 * n + 1, 3, n - 1, n):
        part, _ = fresh.read(start, 4)
        np.testing.assert_array_equal(part, everything[start : start + 4])


def test_streams_depend_on_seed_and_domain_name_not_on_position(tmp_path):
    documents = random_documents(80, seed=0, max_len=30)
    path = write_memmap(tmp_path / "x.bin", documents, vocab_size=258)
    first = DomainStream(Domain("x", path), seq_len=8, seed=0).read(0, 20)[0]
    again = DomainStream(Domain("x", path), seq_len=8, seed=0).read(0, 20)[0]
    renamed = DomainStream(Domain("y", path), seq_len=8, seed=0).read(0, 20)[0]
    reseeded = DomainStream(Domain("x", path), seq_len=8, seed=1).read(0, 20)[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, renamed)
    assert not np.array_equal(first, reseeded)


@pytest.mark.parametrize("seq_len", [4, 40])
def test_document_mode_truncates_pads_and_appends_eos(tmp_path, seq_len):
    documents = [np.arange(10) % 256, np.arange(3), np.arange(60) % 256]
    path = write_memmap(tmp_path / "docs.bin", documents, vocab_size=258)
    domain = Domain("docs", path, mode="document")
    stream = DomainStream(domain, seq_len=seq_len, seed=0)
    assert stream.samples_per_epoch == 3
    tokens, valid = stream.read(0, 3)
    expected = set()
    for document in documents:
        sample = np.full(seq_len + 1, domain.pad_id)
        content = np.append(document, domain.eos_id)[: seq_len + 1]
        sample[: len(content)] = content
        expected.add((tuple(sample), len(content)))
    assert {(tuple(row), int(count)) for row, count in zip(tokens, valid)} == expected


@pytest.mark.parametrize(("mode", "seq_len"), [("packed", 8), ("packed", 70), ("document", 8)])
def test_read_at_gives_the_rows_read_gives_in_any_order_across_epochs(tmp_path, mode, seq_len):
    # Scattered picks take the sparse path (only the documents under a window are read); with seq_len 70 a
    # window spans several documents and blocks. Both must give exactly what the dense path gives.
    (domain,) = write_domains(tmp_path, {"d": 90}, mode=mode, max_len=40)
    options = {"seq_len": seq_len, "seed": 2, "block_docs": 16, "shuffle_window": 10}
    stream = DomainStream(domain, **options)
    span = 3 * stream.samples_per_epoch  # three epochs, so indices cross epoch boundaries
    tokens, valid = stream.read(0, span)
    picks = np.random.default_rng(0).choice(span, size=50, replace=False)
    for indices in (np.sort(picks), picks):
        got_tokens, got_valid = DomainStream(domain, **options).read_at(indices)
        assert np.array_equal(got_tokens, tokens[indices]) and np.array_equal(got_valid, valid[indices])
    empty_tokens, empty_valid = stream.read_at(np.array([], dtype=np.int64))
    assert empty_tokens.shape == (0, seq_len + 1) and empty_valid.shape == (0,)


class RangeCounter:
    """Counts the tokens a domain hands out: by ``read_doc_ranges`` and by whole-document ``read_docs``."""

    def __init__(self, domain, monkeypatch):
        self.range_tokens = self.document_tokens = 0
        read_ranges, read_docs = domain.read_doc_ranges, domain.read_docs

        def counting_ranges(docs, starts, stops):
            tokens = read_ranges(docs, starts, stops)
            self.range_tokens += len(tokens)
            return tokens

        def counting_docs(start, stop):
            documents = read_docs(start, stop)
            self.document_tokens += sum(len(document) for document in documents)
            return documents

        monkeypatch.setattr(domain, "read_doc_ranges", counting_ranges)
        monkeypatch.setattr(domain, "read_docs", counting_docs)


def test_a_window_of_a_long_document_reads_only_its_tokens(tmp_path, monkeypatch):
    # Documents of 500-1,000 tokens and windows of 17: a rank's few windows must not decode whole documents.
    documents = random_documents(40, seed=4, min_len=500, max_len=1000)
    domain = Domain("long", write_memmap(tmp_path / "long.bin", documents, vocab_size=258))
    options = {"seq_len": 16, "seed": 2, "block_docs": 8, "shuffle_window": 64}
    expected, _ = DomainStream(domain, **options).read(0, 3 * 64)
    stream = DomainStream(domain, **options)
    counter = RangeCounter(domain, monkeypatch)
    picks = np.array([5, 70, 150])  # one window in each of three chunks: the sparse path
    tokens, _ = stream.read_at(picks)
    np.testing.assert_array_equal(tokens, expected[picks])
    eos = int((tokens == domain.eos_id).sum())
    assert counter.document_tokens == 0
    assert counter.range_tokens == 3 * 17 - eos  # exactly the windows' tokens, EOS separators excepted


def test_document_mode_reads_only_the_first_seq_len_plus_one_tokens(tmp_path, monkeypatch):
    documents = random_documents(40, seed=5, min_len=1, max_len=1000)
    domain = Domain("docs", write_memmap(tmp_path / "docs.bin", documents, vocab_size=258), mode="document")
    options = {"seq_len": 32, "seed": 1, "block_docs": 8}
    counter = RangeCounter(domain, monkeypatch)
    tokens, valid = DomainStream(domain, **options).read_at(np.array([39, 3, 17]))
    assert counter.document_tokens == 0
    assert counter.range_tokens == int(np.minimum(valid, 33).sum() - (valid < 33).sum())
    # Independent reference: the sample is the document at that position of the epoch's shuffled order.
    shuffle = BlockShuffle(40, 8, 1, stable_key("docs"), 0)
    order = np.concatenate(
        [np.arange(*shuffle.block_range(b))[shuffle.within_block(b)] for b in shuffle.block_order]
    )
    for row, position in enumerate([39, 3, 17]):
        document = documents[order[position]]
        content = np.append(document, domain.eos_id)[:33]
        assert valid[row] == len(content)
        np.testing.assert_array_equal(tokens[row, : len(content)], content)
        assert (tokens[row, len(content) :] == domain.pad_id).all()


@pytest.mark.parametrize(
    ("share", "whole_chunks"), [(1.0, True), (0.25, True), (1 / 8, False), (None, False)]
)
def test_a_reader_of_a_large_share_reads_whole_chunks_in_small_runs(
    tmp_path, monkeypatch, share, whole_chunks
):
    # One rank of one (or a few) takes every window of a chunk over several small reads: reading the chunk
    # whole once beats decoding each document once per window over it. A rank of many reads token ranges.
    (domain,) = write_domains(tmp_path, {"d": 200}, max_len=60)
    options = {"seq_len": 16, "seed": 3, "block_docs": 32, "shuffle_window": 64}
    expected, _ = DomainStream(domain, **options).read(0, 128)
    stream = DomainStream(domain, **options, share=share)
    counter = RangeCounter(domain, monkeypatch)
    for start in range(0, 128, 8):  # runs of 8 rows, under 1/4 of a chunk
        tokens, _ = stream.read_at(np.arange(start, start + 8))
        np.testing.assert_array_equal(tokens, expected[start : start + 8])
    assert (counter.document_tokens > 0) == whole_chunks
    assert (counter.range_tokens > 0) != whole_chunks


@pytest.mark.parametrize("seq_len", [1, 3, 40])
def test_token_range_reads_match_whole_chunk_reads_with_empty_and_tiny_documents(tmp_path, seq_len):
    # Empty documents are a lone EOS; with seq_len 40 a window spans many documents and several blocks.
    rng = np.random.default_rng(seq_len)
    documents = [rng.integers(0, 256, size=int(n)) for n in rng.choice([0, 0, 1, 2, 5, 30], size=300)]
    domain = Domain("z", write_memmap(tmp_path / "z.bin", documents, vocab_size=258))
    options = {"seq_len": seq_len, "seed": 1, "block_docs": 7, "shuffle_window": 16}
    whole = DomainStream(domain, **options, share=1.0)
    span = 2 * whole.samples_per_epoch
    expected, _ = whole.read(0, span)
    picks = rng.choice(span, size=40, replace=False)
    got, _ = DomainStream(domain, **options, share=1 / 64).read_at(picks)
    np.testing.assert_array_equal(got, expected[picks])


def test_warm_caches_give_the_rows_of_cold_ones_and_stay_bounded(tmp_path, monkeypatch):
    # A rank's stream keeps block indexes (at most _INDEX_CACHE) and window orders (process-wide LRU) across
    # reads; rows read through warm, evicting caches must equal the dense reference read with cold ones.
    monkeypatch.setattr(stream_module, "_INDEX_CACHE", 3)
    (domain,) = write_domains(tmp_path, {"d": 120}, max_len=40)
    options = {"seq_len": 8, "seed": 5, "block_docs": 8, "shuffle_window": 32}
    stream_module._window_permutation.cache_clear()
    reference = DomainStream(domain, **options, share=1.0)  # whole chunks: no block index, no sparse path
    warm = DomainStream(domain, **options, share=1 / 64)
    span = 2 * warm.samples_per_epoch  # two epochs
    expected, _ = reference.read(0, span)
    rng = np.random.default_rng(3)
    sizes = []
    for round_ in range(40):
        if round_ % 10 == 9:
            stream_module._window_permutation.cache_clear()  # cold window orders mid-run
        picks = np.sort(rng.choice(span, size=4, replace=False))
        tokens, _ = warm.read_at(picks)
        np.testing.assert_array_equal(tokens, expected[picks])
        sizes.append(len(warm._index_cache))
    assert max(sizes) == 3  # filled to its bound, and evicted beyond it


@pytest.mark.parametrize("seq_len", [1, 7, 40])
@pytest.mark.parametrize("quality", [False, True])
def test_scalar_and_vectorised_packed_reads_give_the_same_rows(tmp_path, monkeypatch, seq_len, quality):
    # A read of at most SCALAR_ROWS rows keeps its bookkeeping in Python ints and cuts its windows in
    # compiled code (a Python loop when the compiled helpers are missing); it must give the rows of the
    # vectorised path and of a dense read: windows across document and block boundaries, empty documents
    # (a lone EOS), quality copies (0 to several per document), epoch ends.
    rng = np.random.default_rng(seq_len)
    documents = [rng.integers(0, 256, size=int(n)) for n in rng.choice([0, 1, 3, 12, 60, 150], size=120)]
    domain = Domain("s", write_memmap(tmp_path / "s.bin", documents, vocab_size=258))
    options = {"seq_len": seq_len, "seed": 4, "block_docs": 7, "shuffle_window": 64}
    if quality:
        criteria = {"q": "higher"}
        write_scores(domain.path, "q", rng.normal(size=domain.num_docs), num_docs=domain.num_docs)
        options["criteria"] = criteria
    params = QualityParams(alpha=(1.0,), lam=4.0, omega=0.7, eta=1.5, eps=0.2) if quality else None

    def stream(**extra):
        made = DomainStream(domain, **options, **extra)
        made.set_segments(((0, 0, params),))
        return made

    reference = stream(share=1.0)  # whole chunks
    span = reference.epoch_start(3)  # three epochs (of varying size under quality sampling)
    expected, _ = reference.read(0, span)
    ends = [reference.epoch_start(epoch) for epoch in (1, 2)]
    for trial in range(30):
        size = int(rng.integers(1, stream_module.SCALAR_ROWS + 1))
        picks = rng.choice(span, size=size, replace=False)
        if trial % 3 == 0:  # the last and first samples of epochs
            picks[: min(size, 4)] = [ends[0] - 1, ends[0], ends[1] - 1, ends[1]][: min(size, 4)]
        scalar = stream(share=1 / 64)
        tokens, valid = scalar.read_at(picks)
        with monkeypatch.context() as patch:
            patch.setattr(stream_module, "SCALAR_ROWS", 0)
            vector_tokens, vector_valid = stream(share=1 / 64).read_at(picks)
        np.testing.assert_array_equal(tokens, vector_tokens)
        np.testing.assert_array_equal(tokens, expected[picks])
        assert np.array_equal(valid, vector_valid) and (valid == seq_len + 1).all()
        # The window cutting directly: the same pieces, in the same order, from both.
        epoch = int(scalar.locate(picks[:1])[0][0])
        starts = rng.integers(0, scalar.epoch_samples(epoch), size=size) * seq_len
        scalar_pieces = scalar._window_pieces_scalar(epoch, starts.tolist())
        vector_pieces = scalar._window_pieces(epoch, starts)
        for got, want in zip(scalar_pieces, vector_pieces):
            np.testing.assert_array_equal(np.asarray(got, dtype=np.int64), want)
