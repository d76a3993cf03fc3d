"""Shared test utilities: small on-disk domains and corpora, tiny HF models, gloo ranks, and the one resume
check every stateful part uses."""
