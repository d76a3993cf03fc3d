"""Just-in-time builds of the project's C++ sources: where a build goes, when it is finished, how it is made.

Two parts of the project compile C++ on first use: the native ``tikmix::`` ops (``tikmix_kernels._native``,
sources in ``csrc/project_grads``) and the loader's data-path helpers (``tikmix_loader.data._compiled``,
``csrc/data_path``). Each builds into a folder under ``$TIKMIX_EXTENSIONS_DIR`` (or
``~/.cache/tikmix/extensions`` when that is unset) whose name carries a hash of its own source folder and
its build settings, so editing one part's sources never rebuilds the other.
``torch.utils.cpp_extension.load`` compiles (its file lock makes a second process that builds the same
folder wait, then load), and a marker written after linking tells later processes that the library is
finished, so they load it without ninja or cpp_extension.

Importing this module does not import torch (the data path loads its finished library without torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shlex
import shutil
from pathlib import Path

EXTENSIONS_DIR_ENV = "TIKMIX_EXTENSIONS_DIR"
SOURCE_SUFFIXES = {".cpp", ".cu", ".cuh", ".h"}
_BUILT_MARKER = ".built"  # written after linking: the library next to it is finished


def extensions_base() -> Path:
    """``$TIKMIX_EXTENSIONS_DIR``, or ``~/.cache/tikmix/extensions`` when that is unset or empty."""
    base = os.environ.get(EXTENSIONS_DIR_ENV) or Path.home() / ".cache" / "tikmix" / "extensions"
    return Path(base).expanduser()


def csrc_dir(probe: str) -> Path:
    """The C++ source folder holding ``probe`` (a path relative to it): ``<repo>/csrc`` in a source tree or
    an editable install, ``tikmix_kernels/csrc`` in a wheel (setup.py copies it there). Finds the package
    without importing it, so no torch import."""
    source_tree = Path(__file__).resolve().parents[1] / "csrc"
    spec = importlib.util.find_spec("tikmix_kernels")
    wheel = [Path(folder) / "csrc" for folder in (spec.submodule_search_locations or [])] if spec else []
    for candidate in (source_tree, *wheel):
        if (candidate / probe).is_file():
            return candidate
    return source_tree


def source_hash(folder: Path, settings: str) -> str:
    """16 hex digits of SHA-256 over ``settings`` and every source file under ``folder`` (names and bytes)."""
    digest = hashlib.sha256(settings.encode())
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def finished_library(folder: Path, name: str) -> Path | None:
    """``folder/<name>.so`` when a build there finished linking, else None."""
    library = folder / f"{name}.so"
    return library if (folder / _BUILT_MARKER).is_file() and library.is_file() else None


def missing_tool(device_type: str) -> str | None:
    """Why a ``device_type`` ("cpu", "cuda") build cannot start here (no compiler, ninja or nvcc), or None."""
    from torch.utils import cpp_extension

    compiler = shlex.split(os.environ.get("CXX", "c++") or "c++")[0]
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; set CXX to one)"
    if not cpp_extension.is_ninja_available() and _ninja_package_bin() is None:
        return "the build tool ninja is not installed (pip install ninja)"
    if device_type == "cuda" and cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME to one"
    return None


def build(name: str, sources: list[Path], folder: Path, *, device_type: str = "cpu", **load_options):
    """Compile ``sources`` into ``folder/<name>.so`` with ``cpp_extension.load`` and mark it finished.

    Args:
        name (str): The library's name (the Python module's, with ``is_python_module=True``).
        sources (list[Path]): The files to compile.
        folder (Path): The build folder (created).
        device_type (str): ``"cuda"`` also needs nvcc. Default: ``"cpu"``.
        **load_options: ``extra_cflags``, ``extra_ldflags``, ``is_python_module``, ... for ``load``.

    Returns:
        What ``cpp_extension.load`` returns (the module, or the library's path).

    Raises:
        RuntimeError: a tool is missing (``missing_tool``); or whatever the compiler or the load raises.
    """
    from torch.utils import cpp_extension

    missing = missing_tool(device_type)
    if missing is not None:
        raise RuntimeError(missing)
    folder.mkdir(parents=True, exist_ok=True)
    with _ninja_on_path():
        result = cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            build_directory=str(folder),
            verbose=False,
            **load_options,
        )
    marker = folder / _BUILT_MARKER
    temporary = marker.with_suffix(f".{os.getpid()}")
    temporary.write_text(f"{folder / name}.so\n")
    temporary.replace(marker)
    return result


def _ninja_package_bin() -> str | None:
    # pip's ninja lives in the environment's bin folder, which is not on PATH unless the venv is activated.
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)


@contextlib.contextmanager
def _ninja_on_path():
    from torch.utils import cpp_extension

    extra = None if cpp_extension.is_ninja_available() else _ninja_package_bin()
    if extra is None:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = extra + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved
