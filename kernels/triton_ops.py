"""Triton kernels for projected per-segment gradients, curvature factors and target scores, tiled over tokens.

For one Linear layer (docs/methods.md §2; LoGra/LogIX's factored form, fused here into one pass):

    X~ = X @ P_in   [N, k_in]        G~ = G @ P_out   [N, k_out]        (fp32 accumulation)
    Phi[s]       = sum_{t : seg[t] = s} G~[t]^T X~[t]                     [S, k_out, k_in]
    A            = sum_{t : seg[t] >= 0} X~[t]^T X~[t]                    [k_in, k_in]
    B            = sum_{t : seg[t] >= 0} G~[t]^T G~[t]                    [k_out, k_out]
    score[s, b]  = sum_{t : seg[t] = s} G~[t] . (Q[b] @ X~[t])            [S, n_targets]

Each program owns BLOCK_N consecutive tokens (never one example: a segment spans many programs). It computes
its X~ and G~ tiles in registers, looping over d in BLOCK_D chunks, then reduces them into every segment its
tokens touch with one ``tl.dot`` and one block of fp32 atomics per segment. X and G are read exactly once;
nothing of size N x k is written. The launcher sorts tokens by segment first (a permutation the kernel gathers
rows through, not a copy of X or G) when the ids are not already in order, so each block touches one or two
segments. Atomics make the summation order vary between runs: results agree to fp32 rounding noise.

k is padded up to a power of two >= 16 inside the kernel (``tl.dot`` needs >= 16) with masks, so any d, any k
from 1 to ``MAX_K``, N = 1, empty segments and all-ignored batches work. fp32 inputs use IEEE fp32 dots (not
TF32) so fp32 results stay within fp32 noise of an fp64 reference.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from tikmix_kernels._inputs import KernelInputs

from tikmix_loader.errors import KernelInputError

# Largest k_in / k_out the tiles are sized for: [BLOCK_N, 256] fp32 accumulators already fill the registers.
MAX_K = 256


@triton.jit
def _project_rows(
    ptr, stride_n, stride_d, rows, row_mask,
    p_ptr, stride_pd, stride_pk,
    D, K,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Rows of a [*, D] matrix times P [D, K]: [BLOCK_N, BLOCK_K] fp32, zero on masked rows and cols >= K."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        tile = tl.load(
            ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        p = tl.load(
            p_ptr + offs_d[:, None] * stride_pd + offs_k[None, :] * stride_pk,
            mask=d_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if UPCAST:
            tile = tile.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(tile, p, acc, input_precision="ieee")
    return acc


@triton.jit
def _load_tile(
    x_ptr, g_ptr, p_in_ptr, p_out_ptr, seg_ptr, order_ptr,
    N, D_IN, D_OUT, K_IN, K_OUT,
    stride_xn, stride_xd, stride_gn, stride_gd,
    stride_pin_d, stride_pin_k, stride_pout_d, stride_pout_k,
    HAS_ORDER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KI: tl.constexpr, BLOCK_KO: tl.constexpr, UPCAST: tl.constexpr,
):
    """This program's segment ids [BLOCK_N] (-1 past N), X~ [BLOCK_N, BLOCK_KI] and G~ [BLOCK_N, BLOCK_KO]."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = pos < N
    if HAS_ORDER:
        rows = tl.load(order_ptr + pos, mask=in_range, other=0)
    else:
        rows = pos
    seg = tl.load(seg_ptr + rows, mask=in_range, other=-1)
    # Ignored tokens are never read: their rows of X~ and G~ are zero.
    valid = seg >= 0
    x_proj = _project_rows(
        x_ptr, stride_xn, stride_xd, rows, valid, p_in_ptr, stride_pin_d, stride_pin_k, D_IN, K_IN,
        BLOCK_N, BLOCK_D, BLOCK_KI, UPCAST,
    )
    g_proj = _project_rows(
        g_ptr, stride_gn, stride_gd, rows, valid, p_out_ptr, stride_pout_d, stride_pout_k, D_OUT, K_OUT,
        BLOCK_N, BLOCK_D, BLOCK_KO, UPCAST,
    )
    return seg, x_proj, g_proj


@triton.jit
def _segment_range(seg, NUM_SEGMENTS):
    """First and last segment id of this program's tokens; first > last when all are ignored (empty range).

    Sorted ids make [first, last] one or two segments. The ids are int64, so the callers' loop counters and
    output offsets are too.
    """
    first = tl.min(tl.where(seg >= 0, seg, NUM_SEGMENTS))
    last = tl.max(seg)
    return first, last


