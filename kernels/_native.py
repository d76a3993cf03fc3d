"""Builds on first use, loads and reports on the native ``tikmix::`` ops (C++/OpenMP on the CPU, and CUDA).

The ops are defined once in C++ (``csrc/project_grads/schema.cpp``) and compiled just-in-time by
``torch.utils.cpp_extension.load`` (``tikmix_loader._jit_build``) into a cache folder named
``torch-<torch version>-<hash>``, where the hash covers the ops' sources (``csrc/project_grads``), the build
flags and the Python ABI. The folder sits under ``$TIKMIX_EXTENSIONS_DIR``, or
``~/.cache/tikmix/extensions`` when that is unset. The project runs in two environments with different torch
versions (``.venv`` and ``.venv-composer``) from one source tree, and each must load only its own build.

Sources are ``<repo>/csrc`` for an editable install and ``tikmix_kernels/csrc`` for a wheel (``setup.py``
copies them there). Two shared libraries are built: ``tikmix_cpu_ops`` (the schemas and the CPU kernels,
always) and ``tikmix_cuda_ops`` (the CUDA kernels, only when ``torch.cuda.is_available()``, in a subfolder
named for the GPU architectures it targets).

The CPU op reads ``TIKMIX_CPU_KERNELS`` on every call. ``auto`` (the default) uses register-tiled AVX-512
kernels on x86-64 Linux CPUs that have AVX-512. ``portable`` uses BLAS (``at::mm``) and plain loops. The CUDA
op does not range-check segment ids, because that would synchronise the device; ids outside
``[-1, num_segments)`` count as ignored there. ``tikmix_kernels._inputs`` checks them before either op runs.

The availability checks never raise. If a build fails, for instance because there is no compiler, the ops
are unavailable, ``unavailable_reason`` says why, and the process gets exactly one warning.
``tikmix_kernels.dispatch`` then picks the other backends.

This module also registers the fake (meta) implementations that let ``torch.compile`` trace the ops.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import threading
import warnings
from pathlib import Path

import torch

from tikmix_loader import _jit_build

EXTENSIONS_DIR_ENV = _jit_build.EXTENSIONS_DIR_ENV  # where builds go (the ops' and the data path's)
DEVICE_TYPES = ("cpu", "cuda")

_LIBRARY_NAMES = {"cpu": "tikmix_cpu_ops", "cuda": "tikmix_cuda_ops"}
_SOURCES = {
    "cpu": ("project_grads/schema.cpp", "project_grads/project_grads_cpu.cpp"),
    "cuda": ("project_grads/project_grads_cuda.cu",),
}
# -fopenmp is a compile flag only: the OpenMP pragmas then link against the libgomp that torch already loaded,
# so the ops share torch's thread pool and honour torch.set_num_threads.
_CPU_CFLAGS = ("-O3", "-fopenmp") if sys.platform.startswith("linux") else ("-O3",)
_CUDA_CFLAGS = ("-O3",)

_lock = threading.RLock()  # re-entered when the CUDA build first needs the CPU one
_status: dict[str, str | None] = {}  # device type -> None (loaded) or why not
_warned = False


def csrc_dir() -> Path:
    """The C++/CUDA source folder (``_jit_build.csrc_dir``) that holds the ops' sources."""
    return _jit_build.csrc_dir(_SOURCES["cpu"][0])


def _build_settings_key() -> str:
    # Everything besides the sources, the torch version and the GPU architectures that changes the binary.
    settings = (
        _CPU_CFLAGS,
        _CUDA_CFLAGS,
        sys.implementation.cache_tag,
        platform.machine(),
        os.environ.get("CXX", ""),
    )
    return repr(settings)


def source_hash() -> str:
    """16 hex digits of SHA-256 over the ops' sources (``csrc/project_grads``) and the build settings."""
    return _jit_build.source_hash(csrc_dir() / "project_grads", _build_settings_key())


def extension_dir() -> Path:
    """This environment's build folder, ``<base>/torch-<torch version>-<source_hash()>``.

    ``<base>`` is ``$TIKMIX_EXTENSIONS_DIR``, or ``~/.cache/tikmix/extensions`` when that is unset.
    """
    return _jit_build.extensions_base() / f"torch-{torch.__version__}-{source_hash()}"


