"""The public kernel API, re-exported from ``tikmix_kernels``: projected per-segment gradients and scores."""

from tikmix_kernels import available_backends, project_grads, projection, segment_target_scores

__all__ = ["available_backends", "project_grads", "projection", "segment_target_scores"]
