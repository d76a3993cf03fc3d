"""The public kernel entry points: validate inputs, pick a backend (``auto`` or by name) and run it.

Backends:

- ``torch``: the plain-PyTorch reference (``tikmix_kernels.reference``). Always available.
- ``triton``: the Triton kernels (``tikmix_kernels.triton_ops``). CUDA tensors, or CPU tensors when the
  process started with ``TRITON_INTERPRET=1`` (the interpreter: for tests only, never ``auto``'s choice).
- ``cpu`` / ``cuda``: the native C++/OpenMP and CUDA ops (``torch.ops.tikmix``), built just-in-time on first
  use by ``tikmix_kernels._native``. Unavailable when that build fails (e.g. no compiler), which
  ``tikmix_kernels._native`` reports once as a warning.

``backend="auto"`` takes the first available of ``AUTO_ORDER[device.type]``: CUDA tensors -> triton, cuda,
torch; CPU tensors -> cpu, torch; other devices -> torch. An explicitly named backend that cannot run raises
``BackendUnavailableError`` with the reason; nothing silently falls back.
"""

from __future__ import annotations

import torch
from tikmix_kernels import reference
from tikmix_kernels._inputs import KernelInputs, check_inputs

from tikmix_loader.errors import BackendUnavailableError, ConfigError

BACKENDS = ("triton", "cuda", "cpu", "torch")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def _triton_reason(device: torch.device) -> str | None:
    try:
        from tikmix_kernels import triton_ops
    except ImportError as exc:
        return f"triton cannot be imported ({exc}); install triton or use backend='torch'"
    if triton_ops.runs_on(device):
        return None
    if device.type == "cpu":
        return (
            "the Triton kernels run on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before triton "
            "is imported (the slow interpreter, meant for tests)"
        )
    if device.type == "cuda":
        return "torch.cuda.is_available() is False in this process"
    return f"the Triton kernels run on CUDA tensors, not {device.type}"


