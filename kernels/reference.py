"""Plain-PyTorch projected gradients: the ``torch`` backend (the reference) and the baselines benchmarks beat.

Three implementations, all for one Linear layer with activations X [N, d_in], output gradients G [N, d_out],
projections P_in [d_in, k_in], P_out [d_out, k_out] and a segment id per token (-1 = ignored)
(docs/methods.md §2, the LoGra/LogIX factored form):

    Phi[s] = sum_{t : seg[t] = s} (G[t] @ P_out)^T (X[t] @ P_in)        [k_out, k_in], float32

- ``project_grads_torch`` (backend ``torch``): two matmuls on fp32 copies of each chunk of tokens, a
  per-token outer product, then ``index_add_`` by segment. Chunked so its temporaries stay bounded whatever
  N is. It is the middle ground in the tests, and is itself checked against per-example autograd gradients.
- ``project_grads_unfused``: what a user writes by hand (LogIX-style): two matmuls in the input dtype, a
  [N, k_out, k_in] outer-product temporary, ``index_add_``. The "unfused factored torch" baseline.
- ``project_grads_naive``: materialise each segment's weight gradient W_s = G_s^T X_s [d_out, d_in], then
  project it, P_out^T W_s P_in (the Kronecker projection kron(P_out, P_in)^T vec(W_s)). The "naive" baseline.

Tests and ``tikmix_kernels.bench`` import these same functions, so the baselines cannot drift.
"""

from __future__ import annotations

import torch
from tikmix_kernels._inputs import KernelInputs, check_inputs

# Elements of one fp32 temporary (e.g. the [n, k_out, k_in] outer products of a chunk): 32 MiB.
CHUNK_ELEMENTS = 1 << 23


def _chunk_rows(inputs: KernelInputs, width: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, width, inputs.x.shape[1], inputs.g.shape[1]))


