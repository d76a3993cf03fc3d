"""The data path's compiled helpers: ``keyed_permutation`` is numpy's
``Generator(PCG64(SeedSequence(keys))).permutation(n)`` bit for bit, and numpy's own (with windows cut in
Python) whenever the compiled code is missing, fails or disagrees. (That the compiled window cutting gives
the vectorised cut's pieces is tested in ``test_stream.py``.)"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tikmix_loader import Domain, MixtureLoader, _jit_build
from tikmix_loader.data import _compiled
from tikmix_loader.data.dataset import as_dataloader
from tikmix_loader.data.shuffle import keyed_permutation
from tikmix_loader.data.sources._tokens import WRITE_DTYPES
from tikmix_loader.data.sources.memmap import write_memmap

ROOT = Path(__file__).resolve().parents[2]


def numpy_permutation(values, n):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(values)))).permutation(n)


@pytest.fixture(scope="module")
def compiled():
    """The compiled permutation. Where a compiler and ninja are, a failed build fails these tests
    (``test_the_compiled_helpers_are_active_where_a_compiler_is``); only where one is missing do they skip."""
    missing = _jit_build.missing_tool("cpu")
    if missing is not None:
        pytest.skip(f"the compiled data-path helpers cannot be built here: {missing}")
    library = _compiled.module()
    assert library is not None, "the compiled data-path helpers did not build or load (see the log)"
    return library.permutation


def test_the_compiled_helpers_are_active_where_a_compiler_is(caplog):
    # A fresh clone's test run builds the helpers (or loads the cached build); a build that silently fell
    # back to numpy would pass every equality test, so this one fails instead. Where no compiler or ninja
    # is, the fallback is the expected outcome.
    missing = _jit_build.missing_tool("cpu")
    assert os.environ.get(_compiled.SWITCH_ENV) != "0", f"{_compiled.SWITCH_ENV}=0 turns the helpers off"
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        library = _compiled.module()
    if missing is None:
        assert library is not None, f"a compiler and ninja are here, but: {caplog.text}"
        assert Path(library.__file__).parent == _compiled.build_dir()
        assert not [record for record in caplog.records if record.name == _compiled.__name__]
    else:
        assert library is None


def random_cases(rng: np.random.Generator, count: int) -> list[tuple[tuple[int, ...], int]]:
    """(values, n): 1 to 7 values of every width from 1 to 64 bits (zeros among the narrow ones), and n
    spread over 0 .. 5000 with the power-of-two edges where the rejection mask widens."""
    edges = [0, 1, 2, 3, 4, 5, 7, 8, 9, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049]
    cases = []
    for index in range(count):
        size = int(rng.integers(1, 8))
        words = rng.integers(0, 2**64, size, dtype=np.uint64).tolist()
        values = tuple(word >> (64 - int(bits)) for word, bits in zip(words, rng.integers(1, 65, size)))
        n = edges[index % len(edges)] if index % 3 == 0 else int(rng.integers(0, 5000))
        cases.append((values, n))
    return cases


def test_compiled_permutation_equals_numpy_over_thousands_of_keys(compiled):
    for values, n in random_cases(np.random.default_rng(12), 3000):
        expected = numpy_permutation(values, n)
        actual = compiled(list(values), n)
        assert actual.dtype == expected.dtype == np.int64
        np.testing.assert_array_equal(actual, expected, err_msg=f"values={values} n={n}")


def test_long_permutations_cross_every_mask_width_up_to_2_to_the_17(compiled):
    for n in (2**16, 2**16 + 1, 2**17 + 3):
        np.testing.assert_array_equal(compiled([3, 2**40 + 1], n), numpy_permutation([3, 2**40 + 1], n))


@pytest.mark.parametrize(
    "keys",
    [(0,), (0, 0, 0, 0, 0), (1, 2**32 - 1, 2**32, 2**64 - 1), (5, 1 << 100), (2**64, 3), (7, 2**200 + 9, 0)],
)
def test_keyed_permutation_equals_numpy_for_keys_of_every_size(compiled, keys):
    # Keys of 2**64 and more become uint32 words in Python before the compiled call.
    for n in (0, 1, 2, 50, 777):
        np.testing.assert_array_equal(keyed_permutation(*keys, n=n), numpy_permutation(keys, n))


def test_keyed_permutation_validates_like_rng_for(compiled):
    np.testing.assert_array_equal(
        keyed_permutation(np.int64(4), np.uint64(2**63 + 5), n=np.int32(9)),
        numpy_permutation((4, 2**63 + 5), 9),
    )
    with pytest.raises(ValueError, match="negative"):
        keyed_permutation(0, -1, n=4)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        keyed_permutation(0, 1, n=-1)
    with pytest.raises(TypeError):
        keyed_permutation(0, 1, n=2.5)


def test_compiled_code_refuses_lengths_whose_draws_would_need_64_bits(compiled):
    # Past 2**32 elements numpy's shuffle draws 64-bit numbers, a branch the compiled code does not have.
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\]"):
        compiled([1], 2**32 + 1)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\]"):
        compiled([1], -1)


def test_a_built_library_loads_without_torch(compiled):
    code = (
        "import sys\n"
        "from tikmix_loader.data import _compiled\n"
        "assert _compiled.module() is not None\n"
        "assert 'torch' not in sys.modules, 'loading the built library imported torch'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_a_failed_build_logs_one_line_and_numpy_serves_the_same_permutations(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TIKMIX_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger=_compiled.__name__):
        assert _compiled.resolve() is None
    warnings = [
        record
        for record in caplog.records
        if record.name == _compiled.__name__ and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert "numpy computes the shuffles" in warnings[0].getMessage()
    assert not any(tmp_path.rglob("*.so"))
    # Forced fallback: keyed_permutation then takes numpy's path and gives the same numbers.
    monkeypatch.setattr(_compiled, "_resolved", True)
    monkeypatch.setattr(_compiled, "_module", None)
    for values, n in random_cases(np.random.default_rng(5), 60):
        np.testing.assert_array_equal(keyed_permutation(*values, n=n), numpy_permutation(values, n))


def test_a_process_that_found_no_library_tells_its_children_and_they_stay_quiet(
    monkeypatch, tmp_path, caplog
):
    # DataLoader workers under spawn/forkserver and launched ranks are fresh interpreters: without the
    # inherited answer each would retry the failed build and log its own line.
    monkeypatch.delenv(_compiled.SWITCH_ENV, raising=False)  # restored (removed) after the test
    monkeypatch.setenv("TIKMIX_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(_compiled, "_resolved", False)
    monkeypatch.setattr(_compiled, "_module", None)
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert _compiled.module() is None
    (record,) = [record for record in caplog.records if record.name == _compiled.__name__]
    message = record.getMessage()
    assert (
        "no C++ compiler" in message
        and str(tmp_path / "ext") in message
        and "TIKMIX_EXTENSIONS_DIR" in message
    )
    assert os.environ[_compiled.SWITCH_ENV] == "0"
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from tikmix_loader.data import _compiled\n"
        "from tikmix_loader.data.shuffle import keyed_permutation\n"
        "print(_compiled.module(), keyed_permutation(3, 4, n=6).tolist())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split(maxsplit=1) == ["None", f"{numpy_permutation((3, 4), 6).tolist()}\n"]
    assert "unavailable" not in child.stderr and "building" not in child.stderr


def test_a_dataloader_with_workers_resolves_the_helpers_before_it_starts_them(monkeypatch, tmp_path):
    # Resolved lazily, the first read would come after spawned workers started, and each would build or
    # fail and log on its own.
    paths = [write_memmap(tmp_path / f"{name}.bin", [np.arange(30)] * 20, vocab_size=258) for name in "ab"]
    loader = MixtureLoader([Domain(name, path) for name, path in zip("ab", paths)], batch_size=2, seq_len=8)
    calls = []
    monkeypatch.delenv(_compiled.SWITCH_ENV, raising=False)
    monkeypatch.setattr(_compiled, "_resolved", False)
    monkeypatch.setattr(_compiled, "_module", None)
    monkeypatch.setattr(_compiled, "resolve", lambda: calls.append("resolve"))  # unavailable
    as_dataloader(loader, num_workers=0)
    assert calls == []
    as_dataloader(loader, num_workers=2, multiprocessing_context="spawn")
    assert calls == ["resolve"] and os.environ[_compiled.SWITCH_ENV] == "0"


def test_an_unusable_extensions_dir_logs_one_line_naming_it(monkeypatch, tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the build folder's parent should be\n")
    monkeypatch.setenv("TIKMIX_EXTENSIONS_DIR", str(blocked))
    with caplog.at_level(logging.INFO, logger=_compiled.__name__):
        assert _compiled.resolve() is None
    (record,) = [r for r in caplog.records if r.name == _compiled.__name__ and r.levelno == logging.WARNING]
    assert str(blocked) in record.getMessage() and "TIKMIX_EXTENSIONS_DIR" in record.getMessage()


def test_a_broken_cached_library_logs_one_line_and_is_not_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TIKMIX_EXTENSIONS_DIR", str(tmp_path))
    folder = _compiled.build_dir()
    folder.mkdir(parents=True)
    (folder / f"{_compiled.MODULE_NAME}.so").write_bytes(b"not a shared library")
    (folder / ".built").write_text("marker of a finished build\n")
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert _compiled.resolve() is None
    (record,) = [record for record in caplog.records if record.name == _compiled.__name__]
    assert "ImportError" in record.getMessage() and "numpy computes the shuffles" in record.getMessage()


def test_a_library_that_disagrees_with_numpy_is_not_used(monkeypatch):
    def shifted(values, n):  # a plausible bug: the right numbers, one draw late
        return np.roll(numpy_permutation(values, n), 1)

    fake = types.SimpleNamespace(permutation=shifted, __file__="fake.so")
    monkeypatch.setattr(_compiled, "_load_or_build", lambda folder: fake)
    with pytest.warns(RuntimeWarning, match="differs from numpy"):
        assert _compiled.resolve() is None
    right = types.SimpleNamespace(permutation=numpy_permutation, __file__="right.so")
    monkeypatch.setattr(_compiled, "_load_or_build", lambda folder: right)
    assert _compiled.resolve() is right


def test_a_rank_reads_the_same_batches_with_and_without_the_compiled_helpers(monkeypatch, tmp_path, compiled):
    rng = np.random.default_rng(3)
    paths = [
        write_memmap(
            tmp_path / f"{name}.bin",
            [rng.integers(0, 250, int(n)) for n in rng.choice([0, 1, 5, 40, 90], size=300)],
            vocab_size=258,
        )
        for name in "ab"
    ]

    def batches():
        domains = [Domain(name, path) for name, path in zip("ab", paths)]
        options = {"batch_size": 2, "seq_len": 16, "seed": 1, "num_workers": 0, "block_docs": 16}
        loader = MixtureLoader(domains, **options, shuffle_window=64, rank=5, world_size=32)
        return [loader.next_batch() for _ in range(40)]

    library = _compiled.module()
    calls = []

    def counted(name):
        def call(*args):
            calls.append(name)
            return getattr(library, name)(*args)

        return call

    spy = types.SimpleNamespace(
        **{name: counted(name) for name in ("permutation", "window_pieces", "gather_ranges")}
    )
    monkeypatch.setattr(_compiled, "_module", spy)
    compiled_batches = batches()
    # The rank's sparse reads were cut and gathered by the compiled code.
    assert calls.count("window_pieces") >= 40 and calls.count("gather_ranges") >= 40
    monkeypatch.setattr(_compiled, "_module", None)  # forced fallback: numpy permutations, Python cutting
    for got, want in zip(compiled_batches, batches(), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)


@pytest.mark.parametrize("dtype", WRITE_DTYPES)
def test_memmap_token_ranges_are_the_same_with_and_without_the_compiled_helpers(monkeypatch, tmp_path, dtype):
    rng = np.random.default_rng(len(dtype))
    documents = [rng.integers(0, 250, int(n)) for n in rng.choice([0, 1, 7, 60], size=50)]
    domain = Domain("m", write_memmap(tmp_path / "m.bin", documents, dtype=dtype, vocab_size=258))
    library = _compiled.module()
    assert library is not None
    for count in (0, 1, 5, 40, 100):
        docs = rng.integers(0, len(documents), size=count)
        lows = np.array([rng.integers(0, len(documents[doc]) + 1) for doc in docs], dtype=np.int64)
        highs = np.array([rng.integers(low, len(documents[doc]) + 1) for doc, low in zip(docs, lows)])
        expected = [documents[doc][low:high] for doc, low, high in zip(docs, lows, highs)]
        compiled = domain.read_doc_ranges(docs, lows, highs)
        with monkeypatch.context() as patch:
            patch.setattr(_compiled, "_module", None)
            fallback = domain.read_doc_ranges(docs, lows, highs)
        assert compiled.dtype == fallback.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(compiled, fallback)
        np.testing.assert_array_equal(compiled, np.concatenate([np.zeros(0, np.int64), *expected]))
    # A range past its document's end: the compiled code declines and the Python path names it.
    assert library.gather_ranges(domain.source._tokens, domain.source._offsets, [0], [0], [10**6]) is None
    with pytest.raises(IndexError, match="outside document 0"):
        domain.read_doc_ranges([0], [0], [10**6])
