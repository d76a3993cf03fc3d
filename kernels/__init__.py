"""tikmix_kernels: fused Kronecker-projected per-segment gradient kernels (Triton, C++/CUDA, torch reference).

Users reach these through ``tikmix_loader.ops``. ``project_grads`` and ``segment_target_scores`` dispatch to a
backend (see ``tikmix_kernels.dispatch``); ``projection`` makes the deterministic projection matrices.
Submodules that import Triton load lazily, so ``TRITON_INTERPRET`` may be set after importing this package.
"""

from tikmix_kernels.dispatch import available_backends, project_grads, segment_target_scores
from tikmix_kernels.projection import projection

__all__ = ["available_backends", "project_grads", "projection", "segment_target_scores"]
assert __all__ == sorted(__all__), "keep __all__ sorted"
