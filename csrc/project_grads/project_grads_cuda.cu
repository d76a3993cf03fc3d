// CUDA implementation of tikmix::project_grads and tikmix::segment_target_scores.
//
// Grid: one CTA per tile of kTileTokens consecutive tokens, however the tokens fall into segments, so a long
// segment is spread over many CTAs. Launching one block per example instead is what made a published Triton
// attempt 18x slower than PyTorch. Each CTA:
//   1. projects its tokens, x~ = x @ p_in and g~ = g @ p_out, into shared memory. The input rows and p are
//      staged in shared memory kDepthChunk columns at a time (converted to float32 from fp32/bf16/fp16), and
//      each thread accumulates a 4 x 4 register tile in float32;
//   2. reduces within the tile: for every output element, a running sum over each run of equal segment ids,
//      then one float32 atomicAdd per run into the global output. The factors A and B and the target scores
//      are reduced the same way.
// Atomics make the summation order vary between runs, but only at fp32 rounding level. The grid depends
// only on N, never on the GPU model.
//
// Segment ids outside [-1, num_segments) are treated as ignored rather than checked here: checking would
// cost a device synchronisation, and tikmix_kernels validates the ids on the host before calling the op.

#include "project_grads.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
// Only c10's CUDA headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS/cuSPARSE/cuSOLVER
// headers, which minimal CUDA toolkits (nvcc and the runtime alone) do not ship.

#include <tuple>

