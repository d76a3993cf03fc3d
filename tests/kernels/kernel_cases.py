"""Shared pieces of the kernel tests: which (device, backend) pairs to run, and random inputs for them."""

from __future__ import annotations

import pytest
import torch
from tikmix_kernels import available_backends, projection

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = available_backends("cpu")
# Every GPU backend is expected on a GPU machine: a missing one fails there instead of shrinking the list.
GPU_BACKENDS = ("triton", "cuda", "torch")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def device_backend_params() -> list:
    """(device, backend) pairs: each CPU backend available here, plus GPU twins that skip without CUDA."""
    return [pytest.param("cpu", name, id=f"cpu-{name}") for name in CPU_BACKENDS] + [
        pytest.param("cuda", name, id=f"cuda-{name}", marks=GPU) for name in GPU_BACKENDS
    ]


def random_case(
    *,
    n: int,
    d_in: int,
    d_out: int,
    k_in: int,
    k_out: int,
    num_segments: int,
    ignored: float = 0.2,
    sort: bool = False,
    seed: int = 0,
) -> dict:
    """fp32 CPU inputs: x [n, d_in], g [n, d_out], projections, and int64 ids with about ``ignored`` at -1."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(num_segments, 1), (n,), generator=generator)
    ids[torch.rand(n, generator=generator) < ignored] = -1
    if num_segments == 0:
        ids.fill_(-1)
    if sort:
        ids = ids.sort().values
    return {
        "x": torch.randn(n, d_in, generator=generator),
        "g": torch.randn(n, d_out, generator=generator),
        "p_in": projection(d_in, k_in, seed=seed, name="case/in"),
        "p_out": projection(d_out, k_out, seed=seed, name="case/out"),
        "segment_ids": ids,
        "num_segments": num_segments,
    }


def to_device(case: dict, device: str, dtype: torch.dtype = torch.float32) -> dict:
    """``case`` with x and g cast to ``dtype`` and every tensor moved to ``device``."""
    moved = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in case.items()
    }
    moved["x"] = moved["x"].to(dtype)
    moved["g"] = moved["g"].to(dtype)
    return moved
