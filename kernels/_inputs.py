"""Checks and normalises kernel inputs, so every backend accepts and rejects the same things.

Rules shared by ``project_grads`` and ``segment_target_scores`` and all their backends (``torch``, ``triton``,
``cpu``, ``cuda``):

- ``x`` [N, d_in] and ``g`` [N, d_out], or [B, T, d_in] and [B, T, d_out]; same floating dtype (float32,
  bfloat16 or float16); any strides. [B, T, d] is flattened to [B * T, d] with ``reshape``, which is a view
  whenever the strides allow it and a copy only otherwise.
- ``p_in`` [d_in, k_in] and ``p_out`` [d_out, k_out] of any floating dtype; they are **cast to x's dtype**, so
  a bf16 kernel multiplies bf16 by bf16 with fp32 accumulation (the tensor-core path on GPUs).
- ``segment_ids`` int32/int64 with x's leading shape; -1 marks an ignored token. ``None`` means one segment
  per example b for 3-D inputs (``num_segments`` defaults to B) and one segment for all tokens for 2-D inputs.
  ``num_segments=None`` means ``max id + 1`` (0 when every token is ignored).
- ``q`` [n_targets, k_out, k_in] of any floating dtype, cast to float32 (the scores are fp32 dot products of
  fp32 projected activations and gradients).
- Every tensor lives on one device.

Segment ids are range-checked on the host, which costs one device synchronisation per call; the same read
tells the Triton launcher whether the ids are sorted (see ``KernelInputs.segments_sorted``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from tikmix_loader.errors import KernelInputError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class KernelInputs:
    """Validated, flattened kernel inputs.

    Attributes:
        x: [N, d_in] activations, float32/bfloat16/float16, any strides.
        g: [N, d_out] output gradients, same dtype as ``x``.
        p_in: [d_in, k_in] input projection in ``x.dtype``.
        p_out: [d_out, k_out] output projection in ``x.dtype``.
        segment_ids: [N] int64 contiguous segment ids; -1 marks an ignored token.
        num_segments: number of output segments S.
        segments_sorted: True when the non-ignored ids never decrease along the tokens (ignored tokens may sit
            anywhere), so every block of consecutive tokens touches a narrow range of segments.
        q: [n_targets, k_out, k_in] float32 target matrices, or None for ``project_grads``.
    """

    x: torch.Tensor
    g: torch.Tensor
    p_in: torch.Tensor
    p_out: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: int
    segments_sorted: bool
    q: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """Number of tokens N (ignored ones included)."""
        return self.x.shape[0]

    @property
    def k_in(self) -> int:
        """Projected input width."""
        return self.p_in.shape[1]

    @property
    def k_out(self) -> int:
        """Projected output width."""
        return self.p_out.shape[1]

    @property
    def device(self) -> torch.device:
        """The one device every tensor lives on."""
        return self.x.device


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _require_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(f"{op}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(op: str, name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
        raise KernelInputError(
            f"{op}: `{name}` has dtype {tensor.dtype} (shape {_shape(tensor)}); expected one of {names}"
        )


def _check_activations(op: str, x: torch.Tensor, g: torch.Tensor) -> None:
    _require_float(op, "x", x, FLOAT_DTYPES)
    _require_float(op, "g", g, FLOAT_DTYPES)
    if x.dtype != g.dtype:
        raise KernelInputError(
            f"{op}: `x` is {x.dtype} (shape {_shape(x)}) but `g` is {g.dtype} (shape {_shape(g)}); "
            "cast both to one dtype"
        )
    if x.dim() not in (2, 3) or g.dim() != x.dim() or x.shape[:-1] != g.shape[:-1]:
        raise KernelInputError(
            f"{op}: `x` has shape {_shape(x)} and `g` has shape {_shape(g)}; expected [N, d_in] and "
            "[N, d_out] or [B, T, d_in] and [B, T, d_out] with the same leading dims"
        )


def _check_projection(op: str, name: str, p: torch.Tensor, d: int, d_name: str) -> None:
    _require_float(op, name, p, (*FLOAT_DTYPES, torch.float64))
    if p.dim() != 2 or p.shape[0] != d or p.shape[1] < 1:
        raise KernelInputError(
            f"{op}: `{name}` has shape {_shape(p)}; expected [{d_name}={d}, k] with k >= 1"
        )


def _check_devices(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    device = tensors["x"].device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise KernelInputError(
                f"{op}: `{name}` (shape {_shape(tensor)}) is on {tensor.device} but `x` is on {device}; "
                "move every input to one device"
            )


def _segment_ids(op: str, x: torch.Tensor, segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Return int64 [N] ids and the default segment count for ``num_segments=None`` (-1: from the max id)."""
    leading = x.shape[:-1]
    if segment_ids is None:
        if x.dim() == 3:
            batch, seq = leading
            ids = torch.arange(batch, device=x.device, dtype=torch.int64).repeat_interleave(seq)
            return ids, batch
        return torch.zeros(leading[0], device=x.device, dtype=torch.int64), 1
    if segment_ids.dtype not in INDEX_DTYPES:
        raise KernelInputError(
            f"{op}: `segment_ids` has dtype {segment_ids.dtype} (shape {_shape(segment_ids)}); expected an "
            "integer tensor (int32 or int64) with -1 for ignored tokens"
        )
    if segment_ids.shape != leading:
        raise KernelInputError(
            f"{op}: `segment_ids` has shape {_shape(segment_ids)} but `x` has shape {_shape(x)}; expected "
            f"{tuple(leading)} (one id per token)"
        )
    return segment_ids.reshape(-1).to(torch.int64).contiguous(), -1


