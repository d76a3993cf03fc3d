"""Deterministic random projection matrices keyed by (seed, layer name, shape, kind).

Each Linear layer gets fixed projections P_in [d_in, k_in] and P_out [d_out, k_out] (docs/methods.md §2). They
must be identical on every rank, device, dtype and batch tiling, so we always draw them on the CPU from a
``torch.Generator`` seeded with a stable hash (BLAKE2b, unlike Python's salted ``hash``) of
``(seed, name, d, k, kind)``, and only then cast and move them. Entries have mean 0 and variance 1/k, so
``E[|v @ P|^2] = |v|^2`` for any row vector v (a Johnson-Lindenstrauss map).
"""

from __future__ import annotations

import hashlib
import math

import torch

from tikmix_loader.errors import ConfigError

KINDS = ("gaussian", "rademacher")


def projection_seed(seed: int, name: str, d: int, k: int, kind: str) -> int:
    """The 63-bit generator seed for one projection: BLAKE2b of the key, stable across processes and hosts."""
    key = f"tikmix-projection|{seed}|{name}|{d}|{k}|{kind}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def projection(
    d: int,
    k: int,
    *,
    seed: int,
    name: str,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A [d, k] random projection with variance 1/k, identical for the same key on every device.

    Args:
        d (int): input width (rows), >= 1.
        k (int): projected width (columns), >= 1.
        seed (int): the run's seed.
        name (str): the layer (and side) this projection belongs to, e.g. ``"blocks.0.mlp.fc1/in"``.
        kind (str): ``"gaussian"`` (N(0, 1/k)) or ``"rademacher"`` (+-1/sqrt(k)). Default ``"gaussian"``.
        dtype (torch.dtype): floating dtype of the result; values are drawn in float32 first. Default float32.
        device (torch.device | str | None): where to put it; None means the CPU. Default None.

    Returns:
        Tensor: [d, k] matrix.

    Raises:
        ConfigError: a non-positive size, a non-string or empty name, an unknown kind or a non-float dtype.
    """
    for arg, value in (("d", d), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"projection: `{arg}` must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"projection: `seed` must be an int, got {seed!r}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"projection: `name` must be a non-empty string naming the layer, got {name!r}")
    if kind not in KINDS:
        raise ConfigError(f"projection: unknown `kind` {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"projection: `dtype` must be a floating torch dtype, got {dtype!r}")
    generator = torch.Generator(device="cpu").manual_seed(projection_seed(seed, name, d, k, kind))
    if kind == "gaussian":
        values = torch.randn(d, k, generator=generator, dtype=torch.float32)
    else:
        values = torch.randint(0, 2, (d, k), generator=generator, dtype=torch.int64).to(torch.float32) * 2 - 1
    return (values / math.sqrt(k)).to(dtype=dtype, device=device)