def _project_chunk(
    inputs: KernelInputs, start: int, stop: int, *, upcast: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X~ and G~ (float32, ignored rows zeroed) and the clamped segment ids of tokens [start, stop)."""
    x, g = inputs.x[start:stop], inputs.g[start:stop]
    if upcast:
        x_proj = x.float() @ inputs.p_in.float()
        g_proj = g.float() @ inputs.p_out.float()
    else:
        x_proj = (x @ inputs.p_in).float()
        g_proj = (g @ inputs.p_out).float()
    seg = inputs.segment_ids[start:stop]
    keep = (seg >= 0).unsqueeze(1).to(torch.float32)
    return x_proj * keep, g_proj * keep, seg.clamp(min=0)


def _accumulate_phi(
    inputs: KernelInputs, *, return_factors: bool, chunk_rows: int | None, upcast: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    device, k_in, k_out = inputs.device, inputs.k_in, inputs.k_out
    phi = torch.zeros(inputs.num_segments, k_out * k_in, dtype=torch.float32, device=device)
    a = torch.zeros(k_in, k_in, dtype=torch.float32, device=device) if return_factors else None
    b = torch.zeros(k_out, k_out, dtype=torch.float32, device=device) if return_factors else None
    step = chunk_rows or max(1, inputs.n_tokens)
    for start in range(0, inputs.n_tokens, step):
        x_proj, g_proj, seg = _project_chunk(inputs, start, start + step, upcast=upcast)
        if inputs.num_segments:
            outer = torch.einsum("no,ni->noi", g_proj, x_proj).reshape(len(seg), -1)
            phi.index_add_(0, seg, outer)
        if return_factors:
            a += x_proj.T @ x_proj
            b += g_proj.T @ g_proj
    return phi.view(inputs.num_segments, k_out, k_in), a, b


def project_grads_torch(
    inputs: KernelInputs, *, return_factors: bool = False, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The ``torch`` backend of ``project_grads`` on validated inputs.

    Args:
        inputs (KernelInputs): validated inputs from ``check_inputs``.
        return_factors (bool): also accumulate A = X~^T X~ and B = G~^T G~ over non-ignored tokens.
            Default False.
        chunk_elements (int): bound on the elements of each fp32 temporary; tokens are processed in chunks
            of ``chunk_elements // max(k_out * k_in, d_in, d_out)`` rows. Default ``CHUNK_ELEMENTS``.

    Returns:
        tuple: Phi [S, k_out, k_in] float32, then A [k_in, k_in] and B [k_out, k_out] float32 (None unless
        ``return_factors``).
    """
    rows = _chunk_rows(inputs, inputs.k_out * inputs.k_in, chunk_elements)
    return _accumulate_phi(inputs, return_factors=return_factors, chunk_rows=rows, upcast=True)


def segment_target_scores_torch(
    inputs: KernelInputs, *, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """The ``torch`` backend of ``segment_target_scores`` on validated inputs (``inputs.q`` set).

    score[s, b] = sum_{t in s} G~[t] . (Q[b] @ X~[t]), computed per chunk as a [n, n_targets, k_out] product,
    never a per-segment [k_out, k_in] matrix.

    Args:
        inputs (KernelInputs): validated inputs with ``q`` [n_targets, k_out, k_in] float32.
        chunk_elements (int): bound on the elements of each fp32 temporary. Default ``CHUNK_ELEMENTS``.

    Returns:
        Tensor: [S, n_targets] float32 scores.
    """
    q = inputs.q
    n_targets = q.shape[0]
    scores = torch.zeros(inputs.num_segments, n_targets, dtype=torch.float32, device=inputs.device)
    q_rows = q.reshape(n_targets * inputs.k_out, inputs.k_in)
    step = _chunk_rows(inputs, n_targets * inputs.k_out, chunk_elements)
    for start in range(0, inputs.n_tokens, step):
        x_proj, g_proj, seg = _project_chunk(inputs, start, start + step, upcast=True)
        per_target = (x_proj @ q_rows.T).view(len(seg), n_targets, inputs.k_out)
        if inputs.num_segments:
            scores.index_add_(0, seg, torch.einsum("nbo,no->nb", per_target, g_proj))
    return scores


def project_grads_unfused(
    x: torch.Tensor,
    g: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Baseline: two matmuls in the input dtype, one [N, k_out, k_in] outer-product temporary, ``index_add_``.

    Same arguments as ``project_grads``; returns Phi [S, k_out, k_in] float32. X~ and G~ are rounded to the
    input dtype (as a hand-written bf16 pipeline would), so bf16 results are less accurate than ours.
    """
    inputs = check_inputs("project_grads_unfused", x, g, p_in, p_out, segment_ids, num_segments)
    phi, _, _ = _accumulate_phi(inputs, return_factors=False, chunk_rows=None, upcast=False)
    return phi


def project_grads_naive(
    x: torch.Tensor,
    g: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Baseline: materialise every segment's W_s = G_s^T X_s [d_out, d_in], then Phi[s] = P_out^T W_s P_in.

    Same arguments as ``project_grads``; returns Phi [S, k_out, k_in] float32. W is held in the input dtype
    ([S, d_out, d_in]: 32 MB for 8 segments of 1024 x 1024 fp32), as TRAK-style pipelines do before
    projecting.
    """
    inputs = check_inputs("project_grads_naive", x, g, p_in, p_out, segment_ids, num_segments)
    x2d, g2d, seg = inputs.x, inputs.g, inputs.segment_ids
    weights = torch.zeros(
        inputs.num_segments, g2d.shape[1], x2d.shape[1], dtype=x2d.dtype, device=inputs.device
    )
    for s in range(inputs.num_segments):
        rows = torch.nonzero(seg == s).squeeze(1)
        torch.mm(g2d[rows].T, x2d[rows], out=weights[s])
    return (inputs.p_out.T @ weights @ inputs.p_in).float()
