"""Builds, loads and checks the compiled keyed permutation; says ``None`` (use numpy) whenever it cannot.

The compiled ``permutation(values, n)`` (``csrc/keyed_permutation/keyed_permutation.cpp``) returns
``np.random.Generator(np.random.PCG64(np.random.SeedSequence(values))).permutation(n)`` bit for bit, in about
1.5 us instead of numpy's 15 us, most of which is SeedSequence's Python-level seeding (see the C++ file for
why we hand-write what numpy does). ``tikmix_loader.data.shuffle.keyed_permutation`` is its only caller.

Build: on first use in a process, ``torch.utils.cpp_extension.load`` compiles it as a plain pybind11 module
(about 10 s, once per machine) into ``<base>/keyed_permutation-<hash>``, where ``<base>`` is
``$TIKMIX_EXTENSIONS_DIR`` or ``~/.cache/tikmix/extensions`` (as for the native ops) and the hash covers the
source, the build flags and the Python ABI. Concurrent builds wait on cpp_extension's lock. Later processes
load the finished library directly: it is linked so that it needs only the C++ runtime, not torch.

Check and fallback: the first permutation the library computes in a process is compared with numpy's; on
a mismatch (a numpy that changed its algorithm, say) a warning says so and numpy computes every
permutation, so the stream is always numpy's. If there is no compiler, the build fails or the library does
not load, one log line says why and numpy is used as well.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MODULE_NAME = "tikmix_keyed_permutation"
MAX_LENGTH = 2**32  # the compiled code refuses longer permutations (their draws would need 64 bits)
_SOURCE = Path("keyed_permutation") / "keyed_permutation.cpp"
_CFLAGS = ("-O3",)
# cpp_extension always links torch's libraries, and two of them re-export C++ runtime symbols. Asking for the
# C++ runtime first, with --as-needed, keeps torch out of the library's dependencies, so loading it in a
# process that never imported torch works.
_LDFLAGS = ("-Wl,--as-needed", "-lstdc++")
_BUILT_MARKER = ".built"
# The first-use check: a multi-word key (values past 2**32 and 2**63, a zero) and a length whose draws
# cross every mask width up to 2**10, and the 32-bit halves' buffering many times over.
_CHECK_VALUES = [20260101, 2**63 + 12345, 2**32, 0, 7]
_CHECK_LENGTH = 1000

Permutation = Callable[[list, int], np.ndarray]
_lock = threading.Lock()
_resolved = False
_permutation: Permutation | None = None


def compiled_permutation() -> Permutation | None:
    """The checked compiled ``permutation(values, n)``, or None when numpy must be used; resolved once per
    process (built or loaded on the first call)."""
    global _resolved, _permutation
    if not _resolved:
        with _lock:
            if not _resolved:
                _permutation = resolve()
                _resolved = True
    return _permutation


def resolve() -> Permutation | None:
    """Load (building if needed) and check the compiled permutation; None, after one log line or warning,
    when it is unavailable or disagrees with numpy."""
    expected = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_CHECK_VALUES))).permutation(
        _CHECK_LENGTH
    )
    try:
        module = _load_or_build(build_dir())
        actual = module.permutation(_CHECK_VALUES, _CHECK_LENGTH)
    except Exception as exc:  # any build, load or call failure means "use numpy", never a crash
        message = " ".join(str(exc).split())[-1000:]
        logger.warning(
            "the compiled keyed permutation is unavailable (%s: %s); numpy computes the shuffles "
            "(the same stream, about 10x slower to seed)",
            type(exc).__name__,
            message,
        )
        return None
    if actual.dtype != expected.dtype or not np.array_equal(actual, expected):
        warnings.warn(
            f"the compiled keyed permutation ({module.__file__}) differs from numpy {np.__version__}'s "
            "Generator(PCG64(SeedSequence(keys))).permutation; numpy computes the shuffles from now on. "
            "If numpy changed its algorithm, the stream differs from the one earlier numpy versions made.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return module.permutation


def csrc_dir() -> Path:
    """The C++ source folder: ``<repo>/csrc`` (a source tree) or ``tikmix_kernels/csrc`` (a wheel).

    ``tikmix_kernels._native.csrc_dir`` says the same but imports torch, which loading does not need.
    """
    source_tree = Path(__file__).resolve().parents[2] / "csrc"
    spec = importlib.util.find_spec("tikmix_kernels")  # finds the package without importing it
    wheel = [Path(folder) / "csrc" for folder in (spec.submodule_search_locations or [])] if spec else []
    for candidate in (source_tree, *wheel):
        if (candidate / _SOURCE).is_file():
            return candidate
    return source_tree


def build_dir() -> Path:
    """``<base>/keyed_permutation-<16 hex digits of SHA-256 over the source and the build settings>``."""
    source = csrc_dir() / _SOURCE
    settings = (
        _CFLAGS,
        _LDFLAGS,
        sys.implementation.cache_tag,
        platform.machine(),
        os.environ.get("CXX", ""),
    )
    digest = hashlib.sha256(repr(settings).encode() + b"\0" + source.read_bytes()).hexdigest()[:16]
    base = os.environ.get("TIKMIX_EXTENSIONS_DIR") or Path.home() / ".cache" / "tikmix" / "extensions"
    return Path(base).expanduser() / f"keyed_permutation-{digest}"


def _load_or_build(folder: Path):
    library = folder / f"{MODULE_NAME}.so"
    marker = folder / _BUILT_MARKER
    if marker.is_file() and library.is_file():
        return _import(library)
    logger.info("building the compiled keyed permutation into %s (once per machine)", folder)
    # Imported only to build: cpp_extension and the native ops' tool checks import torch.
    from tikmix_kernels import _native
    from torch.utils import cpp_extension

    missing = _native._missing_tool("cpu")
    if missing is not None:
        raise RuntimeError(missing)
    folder.mkdir(parents=True, exist_ok=True)
    with _native._ninja_on_path():
        module = cpp_extension.load(
            name=MODULE_NAME,
            sources=[str(csrc_dir() / _SOURCE)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(folder),
            is_python_module=True,
            verbose=False,
        )
    temporary = marker.with_suffix(f".{os.getpid()}")
    temporary.write_text(f"{library}\n")
    temporary.replace(marker)
    return module


def _import(library: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(library))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