namespace tikmix {
namespace {

constexpr int kThreads = 256;      // 16 row groups x 16 column groups
constexpr int kTileTokens = 64;    // tokens per CTA: 16 row groups x 4 rows
constexpr int kDepthChunk = 32;    // input columns staged in shared memory per step
constexpr int kColumnPass = 64;    // output columns per pass: 16 column groups x 4 columns
constexpr int kStagedLd = kTileTokens + 1;  // padded so the transposed staging stores are conflict-free

template <typename scalar_t>
struct Matrix {
  const scalar_t* data;
  int64_t stride0;
  int64_t stride1;
};

template <typename scalar_t>
Matrix<scalar_t> matrix_of(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// float32, float16 and bfloat16 only: the dtypes check_projection_inputs accepts (AT_DISPATCH_FLOATING_TYPES
// would also instantiate every kernel for double).
#define TIKMIX_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                          \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Shared-memory layout of one CTA, in 4-byte words, each region 16-byte aligned.
struct SharedLayout {
  int64_t k_in_pad;   // k_in rounded up to kColumnPass (at least one pass)
  int64_t k_out_pad;
  int64_t q_ld;       // row stride of the staged q[b]: k_in made odd, so column reads are conflict-free
  int64_t xt;         // [kTileTokens, k_in_pad] projected activations
  int64_t gt;         // [kTileTokens, k_out_pad] projected gradients
  int64_t p;          // [kDepthChunk, max(k_in_pad, k_out_pad)] staged projection rows
  int64_t staged;     // [kDepthChunk, kStagedLd] staged input rows, transposed
  int64_t segments;   // [kTileTokens] int32 segment ids of the tile (-1 = ignored)
  int64_t q;          // [k_out, q_ld] staged q[b] (segment_target_scores only)
  int64_t token_sums; // [kTileTokens] per-token score of the current target (segment_target_scores only)
  int64_t words;

  SharedLayout(int64_t k_in, int64_t k_out, bool with_targets) {
    const auto aligned = [](int64_t offset) { return round_up(offset, 4); };
    k_in_pad = round_up(k_in > 0 ? k_in : 1, kColumnPass);
    k_out_pad = round_up(k_out > 0 ? k_out : 1, kColumnPass);
    q_ld = k_in | 1;
    xt = 0;
    gt = xt + kTileTokens * k_in_pad;
    p = gt + kTileTokens * k_out_pad;
    staged = p + kDepthChunk * (k_in_pad > k_out_pad ? k_in_pad : k_out_pad);
    segments = aligned(staged + kDepthChunk * kStagedLd);
    q = aligned(segments + kTileTokens);
    token_sums = aligned(q + (with_targets ? k_out * q_ld : 0));
    words = token_sums + (with_targets ? kTileTokens : 0);
  }

  size_t bytes() const { return static_cast<size_t>(words) * 4; }
};

template <typename scalar_t>
struct ProjectParams {
  Matrix<scalar_t> x;
  Matrix<scalar_t> g;
  Matrix<scalar_t> p_in;
  Matrix<scalar_t> p_out;
  const int64_t* segment_ids;
  int64_t tokens;
  int64_t d_in;
  int64_t d_out;
  int64_t k_in;
  int64_t k_out;
  int64_t num_segments;
  SharedLayout layout;
};

// out_s [kTileTokens, k_pad] = rows[token0 : token0 + kTileTokens] @ p (zero rows past the last token and
// zero columns past k). Ends with a barrier, so out_s is visible to every thread.
template <typename scalar_t>
__device__ void project_tile(const Matrix<scalar_t>& rows, int64_t token0, int64_t tokens, int64_t depth,
                             const Matrix<scalar_t>& p, int64_t k, int64_t k_pad, float* out_s, float* p_s,
                             float* staged_s) {
  const int tid = threadIdx.x;
  const int row0 = (tid / 16) * 4;
  const int col0 = (tid % 16) * 4;
  for (int64_t e = tid; e < kTileTokens * k_pad; e += kThreads) out_s[e] = 0.0f;
  for (int64_t d0 = 0; d0 < depth; d0 += kDepthChunk) {
    __syncthreads();  // the previous chunk has been consumed (and out_s zeroed)
    for (int e = tid; e < kTileTokens * kDepthChunk; e += kThreads) {
      // Consecutive threads read consecutive columns of one row: coalesced for row-major inputs.
      const int m = e / kDepthChunk;
      const int kk = e % kDepthChunk;
      const int64_t t = token0 + m;
      const int64_t d = d0 + kk;
      const bool inside = t < tokens && d < depth;
      staged_s[kk * kStagedLd + m] =
          inside ? static_cast<float>(rows.data[t * rows.stride0 + d * rows.stride1]) : 0.0f;
    }
    for (int64_t e = tid; e < kDepthChunk * k_pad; e += kThreads) {
      const int64_t kk = e / k_pad;
      const int64_t c = e % k_pad;
      const int64_t d = d0 + kk;
      p_s[e] = (d < depth && c < k) ? static_cast<float>(p.data[d * p.stride0 + c * p.stride1]) : 0.0f;
    }
    __syncthreads();
    for (int64_t c0 = col0; c0 < k_pad; c0 += kColumnPass) {
      float acc[4][4] = {};
#pragma unroll 8
      for (int kk = 0; kk < kDepthChunk; ++kk) {
        const float* a = staged_s + kk * kStagedLd + row0;
        const float4 b = *reinterpret_cast<const float4*>(p_s + kk * k_pad + c0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float ai = a[i];
          acc[i][0] += ai * b.x;
          acc[i][1] += ai * b.y;
          acc[i][2] += ai * b.z;
          acc[i][3] += ai * b.w;
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) out_s[(row0 + i) * k_pad + c0 + j] += acc[i][j];
      }
    }
  }
  __syncthreads();
}

// Loads the tile's segment ids (ignored, out-of-range and past-the-end tokens become -1) and projects x and g
// into shared memory. Returns the shared regions through the pointers.
template <typename scalar_t>
__device__ void load_projected_tile(const ProjectParams<scalar_t>& params, float* smem, float*& xt_s,
                                    float*& gt_s, int*& seg_s) {
  const SharedLayout& layout = params.layout;
  xt_s = smem + layout.xt;
  gt_s = smem + layout.gt;
  seg_s = reinterpret_cast<int*>(smem + layout.segments);
  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  for (int m = threadIdx.x; m < kTileTokens; m += kThreads) {
    const int64_t t = token0 + m;
    const int64_t s = t < params.tokens ? params.segment_ids[t] : -1;
    seg_s[m] = (s >= 0 && s < params.num_segments) ? static_cast<int>(s) : -1;
  }
  float* p_s = smem + layout.p;
  float* staged_s = smem + layout.staged;
  project_tile(params.x, token0, params.tokens, params.d_in, params.p_in, params.k_in, layout.k_in_pad, xt_s,
               p_s, staged_s);
  project_tile(params.g, token0, params.tokens, params.d_out, params.p_out, params.k_out, layout.k_out_pad,
               gt_s, p_s, staged_s);
}

// out[s, i, j] += sum over the tile's tokens t of segment s of left[t, i] * right[t, j]; with `one_segment`,
// every non-ignored token counts for segment 0 (the curvature factors).
__device__ void reduce_outer_products(const float* left_s, int64_t left_ld, int64_t left_cols,
                                      const float* right_s, int64_t right_ld, int64_t right_cols,
                                      const int* seg_s, bool one_segment, float* out) {
  for (int64_t e = threadIdx.x; e < left_cols * right_cols; e += kThreads) {
    const int64_t i = e / right_cols;
    const int64_t j = e % right_cols;
    float run = 0.0f;
    int current = -1;
    for (int m = 0; m < kTileTokens; ++m) {
      const int s = (one_segment && seg_s[m] >= 0) ? 0 : seg_s[m];
      if (s != current) {
        if (current >= 0) atomicAdd(out + (current * left_cols + i) * right_cols + j, run);
        run = 0.0f;
        current = s;
      }
      if (s >= 0) run += left_s[m * left_ld + i] * right_s[m * right_ld + j];
    }
    if (current >= 0) atomicAdd(out + (current * left_cols + i) * right_cols + j, run);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    project_grads_kernel(const ProjectParams<scalar_t> params, float* phi, float* factor_a, float* factor_b) {
  extern __shared__ float4 shared_words[];
  float* smem = reinterpret_cast<float*>(shared_words);
  float* xt_s;
  float* gt_s;
  int* seg_s;
  load_projected_tile(params, smem, xt_s, gt_s, seg_s);
  const SharedLayout& layout = params.layout;
  reduce_outer_products(gt_s, layout.k_out_pad, params.k_out, xt_s, layout.k_in_pad, params.k_in, seg_s,
                        false, phi);
  if (factor_a != nullptr) {
    reduce_outer_products(xt_s, layout.k_in_pad, params.k_in, xt_s, layout.k_in_pad, params.k_in, seg_s, true,
                          factor_a);
    reduce_outer_products(gt_s, layout.k_out_pad, params.k_out, gt_s, layout.k_out_pad, params.k_out, seg_s,
                          true, factor_b);
  }
}

// scores[s, b] += sum over the tile's tokens t of segment s of g~[t] . (q[b] @ x~[t]), one target at a time:
// q[b] is staged in shared memory, each thread computes (q[b] @ x~[t])[o] * g~[t, o] for some (t, o) and adds
// it to the token's sum in shared memory, then one thread reduces the token sums run by run.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    segment_target_scores_kernel(const ProjectParams<scalar_t> params, const float* q, int64_t n_targets,
                                 float* scores) {
  extern __shared__ float4 shared_words[];
  float* smem = reinterpret_cast<float*>(shared_words);
  float* xt_s;
  float* gt_s;
  int* seg_s;
  load_projected_tile(params, smem, xt_s, gt_s, seg_s);
  const SharedLayout& layout = params.layout;
  float* q_s = smem + layout.q;
  float* token_sums = smem + layout.token_sums;
  const int64_t k_in = params.k_in;
  const int64_t k_out = params.k_out;
  for (int64_t b = 0; b < n_targets; ++b) {
    __syncthreads();  // the previous target's q_s and token_sums have been consumed
    for (int64_t e = threadIdx.x; e < k_out * k_in; e += kThreads) {
      q_s[(e / k_in) * layout.q_ld + e % k_in] = q[b * k_out * k_in + e];
    }
    for (int m = threadIdx.x; m < kTileTokens; m += kThreads) token_sums[m] = 0.0f;
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kTileTokens * k_out; e += kThreads) {
      const int m = static_cast<int>(e / k_out);
      const int64_t o = e % k_out;
      if (seg_s[m] < 0) continue;
      const float* q_row = q_s + o * layout.q_ld;
      const float* x_row = xt_s + m * layout.k_in_pad;
      float y = 0.0f;
      for (int64_t j = 0; j < k_in; ++j) y += q_row[j] * x_row[j];
      atomicAdd(token_sums + m, gt_s[m * layout.k_out_pad + o] * y);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float run = 0.0f;
      int current = -1;
      for (int m = 0; m < kTileTokens; ++m) {
        if (seg_s[m] != current) {
          if (current >= 0) atomicAdd(scores + current * n_targets + b, run);
          run = 0.0f;
          current = seg_s[m];
        }
        if (current >= 0) run += token_sums[m];
      }
      if (current >= 0) atomicAdd(scores + current * n_targets + b, run);
    }
  }
}

template <typename scalar_t>
ProjectParams<scalar_t> make_params(const at::Tensor& x, const at::Tensor& g, const at::Tensor& p_in,
                                    const at::Tensor& p_out, const at::Tensor& ids,
                                    const ProjectionShape& shape, int64_t num_segments,
                                    const SharedLayout& layout) {
  return {matrix_of<scalar_t>(x),     matrix_of<scalar_t>(g),
          matrix_of<scalar_t>(p_in),  matrix_of<scalar_t>(p_out),
          ids.const_data_ptr<int64_t>(), shape.tokens,
          shape.d_in,                 shape.d_out,
          shape.k_in,                 shape.k_out,
          num_segments,               layout};
}

// The launch both ops make, on `device` (the inputs') and its current stream: `kernel(params, outputs...)`
// with one CTA of kThreads per tile of kTileTokens tokens and the dynamic shared memory params.layout needs
// (the kernel's limit raised to it, or a failure naming the sizes), then the launch check. The outputs were
// allocated on `device` before it without a guard: the ATen ops that make them set the device themselves.
template <typename scalar_t, typename Kernel, typename... Outputs>
void launch_over_tiles(const char* op, const at::Device device, Kernel kernel,
                       const ProjectParams<scalar_t>& params, Outputs... outputs) {
  const c10::cuda::CUDAGuard guard(device);
  const SharedLayout& layout = params.layout;
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  TORCH_CHECK(layout.bytes() <= static_cast<size_t>(limit), op, ": k_in=", params.k_in, " and k_out=",
              params.k_out, " need ", layout.bytes(), " bytes of shared memory per block, more than the ",
              limit, " this GPU allows; use smaller projections or another backend");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(layout.bytes())));
  const dim3 grid(static_cast<unsigned>((params.tokens + kTileTokens - 1) / kTileTokens));
  kernel<<<grid, kThreads, layout.bytes(), c10::cuda::getCurrentCUDAStream()>>>(params, outputs...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> project_grads_cuda(const at::Tensor& x, const at::Tensor& g,
                                                                  const at::Tensor& p_in,
                                                                  const at::Tensor& p_out,
                                                                  const at::Tensor& segment_ids,
                                                                  int64_t num_segments, bool return_factors) {
  const ProjectionShape shape =
      check_projection_inputs(__func__, x, g, p_in, p_out, segment_ids, num_segments, c10::DeviceType::CUDA);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor phi = at::zeros({num_segments, shape.k_out, shape.k_in}, f32);
  at::Tensor a = return_factors ? at::zeros({shape.k_in, shape.k_in}, f32) : at::empty({0}, f32);
  at::Tensor b = return_factors ? at::zeros({shape.k_out, shape.k_out}, f32) : at::empty({0}, f32);
  if (shape.tokens == 0) return {phi, a, b};

  const char* op = __func__;
  const at::Tensor ids = segment_ids.to(at::kLong).contiguous();
  const SharedLayout layout(shape.k_in, shape.k_out, false);
  TIKMIX_DISPATCH_FLOAT_TYPES(x.scalar_type(), "project_grads_cuda", [&] {
    launch_over_tiles(op, x.device(), project_grads_kernel<scalar_t>,
                      make_params<scalar_t>(x, g, p_in, p_out, ids, shape, num_segments, layout),
                      phi.mutable_data_ptr<float>(), return_factors ? a.mutable_data_ptr<float>() : nullptr,
                      return_factors ? b.mutable_data_ptr<float>() : nullptr);
  });
  return {phi, a, b};
}

at::Tensor segment_target_scores_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& p_in,
                                      const at::Tensor& p_out, const at::Tensor& q,
                                      const at::Tensor& segment_ids, int64_t num_segments) {
  const ProjectionShape shape =
      check_projection_inputs(__func__, x, g, p_in, p_out, segment_ids, num_segments, c10::DeviceType::CUDA);
  const int64_t n_targets = check_targets(__func__, q, shape, x.device());
  at::Tensor scores = at::zeros({num_segments, n_targets}, x.options().dtype(at::kFloat));
  if (shape.tokens == 0 || n_targets == 0) return scores;

  const char* op = __func__;
  const at::Tensor ids = segment_ids.to(at::kLong).contiguous();
  const at::Tensor q_f = q.to(at::kFloat).contiguous();
  const SharedLayout layout(shape.k_in, shape.k_out, true);
  TIKMIX_DISPATCH_FLOAT_TYPES(x.scalar_type(), "segment_target_scores_cuda", [&] {
    launch_over_tiles(op, x.device(), segment_target_scores_kernel<scalar_t>,
                      make_params<scalar_t>(x, g, p_in, p_out, ids, shape, num_segments, layout),
                      q_f.const_data_ptr<float>(), n_targets, scores.mutable_data_ptr<float>());
  });
  return scores;
}

}  // namespace
}  // namespace tikmix

TORCH_LIBRARY_IMPL(tikmix, CUDA, m) {
  m.impl("project_grads", &tikmix::project_grads_cuda);
  m.impl("segment_target_scores", &tikmix::segment_target_scores_cuda);
}
