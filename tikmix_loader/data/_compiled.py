"""Builds, loads and checks the data path's compiled helpers; says ``None`` (use numpy) whenever it cannot.

The helpers (``csrc/data_path/``, one pybind11 module) are:

- ``permutation(values, n)``: ``np.random.Generator(np.random.PCG64(np.random.SeedSequence(values)))
  .permutation(n)`` bit for bit, in 1-2 us instead of numpy's 15 us, most of which is SeedSequence's
  Python-level seeding (``keyed_permutation.h`` says why we hand-write what numpy does). Its caller is
  ``tikmix_loader.data.shuffle.keyed_permutation``.
- ``window_pieces(starts, width, first_blocks, block_index)``: ``DomainStream._window_pieces`` for the few
  packed windows of a rank's sparse read, without a Python loop per document piece.
- ``gather_ranges(tokens, offsets, docs, lows, highs)``: a memmap's ``read_doc_ranges`` (the token ranges
  under those pieces), or None when a range is out of bounds (the Python path then names it).

Build: on first use in a process, ``torch.utils.cpp_extension.load`` compiles them as a plain pybind11
module (about 10 s, once per machine and Python version) into ``<base>/data_path-<hash>``, where ``<base>`` is
``$TIKMIX_EXTENSIONS_DIR`` or ``~/.cache/tikmix/extensions`` (as for the native ops) and the hash covers the
sources, the build flags and the Python ABI. Concurrent builds wait on cpp_extension's lock. Later
processes load the finished library directly: it is linked so that it needs only the C++ runtime, not torch.

Check and fallback: the first permutation the library computes in a process is compared with numpy's; on
a mismatch (a numpy that changed its algorithm, say) a warning says so and the library is not used, so the
stream is always numpy's. If there is no compiler, the build fails or the library does not load, one log
line says why. Without the library, numpy computes the permutations and Python cuts the windows
(``DomainStream._window_pieces_scalar``) and reads the ranges (``MemmapSource.read_doc_ranges``): the same
numbers, more slowly.

``TIKMIX_COMPILED_DATA_PATH=0`` in the environment skips the library (numpy and Python do the work, with no
build and no log line). A process that finds the library unavailable sets it, so the processes it starts
later (DataLoader workers under ``spawn`` or ``forkserver``, a launcher's ranks) neither retry the build nor
repeat the log line; forked workers inherit the answer with the rest of the process. ``as_dataloader``
resolves the library before the DataLoader starts its workers.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from tikmix_loader import _jit_build

logger = logging.getLogger(__name__)

MODULE_NAME = "tikmix_data_path"
SWITCH_ENV = "TIKMIX_COMPILED_DATA_PATH"  # "0": numpy and Python only (set after a failure, for children)
MAX_LENGTH = 2**32  # the compiled permutation refuses longer ones (their draws would need 64 bits)
_FOLDER = "data_path"  # under csrc/
_SOURCE = "module.cpp"  # includes the folder's headers
_CFLAGS = ("-O3",)
# cpp_extension always links torch's libraries, and two of them re-export C++ runtime symbols. Asking for the
# C++ runtime first, with --as-needed, keeps torch out of the library's dependencies, so loading it in a
# process that never imported torch works.
_LDFLAGS = ("-Wl,--as-needed", "-lstdc++")
# The first-use check: a multi-word key (values past 2**32 and 2**63, a zero) and a length whose draws
# cross every mask width up to 2**10, and the 32-bit halves' buffering many times over.
_CHECK_VALUES = [20260101, 2**63 + 12345, 2**32, 0, 7]
_CHECK_LENGTH = 1000

_lock = threading.Lock()
_resolved = False
_module: ModuleType | None = None


def module() -> ModuleType | None:
    """The checked compiled helpers (``permutation``, ``window_pieces``, ``gather_ranges``), or None when
    numpy and Python must do their work; resolved once per process (built or loaded on the first call)."""
    global _resolved, _module
    if not _resolved:
        with _lock:
            if not _resolved:
                if os.environ.get(SWITCH_ENV) == "0":
                    logger.debug("%s=0: numpy computes the shuffles and Python cuts the windows", SWITCH_ENV)
                    _module = None
                else:
                    _module = resolve()
                    if _module is None:  # said once: the processes this one starts inherit the answer
                        os.environ[SWITCH_ENV] = "0"
                _resolved = True
    return _module


def resolve() -> ModuleType | None:
    """Load (building if needed) and check the compiled helpers; None, after one log line or warning, when
    they are unavailable or the permutation disagrees with numpy."""
    expected = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_CHECK_VALUES))).permutation(
        _CHECK_LENGTH
    )
    folder = None
    try:
        folder = build_dir()
        library = _load_or_build(folder)
        actual = library.permutation(_CHECK_VALUES, _CHECK_LENGTH)
    except Exception as exc:  # any build, load or call failure means "use numpy", never a crash
        message = " ".join(str(exc).split())[-1000:]
        logger.warning(
            "the compiled data-path helpers are unavailable (%s: %s; build folder %s, set by %s); numpy "
            "computes the shuffles and Python cuts the windows (the same stream, more slowly)",
            type(exc).__name__,
            message,
            folder,
            _jit_build.EXTENSIONS_DIR_ENV,
        )
        return None
    if actual.dtype != expected.dtype or not np.array_equal(actual, expected):
        warnings.warn(
            f"the compiled keyed permutation ({library.__file__}) differs from numpy {np.__version__}'s "
            "Generator(PCG64(SeedSequence(keys))).permutation; numpy computes the shuffles from now on. "
            "If numpy changed its algorithm, the stream differs from the one earlier numpy versions made.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return library


def csrc_dir() -> Path:
    """The C++ source folder (``_jit_build.csrc_dir``) that holds the data-path sources."""
    return _jit_build.csrc_dir(f"{_FOLDER}/{_SOURCE}")


def build_dir() -> Path:
    """``<base>/data_path-<16 hex digits of SHA-256 over the sources and the build settings>``."""
    cxx = os.environ.get("CXX", "")
    settings = (_CFLAGS, _LDFLAGS, sys.implementation.cache_tag, platform.machine(), cxx)
    digest = _jit_build.source_hash(csrc_dir() / _FOLDER, repr(settings))
    return _jit_build.extensions_base() / f"{_FOLDER}-{digest}"


def _load_or_build(folder: Path) -> ModuleType:
    library = _jit_build.finished_library(folder, MODULE_NAME)
    if library is not None:
        return _import(library)
    logger.info("building the compiled data-path helpers into %s (once per machine)", folder)
    return _jit_build.build(
        MODULE_NAME,
        [csrc_dir() / _FOLDER / _SOURCE],
        folder,
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        is_python_module=True,
    )


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    library = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    )
    loader.exec_module(library)
    return library
