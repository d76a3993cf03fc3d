"""Architecture rule: the core (data, influence, mixing, quality, controller) never imports demo code (models,
the demo corpus builder, experiment, demo), not even lazily inside a function or through another module."""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tikmix_loader": ROOT / "tikmix_loader", "tikmix_kernels": ROOT / "kernels"}
CORE = (
    "tikmix_loader.controller",
    "tikmix_loader.data",
    "tikmix_loader.influence",
    "tikmix_loader.mixing",
    "tikmix_loader.quality",
)
DEMO = (
    "tikmix_loader.data.corpus",
    "tikmix_loader.data.noise",
    "tikmix_loader.demo",
    "tikmix_loader.experiment",
    "tikmix_loader.models",
)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def find_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of ``packages`` (name -> folder) by dotted name; a package is its ``__init__.py``."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@functools.cache
def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names ``module`` imports anywhere in its file (functions included), relative ones resolved.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); every name brings its parent
    packages, whose ``__init__`` runs on import.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def import_chain(start: str, modules: dict[str, Path], forbidden: tuple[str, ...]) -> list[str] | None:
    """The shortest chain of imports from ``start`` to a module within ``forbidden``, or None."""
    came_from = {start: None}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        if _within(current, forbidden):
            chain = [current]
            while came_from[chain[-1]] is not None:
                chain.append(came_from[chain[-1]])
            return chain[::-1]
        if current not in modules:
            continue  # a third-party or standard-library module
        for name in sorted(imported_names(current, modules[current])):
            if name not in came_from:
                came_from[name] = current
                queue.append(name)
    return None


MODULES = find_modules(PACKAGES)
CORE_MODULES = sorted(name for name in MODULES if _within(name, CORE) and not _within(name, DEMO))


def test_the_core_and_demo_module_lists_match_the_tree():
    assert len(CORE_MODULES) > 30
    for name in (*CORE, *DEMO):
        assert name in MODULES, f"{name} named in this test is not a module of the tree"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_never_imports_demo_code(module):
    chain = import_chain(module, MODULES, DEMO)
    assert chain is None, "core module imports demo code: " + " -> ".join(chain)


def test_a_lazy_relative_import_through_another_module_is_found(tmp_path):
    # The checker itself: a core module importing a helper that imports demo code inside a function.
    package = tmp_path / "pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "tiny.py").write_text("X = 1\n")
    (package / "core.py").write_text("import os\nfrom pkg import helper\n")
    (package / "helper.py").write_text("def build():\n    from .models.tiny import X\n    return X\n")
    modules = find_modules({"pkg": package})
    assert import_chain("pkg.core", modules, ("pkg.models",)) == ["pkg.core", "pkg.helper", "pkg.models"]
    assert import_chain("pkg.helper", modules, ("pkg.other",)) is None
