"""Kernel-test setup: run Triton through its CPU interpreter when no GPU exists.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates the kernels, i.e. before
``tikmix_kernels.triton_ops`` is first imported; this conftest is imported at collection, before any test
runs a kernel. With a GPU the real compiler is kept, so the GPU twins test compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
