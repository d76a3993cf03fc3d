"""Check that the running environment was installed from a lock file: every installed distribution is
pinned there, at the pinned version.

The lock files in this folder are pip constraints (``pip install -c``), so a platform that needs fewer
packages (no CUDA wheels on macOS) installs a subset; what may never happen is a package that the lock does
not pin, or pins at another version, which means ``pyproject.toml`` gained a dependency without ``make lock``.

Usage: ``python requirements/check_lock.py requirements/main.txt``
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata

PROJECT = "tikmix-loader"


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as lock:
        for number, line in enumerate(lock, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep:
                sys.exit(
                    f"{path}:{number}: expected NAME==VERSION, got {line!r}; regenerate with `make lock`."
                )
            pins[normalize(name)] = version.strip()
    return pins


def main(path: str) -> int:
    pins = read_lock(path)
    problems = []
    # Only what pip installed into this environment: importing setuptools puts its vendored packages on
    # sys.path, and their metadata is not part of the environment.
    site_dirs = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    for dist in metadata.distributions(path=site_dirs):
        name, version = normalize(dist.metadata["Name"]), dist.version
        if name == PROJECT:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not pinned")
        elif pins[name] != version:
            problems.append(f"{name}=={version} is installed but {path} pins {pins[name]}")
    if problems:
        print(f"The environment does not match {path}:", *problems, sep="\n  ", file=sys.stderr)
        print("Run `make lock` after changing dependencies in pyproject.toml, then rebuild.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
