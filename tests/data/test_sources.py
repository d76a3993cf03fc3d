"""Token sources: MDS, Parquet and memmap read back what was written, and every bad input fails by name."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.formats import FORMATS, make_domain_files, random_docs

from tikmix_loader import ConfigError, Domain, DomainError, ShardError, UnknownFormatError
from tikmix_loader.data import _compiled
from tikmix_loader.data.sources import detect_format, open_source
from tikmix_loader.data.sources._tokens import cast_tokens
from tikmix_loader.data.sources.mds import MDSSource, write_mds
from tikmix_loader.data.sources.memmap import SCALAR_RANGES, write_memmap
from tikmix_loader.data.sources.parquet import ParquetSource, write_parquet


def assert_docs_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(got, want)


BYTE_IDS = {"eos_id": 256, "pad_id": 257, "vocab_size": 258}

# Small shards / row groups / files so reads cross their boundaries.
SPLIT_OPTIONS = {
    "mds": {"size_limit": 1 << 10},
    "parquet": {"rows_per_group": 7, "rows_per_file": 20},
    "memmap": {},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_across_shard_boundaries(tmp_path, fmt):
    docs = random_docs(53, seed=1, max_len=40)
    path = make_domain_files(tmp_path, fmt, docs, **SPLIT_OPTIONS[fmt])
    domain = Domain("d", path)
    assert detect_format(path) == fmt
    assert domain.num_docs == 53
    assert domain.num_tokens == sum(len(doc) for doc in docs)
    np.testing.assert_array_equal(domain.doc_lengths, [len(doc) for doc in docs])
    assert_docs_equal(domain.read_docs(0, 53), docs)
    rng = np.random.default_rng(0)
    for _ in range(20):
        start = int(rng.integers(0, 53))
        stop = int(rng.integers(start, 54))
        assert_docs_equal(domain.read_docs(start, stop), docs[start:stop])
    assert domain.read_docs(5, 5) == []
    with pytest.raises(IndexError, match=r"outside \[0, 53\)"):
        domain.read_docs(50, 54)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_doc_ranges_gives_the_slices_of_the_documents(tmp_path, fmt):
    docs = random_docs(53, seed=2, max_len=40)
    domain = Domain("d", make_domain_files(tmp_path, fmt, docs, **SPLIT_OPTIONS[fmt]))
    rng = np.random.default_rng(1)
    picks = rng.integers(0, 53, size=60)  # unsorted, repeated, across shards / row groups
    starts = np.array([rng.integers(0, len(docs[pick]) + 1) for pick in picks])
    stops = np.array([rng.integers(start, len(docs[pick]) + 1) for pick, start in zip(picks, starts)])
    expected = np.concatenate([docs[pick][a:b] for pick, a, b in zip(picks, starts, stops)])
    np.testing.assert_array_equal(domain.read_doc_ranges(picks, starts, stops), expected)
    assert len(domain.read_doc_ranges([], [], [])) == 0
    with pytest.raises(IndexError, match="outside document 3"):
        domain.read_doc_ranges([3], [0], [len(docs[3]) + 1])
    with pytest.raises(IndexError, match=r"outside \[0, 53\)"):
        domain.read_doc_ranges([53], [0], [0])


def test_memmap_token_ranges_read_alike_below_and_above_the_scalar_limit(tmp_path):
    # A memmap slices up to SCALAR_RANGES ranges one by one and gathers more in one call: both give the
    # documents' slices (empty ranges and empty documents included) and refuse a range outside its document.
    docs = random_docs(30, seed=4, max_len=40) + [np.zeros(0, dtype=np.int64)]
    domain = Domain("m", write_memmap(tmp_path / "m.bin", docs, vocab_size=258, eos_id=256))
    rng = np.random.default_rng(5)
    for count in (1, 2, 7, SCALAR_RANGES, SCALAR_RANGES + 1, 80):
        picks = rng.integers(0, len(docs), size=count)
        starts = np.array([rng.integers(0, len(docs[pick]) + 1) for pick in picks])
        stops = np.array([rng.integers(start, len(docs[pick]) + 1) for pick, start in zip(picks, starts)])
        expected = np.concatenate([docs[pick][a:b] for pick, a, b in zip(picks, starts, stops)])
        np.testing.assert_array_equal(domain.read_doc_ranges(picks, starts, stops), expected)
        np.testing.assert_array_equal(
            domain.read_doc_ranges(picks.tolist(), starts.tolist(), stops.tolist()), expected
        )
        for bad_start, bad_stop, message in ((-1, 0, "outside document"), (2, 1, "outside document")):
            with pytest.raises(IndexError, match=message):
                domain.read_doc_ranges([*picks[:-1], 0], [*starts[:-1], bad_start], [*stops[:-1], bad_stop])
        for bad_doc in (-1, len(docs)):
            with pytest.raises(IndexError, match=rf"document {bad_doc} is outside \[0, 31\)"):
                domain.read_doc_ranges([*picks[:-1], bad_doc], [*starts[:-1], 0], [*stops[:-1], 0])


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_token_ranges_of_unequal_lengths_or_not_integers_fail_naming_the_domain_and_argument(
    monkeypatch, tmp_path, fmt, compiled
):
    # The memmap's Python path (few ranges, or no compiled helpers) once zipped the three arrays, dropping
    # the ranges past the shortest, and every path truncated float ids; the domain refuses both for every
    # format, with and without the compiled helpers.
    docs = random_docs(40, seed=6, max_len=40)
    domain = Domain("d", make_domain_files(tmp_path, fmt, docs, **SPLIT_OPTIONS[fmt]))
    _compiled.module()  # resolved now, so the fallback below stays in force for this test
    if not compiled:
        monkeypatch.setattr(_compiled, "_module", None)
    rng = np.random.default_rng(7)
    for count in (3, SCALAR_RANGES + 8):
        picks = rng.integers(0, len(docs), size=count)
        starts = np.zeros(count, dtype=np.int64)
        stops = np.array([len(docs[pick]) for pick in picks])
        expected = np.concatenate([docs[pick] for pick in picks])
        np.testing.assert_array_equal(domain.read_doc_ranges(picks, starts, stops), expected)
        for message, bad in (
            (f"{count - 1} `starts` for {count} `docs`", (picks, starts[:-1], stops)),
            (f"{count - 1} `stops` for {count} `docs`", (picks, starts, stops[:-1])),
            (f"{count} `starts` for {count - 1} `docs`", (picks[:-1], starts, stops)),
        ):
            with pytest.raises(DomainError, match=f"Domain 'd': read_doc_ranges got {message}"):
                domain.read_doc_ranges(*bad)
        for argument, bad in (
            ("docs", (picks + 0.5, starts, stops)),
            ("starts", (picks, starts.astype(float), stops)),
            ("stops", (picks, starts, stops.astype(bool))),
            ("docs", (picks[:, None], starts, stops)),
        ):
            with pytest.raises(ValueError, match=rf"Domain 'd': .*`{argument}` as a 1-D sequence of"):
                domain.read_doc_ranges(*bad)
        for bad_start, bad_stop in ((-1, 0), (2, 1)):  # a range outside its document: the source names it
            with pytest.raises(IndexError, match="outside document"):
                domain.read_doc_ranges([*picks[:-1], 0], [*starts[:-1], bad_start], [*stops[:-1], bad_stop])
    assert len(domain.read_doc_ranges([], [], [])) == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_int32_ids_beyond_uint16(tmp_path, fmt):
    docs = [np.array([0, 70_000, 99_999]), np.array([65_536])]
    path = make_domain_files(
        tmp_path, fmt, docs, dtype="int32", vocab_size=100_000, eos_id=99_998, pad_id=99_999
    )
    domain = Domain("big", path)
    assert (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (99_998, 99_999, 100_000)
    assert_docs_equal(domain.read_docs(0, 2), docs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sources_pickle_for_spawned_workers(tmp_path, fmt):
    docs = random_docs(9, seed=2)
    source = open_source(make_domain_files(tmp_path, fmt, docs))
    source.read_docs(0, 3)  # leaves open handles / cached row groups behind
    clone = pickle.loads(pickle.dumps(source))
    assert_docs_equal(clone.read_docs(0, 9), docs)


def without_index(path, fmt):
    """Make a converted MDS/Parquet dataset look written by others: no length index, no embedded ids."""
    if fmt == "mds":
        index = json.loads((path / "index.json").read_text())
        del index["tikmix"]
        (path / "index.json").write_text(json.dumps(index))
        (path / "tikmix-lengths.npy").unlink()
    else:
        for file in path.glob("*.parquet"):
            table = pq.read_table(file).drop_columns(["num_tokens"])
            pq.write_table(table.replace_schema_metadata(None), file, row_group_size=7)
    return path


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_lengths_are_cached_and_never_stale(tmp_path, fmt, monkeypatch):
    cls = {"mds": MDSSource, "parquet": ParquetSource}[fmt]
    path = without_index(make_domain_files(tmp_path, fmt, random_docs(12, seed=3)), fmt)
    first = open_source(path)
    scans = []
    original = cls._scan_lengths
    monkeypatch.setattr(cls, "_scan_lengths", lambda self: scans.append(1) or original(self))
    again = open_source(path)
    assert scans == []  # second open reads the cache
    np.testing.assert_array_equal(again.doc_lengths(), first.doc_lengths())
    # Rewriting the data changes sizes/mtimes, so the old entry must not be used.
    new_docs = random_docs(15, seed=4)
    shutil.rmtree(path)
    path = without_index(make_domain_files(tmp_path, fmt, new_docs), fmt)
    fresh = open_source(path)
    assert scans == [1]
    np.testing.assert_array_equal(fresh.doc_lengths(), [len(doc) for doc in new_docs])


def test_parquet_reads_each_row_group_once_and_never_whole_files(tmp_path, monkeypatch):
    docs = random_docs(40, seed=5)
    path = make_domain_files(tmp_path, "parquet", docs, rows_per_group=10)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole Parquet file"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read a whole Parquet file"))
    source = ParquetSource(path)
    groups = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **k: groups.append(i) or original(self, i, **k)
    )
    source._cached_group = -1
    read = [doc for index in range(40) for doc in source.read_docs(index, index + 1)]
    assert_docs_equal(read, docs)
    assert groups == [0, 1, 2, 3]


def test_parquet_single_file_and_custom_column(tmp_path):
    docs = random_docs(6, seed=6)
    file = tmp_path / "one.parquet"
    column = pa.array([doc.tolist() for doc in docs], type=pa.list_(pa.int64()))
    pq.write_table(pa.table({"ids": column, "text": ["x"] * 6}), file, row_group_size=4)
    source = open_source(file, token_column="ids")
    assert_docs_equal(source.read_docs(0, 6), docs)


def test_mds_written_by_plain_mdswriter(tmp_path):
    from streaming import MDSWriter

    docs = random_docs(10, seed=7)
    with MDSWriter(out=str(tmp_path / "raw"), columns={"ids": "ndarray:int32", "url": "str"}) as writer:
        for index, doc in enumerate(docs):
            writer.write({"ids": doc.astype(np.int32), "url": f"doc{index}"})
    with pytest.raises(DomainError, match=r"Domain 'raw' at .*raw: its data records no eos_id or vocab_size"):
        Domain("raw", tmp_path / "raw", column="ids")
    domain = Domain("raw", tmp_path / "raw", column="ids", eos_id=7, vocab_size=300)
    assert domain.metadata is None and (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (7, 7, 300)
    assert_docs_equal(domain.read_docs(0, 10), docs)


def test_mds_zstd_shards_are_decompressed_into_the_cache(tmp_path):
    docs = random_docs(30, seed=8)
    path = make_domain_files(tmp_path, "mds", docs, compression="zstd", size_limit=1 << 9)
    before = sorted(os.listdir(path))
    assert all(name.endswith((".zstd", ".json", ".npy")) for name in before)
    assert_docs_equal(Domain("z", path).read_docs(0, 30), docs)
    assert_docs_equal(Domain("z", path).read_docs(0, 30), docs)  # reopen reuses decompressed shards
    assert sorted(os.listdir(path)) == before  # the dataset folder is left untouched


def remote_dataset(tmp_path, docs, **options):
    """An MDS dataset of small shards, written as ``tikmix convert`` does, to serve as a remote."""
    return make_domain_files(
        tmp_path, "mds", docs, size_limit=1 << 9, metadata=False, token_info=BYTE_IDS, **options
    )


def shard_files(directory):
    return sorted(path.name for path in directory.glob("shard.*"))


def bytes_on_disk(directory):
    """Bytes of shard files (and downloads in flight) in ``directory``; files may vanish while listed."""
    total = 0
    for path in directory.glob("shard.*"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def wait_for_prefetches(source):
    for future in list(source._remote._pending.values()):
        future.result()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_remote_shards_are_fetched_lazily_and_read_like_local(tmp_path, compression):
    docs = random_docs(60, seed=30, min_len=20, max_len=40)
    remote = remote_dataset(tmp_path, docs, compression=compression)
    num_shards = len(json.loads((remote / "index.json").read_text())["shards"])
    assert num_shards >= 8
    local = tmp_path / "local"
    domain = Domain("r", local, remote=f"file://{remote}", prefetch_shards=0)
    assert shard_files(local) == []  # opening fetched index.json and the length index only
    assert_docs_equal(domain.read_docs(0, 2), docs[:2])
    assert shard_files(local) == ["shard.00000.mds"]  # the first batch needed one shard of many
    assert_docs_equal(domain.read_docs(0, 60), docs)
    assert_docs_equal(domain.read_docs(0, 60), Domain("l", remote).read_docs(0, 60))
    assert len(shard_files(local)) == num_shards  # raw shards only: compressed copies were dropped


def test_first_loader_batch_of_a_remote_domain_needs_few_shards(tmp_path):
    from tikmix_loader import MixtureLoader

    docs = random_docs(400, seed=36, min_len=20, max_len=40)
    remote = remote_dataset(tmp_path, docs)
    num_shards = len(json.loads((remote / "index.json").read_text())["shards"])
    domain = Domain("r", tmp_path / "local", remote=f"file://{remote}", prefetch_shards=0)
    loader = MixtureLoader(
        [domain], batch_size=2, seq_len=16, num_workers=0, prefetch=2, block_docs=4, shuffle_window=4, seed=0
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 16)
    assert 1 <= len(shard_files(tmp_path / "local")) <= 4 < num_shards


def test_remote_prefetches_ahead_of_the_read_position(tmp_path):
    remote = remote_dataset(tmp_path, random_docs(60, seed=31, min_len=20, max_len=40))
    source = MDSSource(tmp_path / "local", remote=str(remote), prefetch_shards=2)
    source.read_docs(0, 1)
    wait_for_prefetches(source)
    assert shard_files(tmp_path / "local") == ["shard.00000.mds", "shard.00001.mds", "shard.00002.mds"]


def test_remote_cache_stays_under_its_limit_and_refetches_evicted_shards(tmp_path, monkeypatch):
    from streaming.base.stream import Stream

    docs = random_docs(60, seed=32, min_len=20, max_len=40)
    remote = remote_dataset(tmp_path, docs, compression="zstd")
    shards = json.loads((remote / "index.json").read_text())["shards"]
    limit = 3 * max(shard["raw_data"]["bytes"] + shard["zip_data"]["bytes"] for shard in shards)
    local = tmp_path / "local"
    fetched, peak = [], [0]
    original = Stream.prepare_shard

    def spy(self, reader):
        fetched.append(reader.raw_data.basename)
        delta = original(self, reader)
        peak[0] = max(peak[0], bytes_on_disk(local))
        return delta

    monkeypatch.setattr(Stream, "prepare_shard", spy)
    source = MDSSource(local, remote=str(remote), cache_limit=limit, prefetch_shards=1)
    for _ in range(2):  # two passes: the second refetches what the first evicted
        for index in range(60):
            assert_docs_equal(source.read_docs(index, index + 1), docs[index : index + 1])
            assert bytes_on_disk(local) <= limit and source.cached_bytes <= limit
    wait_for_prefetches(source)
    assert peak[0] <= limit
    assert fetched.count("shard.00000.mds") == 2 and len(shard_files(local)) < len(shards)


def test_remote_reads_from_several_threads_under_a_cache_limit(tmp_path):
    docs = random_docs(40, seed=37, min_len=20, max_len=40)
    remote = remote_dataset(tmp_path, docs)
    shards = json.loads((remote / "index.json").read_text())["shards"]
    limit = 4 * max(shard["raw_data"]["bytes"] for shard in shards)
    source = MDSSource(tmp_path / "local", remote=str(remote), cache_limit=limit, prefetch_shards=1)

    def read_in_order(seed):
        order = np.random.default_rng(seed).permutation(40)
        return all(np.array_equal(source.read_docs(i, i + 1)[0], docs[i]) for i in order)

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(read_in_order, range(3)))
    wait_for_prefetches(source)
    assert source.cached_bytes <= limit and bytes_on_disk(tmp_path / "local") <= limit


def _wait_until(condition, what):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


@pytest.mark.parametrize("second_reader_arrives", ["while_prefetching", "while_fetching"])
def test_a_shard_whose_prefetch_gave_way_is_fetched_once_for_all_its_readers(
    tmp_path, monkeypatch, second_reader_arrives
):
    """Two threads read a shard whose prefetch gave way to a full cache. The fetch that follows must serve
    both: the second reader neither reads the shard before it is on disk nor downloads it again.

    The interleaving is forced: the prefetch waits until a reader waits on it, and the first download of
    the shard waits until the other reader has shown what it does (downloads too, waits, or finishes).
    """
    from streaming.base.stream import Stream

    from tikmix_loader.data.sources import _mds_remote

    docs = random_docs(40, seed=38, min_len=30, max_len=30)  # equal documents: equal shards
    remote = remote_dataset(tmp_path, docs)
    index = json.loads((remote / "index.json").read_text())
    sizes = [shard["raw_data"]["bytes"] for shard in index["shards"]]
    assert len(set(sizes[:3])) == 1
    limit = 2 * sizes[0]  # shard 0, being read, and one more
    source = MDSSource(tmp_path / "local", remote=str(remote), cache_limit=limit, prefetch_shards=2)
    shards = source._remote
    first_doc_of_shard_2 = int(source._shard_starts[2])

    prefetch_may_start, fetching, decided = threading.Event(), threading.Event(), threading.Event()
    fetched = []
    reserve, prepare_shard = _mds_remote.RemoteShards._reserve, Stream.prepare_shard

    def held_reserve(self, shard, *, demand):
        if shard == 2 and not demand:
            prefetch_may_start.wait(10)
        return reserve(self, shard, demand=demand)

    def held_prepare_shard(self, reader):
        fetched.append(reader.raw_data.basename)
        if reader.raw_data.basename == "shard.00002.mds":
            if fetched.count("shard.00002.mds") == 1:
                fetching.set()
                decided.wait(10)
            else:
                decided.set()  # the second reader downloads the shard again
        return prepare_shard(self, reader)

    class SignallingFuture(Future):  # the futures threads register their own fetches with
        def result(self, timeout=None):
            decided.set()  # the second reader waits for the first one's fetch
            return super().result(timeout)

    monkeypatch.setattr(_mds_remote.RemoteShards, "_reserve", held_reserve)
    monkeypatch.setattr(Stream, "prepare_shard", held_prepare_shard)
    monkeypatch.setattr(_mds_remote, "Future", SignallingFuture)

    def read_shard_2():
        try:
            return source.read_docs(first_doc_of_shard_2, first_doc_of_shard_2 + 1)[0]
        finally:
            decided.set()  # a reader that is done (or failed) let the held download go on

    with ThreadPoolExecutor(2) as pool, shards.reading(0):  # shard 0 stays in use throughout
        _wait_until(lambda: set(shards._pending) == {2}, "shard 1 is prefetched and shard 2's prefetch waits")
        prefetch = shards._pending[2]
        readers = [pool.submit(read_shard_2)]
        if second_reader_arrives == "while_prefetching":
            readers.append(pool.submit(read_shard_2))
        _wait_until(lambda: shards._in_use[2] == len(readers), "the readers wait for shard 2's prefetch")
        prefetch_may_start.set()  # it gives way: a prefetch does not evict shard 1, fetched ahead, unread
        prefetch.result()
        fetching.wait(10)
        if second_reader_arrives == "while_fetching":
            _wait_until(lambda: shards._pending.get(2) is not prefetch, "the prefetch is forgotten")
            readers.append(pool.submit(read_shard_2))
        for reader in readers:
            np.testing.assert_array_equal(reader.result(), docs[first_doc_of_shard_2])
    assert fetched.count("shard.00002.mds") == 1
    assert source.cached_bytes <= limit and bytes_on_disk(tmp_path / "local") <= limit


def test_readers_that_cannot_make_room_fail_instead_of_waiting_on_each_other(tmp_path, monkeypatch):
    """Two readers find the cache full of shards being read. Each must fail with the `cache_limit` advice,
    not wait for the other's fetch to free room (each fetch waiting on the other hung both readers).

    The interleaving is forced: each reader's first failed attempt to make room waits for the other's.
    """
    from tikmix_loader.data.sources import _mds_remote

    docs = random_docs(40, seed=38, min_len=30, max_len=30)  # equal documents: equal shards
    remote = remote_dataset(tmp_path, docs)
    sizes = [
        shard["raw_data"]["bytes"] for shard in json.loads((remote / "index.json").read_text())["shards"]
    ]
    limit = 2 * sizes[0]
    source = MDSSource(tmp_path / "local", remote=str(remote), cache_limit=limit, prefetch_shards=0)
    shards = source._remote
    both_found_no_room, failed_once = threading.Barrier(2), set()
    reserve = _mds_remote.RemoteShards._reserve

    def reserve_in_step(self, shard, *, demand):
        made_room = reserve(self, shard, demand=demand)
        if not made_room and shard not in failed_once:
            failed_once.add(shard)
            both_found_no_room.wait(10)
        return made_room

    monkeypatch.setattr(_mds_remote.RemoteShards, "_reserve", reserve_in_step)
    errors = {}

    def read(shard):
        try:
            source.read_docs(int(source._shard_starts[shard]), int(source._shard_starts[shard]) + 1)
        except ShardError as exc:
            errors[shard] = str(exc)

    with shards.reading(0), shards.reading(1):  # the cache is full of shards being read
        readers = [threading.Thread(target=read, args=(shard,), daemon=True) for shard in (2, 3)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(10)
        assert not any(reader.is_alive() for reader in readers), "the readers wait on each other"
    for shard in (2, 3):
        assert (
            f"cannot make room for shard shard.0000{shard}.mds within `cache_limit`={limit}" in errors[shard]
        )
    assert not shards._pending and source.cached_bytes <= limit
    assert_docs_equal(
        source.read_docs(0, len(docs)), docs
    )  # once shards 0 and 1 are released, all reads work


def test_remote_cache_limit_smaller_than_a_shard(tmp_path):
    remote = remote_dataset(tmp_path, random_docs(20, seed=33, min_len=20))
    with pytest.raises(
        ConfigError, match=r"`cache_limit`=100 bytes cannot hold the largest shard .*at least"
    ):
        MDSSource(tmp_path / "local", remote=str(remote), cache_limit=100)


def test_remote_corrupt_shard_is_named(tmp_path):
    remote = remote_dataset(tmp_path, random_docs(20, seed=34, min_len=20))
    _flip_byte(remote / "shard.00001.mds")
    source = MDSSource(tmp_path / "local", remote=str(remote), prefetch_shards=0)
    source.read_docs(0, 1)
    with pytest.raises(ShardError, match=r"shard.00001.mds: checksum failure after download from"):
        source.read_docs(0, source.num_docs)


def test_remote_source_pickles_for_spawned_workers(tmp_path):
    docs = random_docs(30, seed=35, min_len=20)
    source = MDSSource(tmp_path / "local", remote=str(remote_dataset(tmp_path, docs)), cache_limit=1 << 12)
    source.read_docs(0, 3)
    wait_for_prefetches(source)
    clone = pickle.loads(pickle.dumps(source))
    assert_docs_equal(clone.read_docs(0, 30), docs)


def test_mds_remote_that_does_not_exist(tmp_path):
    with pytest.raises(ShardError, match=r"nowhere/index.json: cannot download"):
        MDSSource(tmp_path / "local", remote=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------- index and ids written at conversion


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_opening_a_converted_domain_reads_no_sample(tmp_path, fmt, monkeypatch):
    docs = random_docs(30, seed=20)
    path = make_domain_files(tmp_path, fmt, docs, **SPLIT_OPTIONS[fmt])
    spied = {"mds": (MDSSource, "_decode"), "parquet": (ParquetSource, "_read_group")}[fmt]
    original = getattr(*spied)
    reads = []
    monkeypatch.setattr(*spied, lambda self, *args: reads.append(args) or original(self, *args))
    domain = Domain("d", path)
    assert reads == []  # lengths came from the index
    np.testing.assert_array_equal(domain.doc_lengths, [len(doc) for doc in docs])
    assert domain.num_tokens == sum(len(doc) for doc in docs)
    assert_docs_equal(domain.read_docs(0, 30), docs)
    assert reads  # reading documents goes through the spied reader


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_domains_written_by_others_fall_back_to_a_scan(tmp_path, fmt, monkeypatch):
    docs = random_docs(30, seed=21)
    path = without_index(make_domain_files(tmp_path, fmt, docs, **SPLIT_OPTIONS[fmt]), fmt)
    cls = {"mds": MDSSource, "parquet": ParquetSource}[fmt]
    scans = []
    original = cls._scan_lengths
    monkeypatch.setattr(cls, "_scan_lengths", lambda self: scans.append(1) or original(self))
    domain = Domain("d", path)  # tikmix.json still gives the ids
    assert scans == [1]
    np.testing.assert_array_equal(domain.doc_lengths, [len(doc) for doc in docs])


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_stale_length_index_is_caught_on_read(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, [[1, 2, 3], [4]], metadata=False, token_info=BYTE_IDS)
    if fmt == "mds":
        np.save(path / "tikmix-lengths.npy", np.array([2, 2], dtype=np.int64))
        pattern = r"document 0 now holds 3 tokens but held 2"
    else:
        file = next(path.glob("*.parquet"))
        table = pq.read_table(file)
        table = table.set_column(1, "num_tokens", pa.array([2, 2], type=pa.int64()))
        pq.write_table(table, file)
        pattern = r"documents 0..1 do not hold the token counts recorded .*'num_tokens' column is wrong"
    with pytest.raises(ShardError, match=pattern):
        Domain("d", path).read_docs(0, 2)


def test_mds_length_index_that_does_not_match(tmp_path):
    path = make_domain_files(tmp_path, "mds", [[1, 2, 3], [4]], token_info=BYTE_IDS)
    np.save(path / "tikmix-lengths.npy", np.array([3], dtype=np.int64))
    with pytest.raises(
        ShardError, match=r"tikmix-lengths.npy: holds int64 \(1,\) values but .*lists 2 documents"
    ):
        Domain("d", path)
    np.save(path / "tikmix-lengths.npy", np.array([3, 1], dtype=np.int32))
    with pytest.raises(ShardError, match=r"tikmix-lengths.npy: holds int32 lengths, not int64"):
        Domain("d", path)
    (path / "tikmix-lengths.npy").unlink()
    with pytest.raises(ShardError, match=r"tikmix-lengths.npy: cannot read this per-document array"):
        Domain("d", path)


def test_per_document_values_are_read_without_decoding_documents(tmp_path, monkeypatch):
    docs = random_docs(25, seed=22)
    mds = make_domain_files(tmp_path, "mds", docs, name="m", **SPLIT_OPTIONS["mds"])
    np.save(mds / "scores.npy", np.arange(25, dtype=np.float32))
    parquet = make_domain_files(tmp_path, "parquet", docs, name="p", **SPLIT_OPTIONS["parquet"])
    monkeypatch.setattr(MDSSource, "_decode", lambda *args: pytest.fail("decoded a document"))
    monkeypatch.setattr(ParquetSource, "_read_group", lambda *args: pytest.fail("decoded a document"))
    np.testing.assert_array_equal(MDSSource(mds).read_doc_array("scores.npy"), np.arange(25))
    np.testing.assert_array_equal(ParquetSource(parquet).read_doc_column("num_tokens"), list(map(len, docs)))
    with pytest.raises(
        ShardError, match=r"part-00000.parquet \(row group 0\): cannot read the per-document column 'q'"
    ):
        ParquetSource(parquet).read_doc_column("q")


IDS = {"eos_id": 5, "pad_id": 6, "vocab_size": 40}


@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_come_from_the_data_without_tikmix_json(tmp_path, fmt):
    if fmt == "memmap":
        path = write_memmap(tmp_path / "tokens.bin", [np.array([1, 2]), np.array([3])], **IDS)
    else:
        path = make_domain_files(tmp_path, fmt, [[1, 2], [3]], metadata=False, token_info=IDS)
    domain = Domain("d", path)
    assert domain.metadata is None
    assert (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (5, 6, 40)
    explicit = Domain("d", path, eos_id=7, pad_id=8, vocab_size=50)
    assert (explicit.eos_id, explicit.pad_id, explicit.source.vocab_size) == (7, 8, 50)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_recorded_ids_is_a_named_error(tmp_path, fmt):
    if fmt == "memmap":
        path = make_domain_files(tmp_path, fmt, [[1, 2]], metadata=False, vocab_size=None)
    else:
        path = without_index(make_domain_files(tmp_path, fmt, [[1, 2]], metadata=False), fmt)
    fix = r"Pass `eos_id=` and `vocab_size=` from the tokenizer .* or re-convert with `tikmix convert`"
    with pytest.raises(
        DomainError, match=rf"Domain 'd' at .*domain: its data records no eos_id or vocab_size.*{fix}"
    ):
        Domain("d", path)
    with pytest.raises(DomainError, match=r"records no vocab_size .*Pass `vocab_size=`"):
        Domain("d", path, eos_id=0)
    domain = Domain("d", path, eos_id=0, vocab_size=3)
    assert (domain.eos_id, domain.pad_id) == (0, 0)  # padding defaults to EOS: it is loss-masked anyway


def test_old_byte_memmap_sidecar_keeps_the_byte_ids(tmp_path):
    path = make_domain_files(tmp_path, "memmap", [[1, 2]], metadata=False, vocab_size=258)
    domain = Domain("d", path)
    assert (domain.eos_id, domain.pad_id) == (256, 257)


def test_remote_mds_carries_its_ids(tmp_path):
    remote = make_domain_files(tmp_path, "mds", [[1, 2], [3]], metadata=False, token_info=IDS)
    domain = Domain("r", tmp_path / "local", remote=f"file://{remote}")
    assert (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (5, 6, 40)
    with pytest.raises(DomainError, match=r"Domain 'r' at .*local2: its data records no eos_id"):
        Domain("r", tmp_path / "local2", remote=str(without_index(remote, "mds")), vocab_size=40)


def test_embedded_ids_that_are_malformed(tmp_path):
    path = make_domain_files(tmp_path, "mds", [[1]], metadata=False, token_info={"eos_id": -1})
    with pytest.raises(
        ShardError, match=r"index.json: tikmix.eos_id must be an int >= 0, got -1; re-convert"
    ):
        Domain("d", path)
    write_parquet(tmp_path / "p", [np.array([1])], token_info={"vocab_size": "big"})
    with pytest.raises(ShardError, match=r"part-00000.parquet: tikmix.vocab_size must be an int >= 1"):
        Domain("d", tmp_path / "p")


def test_memmap_directory_with_one_bin(tmp_path):
    docs = random_docs(5, seed=10)
    path = make_domain_files(tmp_path, "memmap", docs)
    assert_docs_equal(open_source(path).read_docs(0, 5), docs)
    shutil.copy(path / "tokens.bin", path / "other.bin")
    with pytest.raises(ShardError, match=r"exactly one \.bin.*other\.bin.*tokens\.bin"):
        open_source(path)


def test_domain_defaults_ids_from_metadata(tmp_path):
    path = make_domain_files(tmp_path, "parquet", [[1, 2], [3]], vocab_size=1000, eos_id=998, pad_id=999)
    domain = Domain("meta", path)
    assert (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (998, 999, 1000)
    assert domain.metadata.num_docs == 2
    explicit = Domain("meta", path, eos_id=5, pad_id=6, vocab_size=2000)
    assert (explicit.eos_id, explicit.pad_id, explicit.source.vocab_size) == (5, 6, 2000)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_domain(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, [], name=f"empty_{fmt}")
    with pytest.raises(DomainError, match=r"Domain 'e' at .*empty_.* is empty \(0 documents"):
        Domain("e", path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_ids_outside_vocabulary(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, [[1, 2], [3, 300]], dtype="int32", metadata=False)
    # MDS and Parquet fail while scanning at open, memmap when the documents are read.
    with pytest.raises(
        ShardError, match=r"token ids span \[\d, 300\], outside the declared vocabulary \[0, 258\)"
    ):
        Domain("v", path, vocab_size=258, eos_id=256).read_docs(0, 2)


def test_token_range_reads_of_out_of_vocabulary_ids_name_the_file_and_documents(tmp_path):
    # The memmap builds this message only on an error; it must still name where the bad ids are.
    path = make_domain_files(tmp_path, "memmap", [[1, 2], [3, 300], [4]], dtype="int32", metadata=False)
    domain = Domain("v", path, vocab_size=258, eos_id=256)
    np.testing.assert_array_equal(domain.read_doc_ranges([2, 0], [0, 1], [1, 2]), [4, 2])
    with pytest.raises(ShardError, match=r"\.bin \(documents 0\.\.2\): token ids span \[1, 300\]"):
        domain.read_doc_ranges([2, 1, 0], [0, 0, 0], [1, 2, 1])


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_out_of_vocabulary_after_a_cached_open(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, [[1, 2], [3, 300]], dtype="int32", metadata=False)
    open_source(path)  # no vocabulary: ids are not checked at open
    domain = Domain("v", path, vocab_size=258, eos_id=256)  # a later open: ids are still checked on read
    with pytest.raises(ShardError, match=r"\[\d, 300\], outside the declared vocabulary \[0, 258\)"):
        domain.read_docs(0, 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_token_ids(tmp_path, fmt):
    path = make_domain_files(tmp_path, fmt, [[1, -4]], dtype="int32", metadata=False)
    with pytest.raises(ShardError, match=r"token ids span \[-4, 1\]"):
        Domain("n", path, eos_id=0, pad_id=0, vocab_size=10).read_docs(0, 1)


def test_ids_that_do_not_fit_the_storage_dtype(tmp_path):
    with pytest.raises(ShardError, match=r"document 1\).*\[0, 70000\], which does not fit dtype uint16"):
        write_mds(tmp_path / "x", [np.array([1]), np.array([0, 70_000])], dtype="uint16")
    with pytest.raises(ShardError, match=r"\[-1, 3\], which does not fit dtype uint16"):
        cast_tokens([3, -1], "uint16", "doc")
    with pytest.raises(ShardError, match=r"must be a 1-D array of integer token ids"):
        cast_tokens([0.5], "uint16", "doc")


def test_eos_outside_vocabulary(tmp_path):
    path = make_domain_files(tmp_path, "memmap", [[1, 2]], vocab_size=256, metadata=False)
    with pytest.raises(ConfigError, match=r"`eos_id`=256 is outside the vocabulary \[0, 256\)"):
        Domain("d", path, eos_id=256)


def test_metadata_disagreeing_with_files(tmp_path):
    path = make_domain_files(
        tmp_path, "parquet", random_docs(30, seed=11), rows_per_group=5, rows_per_file=10
    )
    (path / "part-00001.parquet").unlink()
    with pytest.raises(ShardError, match=r"holds 20 documents .* tikmix.json records 30 .*shard is missing"):
        Domain("d", path)


def test_corrupt_metadata_file(tmp_path):
    path = make_domain_files(tmp_path, "mds", [[1, 2]])
    (path / "tikmix.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"tikmix.json: not valid JSON"):
        Domain("d", path)
    (path / "tikmix.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ShardError, match=r"tikmix.json: not a tikmix-dataset metadata file"):
        Domain("d", path)


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        DomainError, match=r"cannot tell the format .*tokenized with `tikmix convert`.* `format=`"
    ) as caught:
        Domain("d", tmp_path)
    assert type(caught.value) is UnknownFormatError  # a DomainError, as before; exported with the others
    clone = pickle.loads(pickle.dumps(caught.value))  # to another process: the same error, said once
    assert type(clone) is UnknownFormatError and str(clone) == str(caught.value)
    with pytest.raises(DomainError, match=r"unknown `format` 'csv'"):
        Domain("d", tmp_path, format="csv")


@pytest.mark.parametrize("format", ["auto", "mds", "parquet", "memmap"])
def test_missing_path_is_named_as_missing(tmp_path, format):
    with pytest.raises(DomainError, match=r"Domain 'web': .*typo does not exist .*check the path"):
        Domain("web", tmp_path / "typo", format=format)


@pytest.fixture
def mds_dir(tmp_path):
    return make_domain_files(tmp_path, "mds", random_docs(40, seed=12, min_len=20), size_limit=1 << 10)


def _shards(path):
    return sorted(path.glob("shard.*.mds*"))


def test_mds_missing_index(mds_dir):
    (mds_dir / "index.json").unlink()
    with pytest.raises(ShardError, match=r"index.json: not found; an MDS directory needs the index.json"):
        Domain("d", mds_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"index.json: is empty or corrupt"),
        ('{"shards": [], "version": 1}', r"not a streaming version-2 index"),
        ('{"shards": [{"format": "mds"}], "version": 2}', r"shard entry is malformed"),
        ('{"shards": [{"format": "json"}], "version": 2}', r"lists a 'json' shard"),
    ],
)
def test_mds_corrupt_index(mds_dir, content, message):
    (mds_dir / "index.json").write_text(content)
    with pytest.raises(ShardError, match=message):
        MDSSource(mds_dir)


def test_mds_missing_shard(mds_dir):
    _shards(mds_dir)[1].unlink()
    with pytest.raises(ShardError, match=r"shard shard.00001.mds listed in index.json is missing"):
        Domain("d", mds_dir)


def test_mds_truncated_shard(mds_dir):
    shard = _shards(mds_dir)[2]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(
        ShardError, match=rf"{shard.name}: holds \d+ bytes but index.json declares .*truncated"
    ):
        Domain("d", mds_dir)


def _flip_byte(file, position=-5):
    data = bytearray(file.read_bytes())
    data[position] ^= 0xFF
    file.write_bytes(bytes(data))


def test_mds_corrupt_shard_fails_its_checksum(mds_dir):
    shard = _shards(mds_dir)[0]
    _flip_byte(shard)
    with pytest.raises(ShardError, match=rf"{shard.name}: xxh64 checksum failure"):
        Domain("d", mds_dir)
    assert len(MDSSource(mds_dir, verify_hashes="never").read_docs(0, 1)) == 1  # opt-out reads on


def test_bit_rot_after_the_first_open_is_caught_by_every_open(mds_dir):
    Domain("d", mds_dir)  # the first open hashes every shard and records it
    shard = _shards(mds_dir)[1]
    before = shard.stat()
    _flip_byte(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # rot leaves size and mtime alone
    Domain("d", mds_dir)  # "first_open": this exact file was verified already
    with pytest.raises(ShardError, match=rf"{shard}: xxh64 checksum failure .*the shard is corrupt"):
        Domain("d", mds_dir, verify_hashes="every_open")
    Domain("d", mds_dir, verify_hashes="never")
    with pytest.raises(
        ConfigError, match=r"`verify_hashes` must be one of \('first_open', 'every_open', 'never'\)"
    ):
        Domain("d", mds_dir, verify_hashes="always")


def test_mds_checksum_algorithm_not_in_index(mds_dir):
    with pytest.raises(ShardError, match=r"`hash_algorithm='sha1'` but index.json records only \['xxh64'\]"):
        MDSSource(mds_dir, hash_algorithm="sha1")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # streaming's offset arithmetic
def test_mds_corrupt_shard_without_hashes(tmp_path):
    path = make_domain_files(tmp_path, "mds", random_docs(5, seed=13), hashes=())
    shard = _shards(path)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = (10**6).to_bytes(4, "little")  # the first sample's end offset now points past the file
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name} \(sample \d\): cannot decode"):
        Domain("d", path).read_docs(0, 5)


def test_mds_corrupt_compressed_shard(tmp_path):
    path = make_domain_files(tmp_path, "mds", random_docs(5, seed=14), compression="zstd", hashes=())
    shard = _shards(path)[0]
    _flip_byte(shard, position=10)
    with pytest.raises(ShardError, match=rf"{shard.name}: cannot decompress with 'zstd'"):
        Domain("d", path)


def test_mds_wrong_column(mds_dir):
    with pytest.raises(ShardError, match=r"has no column 'ids' \(columns: \['tokens'\]\); pass `column=`"):
        Domain("d", mds_dir, column="ids")


def test_mds_column_not_an_array(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "s"), columns={"tokens": "str"}) as writer:
        writer.write({"tokens": "abc"})
    with pytest.raises(ShardError, match=r"column 'tokens' has MDS encoding 'str'"):
        Domain("d", tmp_path / "s")


def test_mds_shard_changed_after_open(mds_dir, tmp_path):
    domain = Domain("d", mds_dir)
    replacement = make_domain_files(
        tmp_path, "mds", random_docs(40, seed=99, min_len=20), name="other", size_limit=1 << 10
    )
    shutil.copy(_shards(replacement)[0], _shards(mds_dir)[0])
    with pytest.raises(ShardError, match=r"document 0 now holds \d+ tokens but held \d+ .*changed on disk"):
        domain.read_docs(0, 1)


def test_parquet_errors(tmp_path):
    with pytest.raises(ShardError, match=r"no \*\.parquet files"):
        ParquetSource(tmp_path)
    table = pa.table(
        {"tokens": pa.array([[1, 2], None, [3]], type=pa.list_(pa.int32())), "text": ["a", "b", "c"]}
    )
    pq.write_table(table, tmp_path / "nulls.parquet")
    with pytest.raises(ShardError, match=r"nulls.parquet \(row group 0\): row 1 has a null 'tokens'"):
        ParquetSource(tmp_path / "nulls.parquet")
    with pytest.raises(ShardError, match=r"no column 'ids' \(columns: \['tokens', 'text'\]\)"):
        ParquetSource(tmp_path / "nulls.parquet", token_column="ids")
    with pytest.raises(ShardError, match=r"column 'text' has type string; token ids must be list<int>"):
        ParquetSource(tmp_path / "nulls.parquet", token_column="text")


def test_parquet_truncated_file(tmp_path):
    path = make_domain_files(tmp_path, "parquet", random_docs(10, seed=15))
    part = path / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-20])
    with pytest.raises(ShardError, match=r"part-00000.parquet: not a readable Parquet file"):
        Domain("d", path)


def test_memmap_truncated_file(tmp_path):
    path = make_domain_files(tmp_path, "memmap", random_docs(4, seed=16))
    data = (path / "tokens.bin").read_bytes()
    (path / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(ShardError, match=r"tokens.bin: holds \d+ bytes but its sidecar declares .*truncated"):
        Domain("d", path)
