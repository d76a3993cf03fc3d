"""Composer tests run in the Composer environment (``make test-composer``); elsewhere not collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("composer") else ["test_composer*.py"]
