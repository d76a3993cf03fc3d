"""The pinned environment: the locks cover every declared dependency, and the lock check catches drift."""

import importlib.util
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"main": ROOT / "requirements/main.txt", "composer": ROOT / "requirements/composer.txt"}


def _load_check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "requirements/check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _load_check_lock()


def _requirement_name(requirement: str) -> str:
    return check_lock.normalize(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def _extras_of(lock: Path) -> list[str]:
    header = lock.read_text().splitlines()[0]
    return re.search(r"constraints for \.\[([a-z,]+)\]", header).group(1).split(",")


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_each_lock_pins_every_dependency_its_environment_installs(name):
    extras = set(_extras_of(LOCKS[name]))
    declared = set()
    for requirement in metadata.requires("tikmix-loader"):  # pyproject's dependencies, as installed
        extra = re.search(r'extra == "([^"]+)"', requirement)
        if extra is None or extra.group(1) in extras:
            declared.add(_requirement_name(requirement))
    pins = check_lock.read_lock(str(LOCKS[name]))
    missing = sorted(declared - set(pins))
    assert not missing, f"{LOCKS[name].name} lacks {missing}; run `make lock`"


def test_lock_check_names_unpinned_and_mismatched_packages(tmp_path, capsys):
    site_dirs = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    installed = {
        check_lock.normalize(d.metadata["Name"]): d.version for d in metadata.distributions(path=site_dirs)
    }
    installed.pop(check_lock.PROJECT, None)
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\n" + "".join(f"{n}=={v}\n" for n, v in installed.items()))
    assert check_lock.main(str(lock)) == 0
    pins = dict(installed)
    del pins["numpy"]
    pins["pytest"] = "0.0.1"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    assert check_lock.main(str(lock)) == 1
    err = capsys.readouterr().err
    assert f"numpy=={metadata.version('numpy')} is installed but not pinned" in err
    assert "but " + str(lock) + " pins 0.0.1" in err
