"""Shared test setup: Triton's CPU interpreter without a GPU, an isolated cache, the dataset factory."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from testkit.formats import make_domain_files

# Triton runs through its CPU interpreter when there is no GPU. The variable must be set before
# ``triton.jit`` decorates the kernels, i.e. before any test module imports ``tikmix_kernels.triton_ops``;
# this root conftest is imported before every test module. With a GPU the real compiler is kept.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_tikmix_cache(tmp_path_factory, monkeypatch):
    """Point ``TIKMIX_CACHE_DIR`` (document-length cache, decompressed shards) at a fresh folder per test."""
    monkeypatch.setenv("TIKMIX_CACHE_DIR", str(tmp_path_factory.mktemp("tikmix-cache")))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Put torch's intra-op thread count back after each test (``--threads`` and some tests change it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_domain(tmp_path):
    """``make_domain(fmt, docs, name=..., **options)``: ``make_domain_files`` under ``tmp_path``."""
    return functools.partial(make_domain_files, tmp_path)


@pytest.fixture
def run_cli(monkeypatch):
    """``tikmix`` with only the ledger and report commands, so other modules' imports cannot interfere."""
    from tikmix_loader import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("tikmix_loader.ledger", "tikmix_loader.report"))
    return cli.main