def _check_num_segments(op: str, num_segments: object) -> int | None:
    if num_segments is None:
        return None
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral) or num_segments < 0:
        raise KernelInputError(
            f"{op}: `num_segments` must be a non-negative int or None, got {num_segments!r}"
        )
    return int(num_segments)


def _range_and_order(ids: torch.Tensor) -> tuple[int, int, bool]:
    """Min id, max id, and whether the non-ignored ids never decrease, from one host read."""
    if ids.numel() == 0:
        return -1, -1, True
    low, high = torch.aminmax(ids)
    # Ignored tokens take the running max, so they never break the order of the ones around them.
    filled = torch.cummax(ids, dim=0).values
    in_order = torch.all((ids < 0) | (ids == filled))
    low, high, in_order = torch.stack([low, high, in_order.to(torch.int64)]).tolist()
    return low, high, bool(in_order)


def check_inputs(
    op: str,
    x: torch.Tensor,
    g: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    q: torch.Tensor | None = None,
) -> KernelInputs:
    """Validate and flatten kernel inputs; see the module docstring for the rules.

    Args:
        op (str): name of the public function, used in error messages.
        x (Tensor): [N, d_in] or [B, T, d_in] activations.
        g (Tensor): [N, d_out] or [B, T, d_out] output gradients.
        p_in (Tensor): [d_in, k_in] projection.
        p_out (Tensor): [d_out, k_out] projection.
        segment_ids (Tensor | None): int32/int64 ids shaped like x's leading dims. Default None.
        num_segments (int | None): segment count, or None for ``max id + 1``. Default None.
        q (Tensor | None): [n_targets, k_out, k_in] target matrices for scores. Default None.

    Returns:
        KernelInputs: the normalised inputs.

    Raises:
        KernelInputError: a dtype, shape, device, or segment id is wrong; the message names the argument and
            the shapes.
    """
    tensors = {"x": x, "g": g, "p_in": p_in, "p_out": p_out, "segment_ids": segment_ids, "q": q}
    for name, value in tensors.items():
        if value is not None or name in ("x", "g", "p_in", "p_out"):
            _require_tensor(op, name, value)
    _check_activations(op, x, g)
    _check_projection(op, "p_in", p_in, x.shape[-1], "d_in")
    _check_projection(op, "p_out", p_out, g.shape[-1], "d_out")
    if q is not None:
        _require_float(op, "q", q, (*FLOAT_DTYPES, torch.float64))
        expected = (p_out.shape[1], p_in.shape[1])
        if q.dim() != 3 or tuple(q.shape[1:]) != expected:
            raise KernelInputError(
                f"{op}: `q` has shape {_shape(q)}; expected "
                f"[n_targets, k_out={expected[0]}, k_in={expected[1]}]"
            )
    _check_devices(op, tensors)
    num_segments = _check_num_segments(op, num_segments)

    ids, default_segments = _segment_ids(op, x, segment_ids)
    if segment_ids is None:
        low, high, in_order = (0, default_segments - 1, True) if ids.numel() else (-1, -1, True)
    else:
        low, high, in_order = _range_and_order(ids)
    if num_segments is None:
        num_segments = default_segments if default_segments >= 0 else high + 1
    if low < -1 or high >= num_segments:
        shape = _shape(segment_ids if segment_ids is not None else ids)
        raise KernelInputError(
            f"{op}: `segment_ids` (shape {shape}) holds ids in [{low}, {high}] but they must lie in "
            f"[-1, {num_segments - 1}] (num_segments={num_segments}); use -1 for ignored tokens or raise "
            "num_segments"
        )

    d_in, d_out = x.shape[-1], g.shape[-1]
    return KernelInputs(
        x=x.reshape(-1, d_in),
        g=g.reshape(-1, d_out),
        p_in=p_in.to(x.dtype),
        p_out=p_out.to(x.dtype),
        segment_ids=ids,
        num_segments=num_segments,
        segments_sorted=in_order,
        q=None if q is None else q.to(torch.float32),
    )
