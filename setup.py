"""Packaging: maps ``kernels/`` to the ``tikmix_kernels`` package and ships ``csrc/`` inside it.

The native ops in ``csrc/`` are compiled on first use by ``torch.utils.cpp_extension.load`` into a cache
keyed by the torch version and a hash of the sources (see ``tikmix_kernels/_native.py``). We build them
just-in-time rather than here because the project is installed into two environments with different torch
versions (the main one and the Composer one, which pins torch<2.7.1) from the same source tree, and a
prebuilt in-place extension would be overwritten by whichever environment built last.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithCsrc(build_py):
    """Copy ``csrc/`` into ``tikmix_kernels/csrc`` of non-editable builds so the JIT build finds it."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "tikmix_kernels" / "csrc"
        for source in (ROOT / "csrc").rglob("*"):
            if source.is_file() and source.suffix in {".cpp", ".cu", ".cuh", ".h"}:
                destination = target / source.relative_to(ROOT / "csrc")
                destination.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(source), str(destination))


setup(
    packages=find_packages(include=["tikmix_loader", "tikmix_loader.*"]) + ["tikmix_kernels"],
    package_dir={"tikmix_kernels": "kernels"},
    cmdclass={"build_py": BuildPyWithCsrc},
)
