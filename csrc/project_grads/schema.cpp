// The one definition of the tikmix:: op schemas; kernels register in project_grads_cpu.cpp and _cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY(tikmix, m) {
  // Fake (meta) implementations for torch.compile are registered in Python by this module.
  m.set_python_module("tikmix_kernels._native");
  // phi[s] = sum_{t: seg[t] = s} (g[t] @ p_out)^T (x[t] @ p_in), float32 [num_segments, k_out, k_in].
  // With return_factors, also A = sum x~ x~^T [k_in, k_in] and B = sum g~ g~^T [k_out, k_out] over
  // tokens with seg[t] >= 0; otherwise A and B are empty [0] tensors. seg[t] = -1 ignores token t.
  m.def(
      "project_grads(Tensor x, Tensor g, Tensor p_in, Tensor p_out, Tensor segment_ids, int num_segments, "
      "bool return_factors) -> (Tensor, Tensor, Tensor)");
  // scores[s, b] = sum_{t: seg[t] = s} (g[t] @ p_out) . (q[b] @ (x[t] @ p_in)), float32
  // [num_segments, n_targets], without materialising any per-segment k_out x k_in matrix.
  m.def(
      "segment_target_scores(Tensor x, Tensor g, Tensor p_in, Tensor p_out, Tensor q, Tensor segment_ids, "
      "int num_segments) -> Tensor");
}