@triton.jit
def _project_grads_kernel(
    # inputs
    x_ptr, g_ptr, p_in_ptr, p_out_ptr, seg_ptr, order_ptr,
    # outputs (fp32, zero-initialised, accumulated with atomics)
    phi_ptr, a_ptr, b_ptr,
    # sizes
    N, NUM_SEGMENTS, D_IN, D_OUT, K_IN, K_OUT,
    # strides
    stride_xn, stride_xd, stride_gn, stride_gd,
    stride_pin_d, stride_pin_k, stride_pout_d, stride_pout_k,
    # meta-parameters
    HAS_ORDER: tl.constexpr, RETURN_FACTORS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KI: tl.constexpr, BLOCK_KO: tl.constexpr,
):
    """Phi[s] += G~_s^T X~_s for the segments of BLOCK_N tokens; optionally A += X~^T X~ and B += G~^T G~."""
    seg, x_proj, g_proj = _load_tile(
        x_ptr, g_ptr, p_in_ptr, p_out_ptr, seg_ptr, order_ptr,
        N, D_IN, D_OUT, K_IN, K_OUT,
        stride_xn, stride_xd, stride_gn, stride_gd,
        stride_pin_d, stride_pin_k, stride_pout_d, stride_pout_k,
        HAS_ORDER, BLOCK_N, BLOCK_D, BLOCK_KI, BLOCK_KO, UPCAST,
    )
    offs_ki = tl.arange(0, BLOCK_KI)
    offs_ko = tl.arange(0, BLOCK_KO)
    block_offs = offs_ko[:, None] * K_IN + offs_ki[None, :]
    block_mask = (offs_ko[:, None] < K_OUT) & (offs_ki[None, :] < K_IN)
    first, last = _segment_range(seg, NUM_SEGMENTS)
    for s in range(first, last + 1):
        in_segment = seg == s
        if tl.sum(in_segment.to(tl.int32)) > 0:
            g_seg = tl.where(in_segment[:, None], g_proj, 0.0)
            block = tl.dot(tl.trans(g_seg), x_proj, input_precision="ieee")
            tl.atomic_add(
                phi_ptr + s * K_OUT * K_IN + block_offs, block, mask=block_mask, sem="relaxed"
            )
    if RETURN_FACTORS:
        a_block = tl.dot(tl.trans(x_proj), x_proj, input_precision="ieee")
        tl.atomic_add(
            a_ptr + offs_ki[:, None] * K_IN + offs_ki[None, :], a_block,
            mask=(offs_ki[:, None] < K_IN) & (offs_ki[None, :] < K_IN), sem="relaxed",
        )
        b_block = tl.dot(tl.trans(g_proj), g_proj, input_precision="ieee")
        tl.atomic_add(
            b_ptr + offs_ko[:, None] * K_OUT + offs_ko[None, :], b_block,
            mask=(offs_ko[:, None] < K_OUT) & (offs_ko[None, :] < K_OUT), sem="relaxed",
        )


@triton.jit
def _segment_target_scores_kernel(
    # inputs
    x_ptr, g_ptr, p_in_ptr, p_out_ptr, q_ptr, seg_ptr, order_ptr,
    # output (fp32, zero-initialised, accumulated with atomics)
    scores_ptr,
    # sizes
    N, NUM_SEGMENTS, N_TARGETS, D_IN, D_OUT, K_IN, K_OUT,
    # strides
    stride_xn, stride_xd, stride_gn, stride_gd,
    stride_pin_d, stride_pin_k, stride_pout_d, stride_pout_k,
    stride_qb, stride_qo, stride_qi,
    # meta-parameters
    HAS_ORDER: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KI: tl.constexpr, BLOCK_KO: tl.constexpr,
):
    """score[s, b] += sum_{t in s} G~[t] . (Q[b] X~[t]) for BLOCK_N tokens, one target matrix at a time."""
    seg, x_proj, g_proj = _load_tile(
        x_ptr, g_ptr, p_in_ptr, p_out_ptr, seg_ptr, order_ptr,
        N, D_IN, D_OUT, K_IN, K_OUT,
        stride_xn, stride_xd, stride_gn, stride_gd,
        stride_pin_d, stride_pin_k, stride_pout_d, stride_pout_k,
        HAS_ORDER, BLOCK_N, BLOCK_D, BLOCK_KI, BLOCK_KO, UPCAST,
    )
    offs_ki = tl.arange(0, BLOCK_KI)
    offs_ko = tl.arange(0, BLOCK_KO)
    q_mask = (offs_ko[:, None] < K_OUT) & (offs_ki[None, :] < K_IN)
    first, last = _segment_range(seg, NUM_SEGMENTS)
    for b in range(0, N_TARGETS):
        q = tl.load(
            q_ptr + b * stride_qb + offs_ko[:, None] * stride_qo + offs_ki[None, :] * stride_qi,
            mask=q_mask, other=0.0,
        )
        # (X~ Q[b]^T)[t, o] = (Q[b] X~[t])[o]; dot with G~[t] per token.
        per_token = tl.sum(tl.dot(x_proj, tl.trans(q), input_precision="ieee") * g_proj, axis=1)
        for s in range(first, last + 1):
            in_segment = seg == s
            if tl.sum(in_segment.to(tl.int32)) > 0:
                total = tl.sum(tl.where(in_segment, per_token, 0.0))
                tl.atomic_add(scores_ptr + s * N_TARGETS + b, total, sem="relaxed")


