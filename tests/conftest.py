"""Fixtures shared by every test: an isolated tikmix cache and the on-disk dataset factory."""

from __future__ import annotations

import functools

import pytest
from testkit.formats import make_domain_files


@pytest.fixture(autouse=True)
def _isolated_tikmix_cache(tmp_path_factory, monkeypatch):
    """Point ``TIKMIX_CACHE_DIR`` (document-length cache, decompressed shards) at a fresh folder per test."""
    monkeypatch.setenv("TIKMIX_CACHE_DIR", str(tmp_path_factory.mktemp("tikmix-cache")))


@pytest.fixture
def make_domain(tmp_path):
    """``make_domain(fmt, docs, name=..., **options)``: ``make_domain_files`` under ``tmp_path``."""
    return functools.partial(make_domain_files, tmp_path)