def _build_folder(device_type: str) -> Path:
    # The CUDA library holds kernels for the architectures it was built for (TORCH_CUDA_ARCH_LIST, else the
    # visible GPUs), so a home folder shared by machines with different GPUs keeps one build per set.
    name = _LIBRARY_NAMES[device_type]
    if device_type == "cuda":
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST") or "+".join(
            sorted(
                {
                    "sm{}{}".format(*torch.cuda.get_device_capability(i))
                    for i in range(torch.cuda.device_count())
                }
            )
        )
        name += "-" + re.sub(r"[^A-Za-z0-9.+]+", "_", arches)
    return extension_dir() / name


def _build_and_load(device_type: str) -> None:
    name = _LIBRARY_NAMES[device_type]
    build_dir = _build_folder(device_type)
    library = _jit_build.finished_library(build_dir, name)
    if library is not None:
        torch.ops.load_library(str(library))
        return
    root = csrc_dir()
    _jit_build.build(  # cpp_extension.load also loads the library it built
        name,
        [root / source for source in _SOURCES[device_type]],
        build_dir,
        device_type=device_type,
        extra_cflags=list(_CPU_CFLAGS),
        extra_cuda_cflags=list(_CUDA_CFLAGS),
        is_python_module=False,
    )


def _ensure(device_type: str) -> str | None:
    with _lock:
        if device_type not in _status:
            _status[device_type] = _probe(device_type)
        return _status[device_type]


def _probe(device_type: str) -> str | None:
    if device_type not in DEVICE_TYPES:
        return f"there is no native op for device type {device_type!r} (only {', '.join(DEVICE_TYPES)})"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if device_type == "cuda" and _ensure("cpu") is not None:
        return f"the CPU library holding the op schemas is unavailable: {_status['cpu']}"
    try:
        _build_and_load(device_type)
        if device_type == "cpu":
            _register_fakes()
    except Exception as exc:  # any build or load failure means "unavailable", never a crash
        message = " ".join(str(exc).split())
        reason = f"building {_LIBRARY_NAMES[device_type]} failed: {type(exc).__name__}: {message[-1500:]}"
        _warn_once(
            f"tikmix_kernels: the native {device_type} ops are unavailable ({reason}); backend='auto' "
            "uses the other backends (the torch reference on the CPU)."
        )
        return reason
    return None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def available(device_type: str) -> bool:
    """Whether the native ops run tensors of ``device_type`` here; builds and loads them on first call.

    Never raises. The first failure in a process warns once; ``unavailable_reason`` keeps the details.

    Args:
        device_type (str): ``"cpu"`` or ``"cuda"`` (a ``torch.device.type``); anything else is unavailable.

    Returns:
        bool: True once ``torch.ops.tikmix.project_grads`` and ``segment_target_scores`` accept such tensors.
    """
    return _ensure(device_type) is None


def unavailable_reason(device_type: str) -> str:
    """Why the native ops cannot run ``device_type`` tensors here, or ``""`` when they can.

    Builds and loads the ops on first call, like ``available``.

    Args:
        device_type (str): ``"cpu"`` or ``"cuda"``.
    """
    return _ensure(device_type) or ""


_fakes_registered = False


def _register_fakes() -> None:
    # torch.library.register_fake needs the op to exist, so this runs once the CPU library is loaded.
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    torch.library.register_fake("tikmix::project_grads")(_project_grads_fake)
    torch.library.register_fake("tikmix::segment_target_scores")(_segment_target_scores_fake)


def _project_grads_fake(x, g, p_in, p_out, segment_ids, num_segments, return_factors):
    """Output shapes of ``tikmix::project_grads``: Phi [S, k_out, k_in], A [k_in, k_in], B [k_out, k_out]."""
    torch._check(x.dim() == 2 and g.dim() == 2, lambda: f"expected 2-D x and g, got {x.shape}, {g.shape}")
    torch._check(p_in.dim() == 2 and p_out.dim() == 2, lambda: "expected 2-D p_in and p_out")
    k_in, k_out = p_in.shape[1], p_out.shape[1]
    phi = x.new_empty((num_segments, k_out, k_in), dtype=torch.float32)
    if not return_factors:
        return phi, x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
    return (
        phi,
        x.new_empty((k_in, k_in), dtype=torch.float32),
        x.new_empty((k_out, k_out), dtype=torch.float32),
    )


def _segment_target_scores_fake(x, g, p_in, p_out, q, segment_ids, num_segments):
    """Output shape of ``tikmix::segment_target_scores``: scores [S, n_targets] float32."""
    torch._check(q.dim() == 3, lambda: f"expected q to be 3-D [n_targets, k_out, k_in], got {q.shape}")
    return x.new_empty((num_segments, q.shape[0]), dtype=torch.float32)
