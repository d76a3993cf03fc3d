"""Shared test utilities: small on-disk domains and the one resume check every stateful part uses."""