def _is_interpreted() -> bool:
    # ``triton.jit`` returns an InterpretedFunction when TRITON_INTERPRET=1 was set before this module loaded.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_project_grads_kernel, InterpretedFunction)


INTERPRETED = _is_interpreted()


def runs_on(device: torch.device) -> bool:
    """Whether these kernels run on tensors of ``device``: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


def _launch_settings(inputs: KernelInputs) -> dict:
    """Block sizes and flags for both kernels (fixed heuristics: picking autotune configs needs a GPU)."""
    if max(inputs.k_in, inputs.k_out) > MAX_K:
        raise KernelInputError(
            f"triton backend: k_in={inputs.k_in}, k_out={inputs.k_out} (p_in {tuple(inputs.p_in.shape)}, "
            f"p_out {tuple(inputs.p_out.shape)}) exceed the largest supported k={MAX_K}; use backend='cuda' "
            "or 'torch', or a smaller projection"
        )
    block_ki = max(16, triton.next_power_of_2(inputs.k_in))
    block_ko = max(16, triton.next_power_of_2(inputs.k_out))
    widest = max(block_ki, block_ko)
    d_max = max(inputs.x.shape[1], inputs.g.shape[1])
    return {
        "BLOCK_N": 64 if widest <= 64 else (32 if widest <= 128 else 16),
        "BLOCK_D": min(64, max(16, triton.next_power_of_2(d_max))),
        "BLOCK_KI": block_ki,
        "BLOCK_KO": block_ko,
        # The 3.9 interpreter multiplies bf16 bit patterns in tl.dot; fp32 operands give the same exact
        # products (bf16 x bf16 fits an fp32 mantissa), so upcasting there is numerically equivalent.
        "UPCAST": INTERPRETED and inputs.x.dtype != torch.float32,
        "num_warps": 4 if widest <= 32 else 8,
    }


def _common_args(inputs: KernelInputs) -> tuple[list, dict]:
    x, g, p_in, p_out = inputs.x, inputs.g, inputs.p_in, inputs.p_out
    if inputs.segments_sorted:
        order = inputs.segment_ids  # unused by the kernel when HAS_ORDER is False
    else:
        order = torch.argsort(inputs.segment_ids, stable=True)
    pointers = [x, g, p_in, p_out]
    sizes = [x.shape[1], g.shape[1], p_in.shape[1], p_out.shape[1]]
    strides = [*x.stride(), *g.stride(), *p_in.stride(), *p_out.stride()]
    return [pointers, inputs.segment_ids, order, sizes, strides], {"HAS_ORDER": not inputs.segments_sorted}


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the inputs' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def project_grads_triton(
    inputs: KernelInputs, *, return_factors: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_project_grads_kernel``: Phi [S, k_out, k_in], and A, B when ``return_factors``, all float32.

    Args:
        inputs (KernelInputs): validated inputs on a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).
        return_factors (bool): also accumulate A [k_in, k_in] and B [k_out, k_out]. Default False.

    Returns:
        tuple: (Phi, A, B); A and B are None unless ``return_factors``.

    Raises:
        KernelInputError: k_in or k_out exceeds ``MAX_K``.
    """
    settings = _launch_settings(inputs)
    (pointers, seg, order, sizes, strides), flags = _common_args(inputs)
    device, k_in, k_out = inputs.device, inputs.k_in, inputs.k_out
    phi = torch.zeros(inputs.num_segments, k_out, k_in, dtype=torch.float32, device=device)
    a = torch.zeros(k_in, k_in, dtype=torch.float32, device=device) if return_factors else phi
    b = torch.zeros(k_out, k_out, dtype=torch.float32, device=device) if return_factors else phi
    grid = (triton.cdiv(inputs.n_tokens, settings["BLOCK_N"]),)
    with _device_guard(device):
        _project_grads_kernel[grid](
            *pointers, seg, order,
            phi, a, b,
            inputs.n_tokens, inputs.num_segments, *sizes,
            *strides,
            RETURN_FACTORS=return_factors, **flags, **settings,
        )
    return (phi, a, b) if return_factors else (phi, None, None)


def segment_target_scores_triton(inputs: KernelInputs) -> torch.Tensor:
    """Launch ``_segment_target_scores_kernel``: scores [S, n_targets] float32 (``inputs.q`` must be set).

    Raises:
        KernelInputError: k_in or k_out exceeds ``MAX_K``.
    """
    settings = _launch_settings(inputs)
    (pointers, seg, order, sizes, strides), flags = _common_args(inputs)
    q = inputs.q
    scores = torch.zeros(inputs.num_segments, q.shape[0], dtype=torch.float32, device=inputs.device)
    grid = (triton.cdiv(inputs.n_tokens, settings["BLOCK_N"]),)
    with _device_guard(inputs.device):
        _segment_target_scores_kernel[grid](
            *pointers, q, seg, order,
            scores,
            inputs.n_tokens, inputs.num_segments, q.shape[0], *sizes,
            *strides, *q.stride(),
            **flags, **settings,
        )
    return scores