def _native_reason(backend: str, device: torch.device) -> str | None:
    if device.type != backend:
        return f"backend '{backend}' runs {backend.upper()} tensors but the inputs are on {device}"
    try:
        from tikmix_kernels import _native
    except ImportError as exc:
        return f"the native-op loader tikmix_kernels._native cannot be imported ({exc})"
    if _native.available(device.type):
        return None
    return _native.unavailable_reason(device.type)


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(
            f"unknown kernel backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}"
        )


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run tensors on ``device``, or None when it can.

    Args:
        backend (str): one of ``BACKENDS``.
        device (torch.device | str): where the inputs live.

    Raises:
        ConfigError: ``backend`` is not a known backend name.
    """
    _check_backend_name(backend)
    device = _as_device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device)
    return _native_reason(backend, device)


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run tensors on ``device``: ``auto``'s order first, then any other usable one.

    Args:
        device (torch.device | str): e.g. ``"cpu"`` or ``torch.device("cuda", 0)``.

    Returns:
        list[str]: e.g. ``["cpu", "torch"]`` on a CPU with the native op built.
    """
    device = _as_device(device)
    ordered = [*AUTO_ORDER.get(device.type, ("torch",)), *BACKENDS]
    names = list(dict.fromkeys(ordered))
    return [name for name in names if unavailable_reason(name, device) is None]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend a call with ``backend`` runs on for ``device`` (``auto`` resolved).

    Raises:
        ConfigError: unknown backend name.
        BackendUnavailableError: an explicitly named backend cannot run here; the message says why.
    """
    _check_backend_name(backend)
    device = _as_device(device)
    if backend == "auto":
        # Every order ends with the always-available torch backend.
        order = AUTO_ORDER.get(device.type, ("torch",))
        return next(name for name in order if unavailable_reason(name, device) is None)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"kernel backend {backend!r} is unavailable for {device} tensors: {reason}"
        )
    return backend


def _run_project_grads(
    name: str, inputs: KernelInputs, return_factors: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if name == "torch":
        return reference.project_grads_torch(inputs, return_factors=return_factors)
    if name == "triton":
        from tikmix_kernels import triton_ops

        return triton_ops.project_grads_triton(inputs, return_factors=return_factors)
    phi, a, b = torch.ops.tikmix.project_grads(
        inputs.x, inputs.g, inputs.p_in, inputs.p_out, inputs.segment_ids, inputs.num_segments, return_factors
    )
    return (phi, a, b) if return_factors else (phi, None, None)


def _run_segment_target_scores(name: str, inputs: KernelInputs) -> torch.Tensor:
    if name == "torch":
        return reference.segment_target_scores_torch(inputs)
    if name == "triton":
        from tikmix_kernels import triton_ops

        return triton_ops.segment_target_scores_triton(inputs)
    return torch.ops.tikmix.segment_target_scores(
        inputs.x,
        inputs.g,
        inputs.p_in,
        inputs.p_out,
        inputs.q.contiguous(),
        inputs.segment_ids,
        inputs.num_segments,
    )


def _nothing_to_reduce(inputs: KernelInputs) -> bool:
    # No tokens, or no segments (then every id is -1): the outputs are zeros and no kernel is launched.
    return inputs.n_tokens == 0 or inputs.num_segments == 0


def project_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    *,
    return_factors: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment Kronecker-projected weight gradients of one Linear layer, in one pass over x and g.

    ``out[s] = sum_{t : segment_ids[t] = s} (g[t] @ p_out)^T (x[t] @ p_in)``, i.e. ``p_out^T W_s p_in`` for
    the segment's weight gradient ``W_s = sum_t g[t] x[t]^T`` (docs/methods.md §2), without materialising
    ``W_s``.

    Args:
        x (Tensor): [N, d_in] or [B, T, d_in] layer inputs; float32, bfloat16 or float16; any strides.
        g (Tensor): [N, d_out] or [B, T, d_out] gradients of the layer outputs; same dtype as ``x``.
        p_in (Tensor): [d_in, k_in] projection, cast to ``x.dtype`` (see ``projection``).
        p_out (Tensor): [d_out, k_out] projection, cast to ``x.dtype``.
        segment_ids (Tensor | None): int32/int64 [N] or [B, T]; -1 ignores a token. None means one segment per
            example b for 3-D inputs and one segment for all tokens for 2-D inputs. Default None.
        num_segments (int | None): S; None means ``max id + 1`` (B for 3-D inputs without ids). Default None.
        return_factors (bool): also return the curvature factors ``A = sum x~ x~^T`` [k_in, k_in] and
            ``B = sum g~ g~^T`` [k_out, k_out] over non-ignored tokens, accumulated in the same pass.
            Default False.
        backend (str): ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (see module docstring).
            Default ``"auto"``.

    Returns:
        Tensor | tuple: Phi [S, k_out, k_in] float32, or (Phi, A, B) when ``return_factors``. Accumulation is
        fp32; results agree across backends, tilings and call splits to fp32 rounding noise.

    Raises:
        KernelInputError: bad dtype, shape, device or segment ids (the message names the argument and shapes).
        BackendUnavailableError: ``backend`` was named explicitly and cannot run here.
        ConfigError: unknown backend name.
    """
    inputs = check_inputs("project_grads", x, g, p_in, p_out, segment_ids, num_segments)
    name = resolve_backend(backend, inputs.device)
    if _nothing_to_reduce(inputs):
        phi, a, b = reference.project_grads_torch(inputs, return_factors=return_factors)
    else:
        phi, a, b = _run_project_grads(name, inputs, return_factors)
    return (phi, a, b) if return_factors else phi


def segment_target_scores(
    x: torch.Tensor,
    g: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    q: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-segment scores against target matrices without any per-segment [k_out, k_in] matrix.

    ``score[s, b] = sum_{t : segment_ids[t] = s} (g[t] @ p_out) . (q[b] @ (x[t] @ p_in))``, which equals
    ``<q[b], project_grads(...)[s]>`` (Frobenius); with ``q[b] = H^-1 psi_b`` it is the per-segment influence
    on target b (docs/methods.md §3, §8).

    Args:
        x, g, p_in, p_out, segment_ids, num_segments: as for ``project_grads``.
        q (Tensor): [n_targets, k_out, k_in] target matrices, cast to float32.
        backend (str): as for ``project_grads``. Default ``"auto"``.

    Returns:
        Tensor: [S, n_targets] float32 scores.

    Raises:
        KernelInputError: bad dtype, shape, device or segment ids.
        BackendUnavailableError: ``backend`` was named explicitly and cannot run here.
        ConfigError: unknown backend name.
    """
    inputs = check_inputs("segment_target_scores", x, g, p_in, p_out, segment_ids, num_segments, q)
    name = resolve_backend(backend, inputs.device)
    if _nothing_to_reduce(inputs):
        return reference.segment_target_scores_torch(inputs)
    return _run_segment_target_scores(name, inputs)
