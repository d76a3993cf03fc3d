"""Composer tests run in the Composer environment (``make test-composer``); elsewhere not collected.

The Composer environment installs only ``.[dev,composer]`` (Composer pins an older torch), so it does not
collect the Lightning tests, which need the ``lightning`` extra of the main environment. The main
environment always has that extra (``requirements/main.txt``), so nothing is skipped there.
"""

import importlib.util

_IN_COMPOSER_ENV = importlib.util.find_spec("composer") is not None
collect_ignore_glob = ["test_lightning*.py"] if _IN_COMPOSER_ENV else ["test_composer*.py"]
