// CPU (OpenMP) implementation of tikmix::project_grads and tikmix::segment_target_scores.
//
// Tokens are processed in blocks of kTokenBlock rows. Each block is projected (x @ p_in and g @ p_out in
// float32, the FLOP-heavy part; bf16/fp16 rows are upcast one block at a time), then the fused parts run on
// the projected block while it is still in cache: per-segment outer-product sums, the curvature factors and
// the target dots. Nothing of size N x k is ever written to memory and read back.
//
// Two kernel sets, picked per call by the environment variable TIKMIX_CPU_KERNELS:
//   auto (default)  on x86-64 Linux CPUs with AVX-512, register-tiled AVX-512 kernels for the projections
//                   and the outer products; elsewhere the portable set.
//   portable        BLAS (at::mm) for the projections and plain C++ loops for the rest.
// The projections are hand-written for AVX-512 because MKL, torch's BLAS, takes its AVX2 code path on AMD
// CPUs: on the project's 2-core AMD EPYC the tiled kernel ran these skinny [512, d] x [d, 32] products about
// twice as fast as at::mm, which is what makes the fused op beat the unfused torch path (kernels/bench.py).
//
// Every output element is owned by one thread and summed in token order, so the results do not depend on
// the thread count (in the portable set, BLAS's own blocking may still reorder the projection sums).

#include "project_grads.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define TIKMIX_HAVE_AVX512_KERNELS 1
#include <immintrin.h>
#endif

// Lets the AVX-512 wrapper below compile the shared loop body for its own target.
#if defined(__GNUC__) || defined(__clang__)
#define TIKMIX_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TIKMIX_ALWAYS_INLINE inline
#endif

namespace tikmix {
namespace {

// Rows per block: large enough to amortise the parallel regions, small enough that the projected block
// (kTokenBlock x k floats) stays in L2 for the fused passes.
constexpr int64_t kTokenBlock = 512;
// Upper bound, in floats, on the per-block buffer of q[b] @ x~[t] products in segment_target_scores.
constexpr int64_t kScoreBufferFloats = int64_t{1} << 22;
// Output tile of the tiled kernel: kTileRows rows x kTileCols columns, i.e. 12 x 2 AVX-512 accumulators
// plus 2 registers for the streamed row, within the 32 vector registers.
constexpr int kTileRows = 12;
constexpr int64_t kTileCols = 32;

// A maximal run of consecutive tokens [begin, end) with the same segment (absolute token indices).
struct Run {
  int64_t begin;
  int64_t end;
  int64_t segment;
};

void check_segment_ids(const char* op, const int64_t* ids, int64_t tokens, int64_t num_segments) {
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(ids[t] >= -1 && ids[t] < num_segments, op, ": expected segment_ids in [-1, ", num_segments,
                ") (-1 = ignore), got segment_ids[", t, "] = ", ids[t]);
  }
}

// True for the AVX-512 kernel set, false for the portable one (see the file comment).
bool use_avx512(const char* op) {
  const char* choice = std::getenv("TIKMIX_CPU_KERNELS");
  const std::string value = choice == nullptr ? "" : choice;
  TORCH_CHECK(value.empty() || value == "auto" || value == "portable", op,
              ": expected the environment variable TIKMIX_CPU_KERNELS to be 'auto' or 'portable', got '",
              value, "'");
#ifdef TIKMIX_HAVE_AVX512_KERNELS
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  return has_avx512 && value != "portable";
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------
// The tile kernel: out[r, c] (+)= sum_{i < depth} a[r * a_row + i * a_step] * b[i * b_step + c]
// for r < rows <= kTileRows and c < cols <= kTileCols. It serves both the projections (a = input rows,
// b = a packed panel of p) and the segmented outer products (a = one run of projected tokens read
// column-wise, b = the same run of the other factor).
struct TileArgs {
  const float* a;
  int64_t a_row;
  int64_t a_step;
  const float* b;
  int64_t b_step;
  int64_t depth;
  float* out;
  int64_t out_row;
  int rows;
  int cols;
  bool accumulate;  // add into out instead of overwriting it
};

void tile_portable(const TileArgs& t) {
  float acc[kTileRows][kTileCols] = {};
  for (int64_t i = 0; i < t.depth; ++i) {
    const float* b = t.b + i * t.b_step;
    for (int r = 0; r < t.rows; ++r) {
      const float a = t.a[r * t.a_row + i * t.a_step];
      for (int c = 0; c < t.cols; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < t.rows; ++r) {
    float* out = t.out + r * t.out_row;
    for (int c = 0; c < t.cols; ++c) out[c] = t.accumulate ? out[c] + acc[r][c] : acc[r][c];
  }
}

#ifdef TIKMIX_HAVE_AVX512_KERNELS
template <int kRows>
__attribute__((target("avx512f"))) void tile_avx512(const TileArgs& t) {
  const auto lane_mask = [](int n) {
    return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
  };
  const __mmask16 lo_mask = lane_mask(t.cols);
  const __mmask16 hi_mask = lane_mask(t.cols - 16);
  __m512 lo[kRows];
  __m512 hi[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
    lo[r] = _mm512_setzero_ps();
    hi[r] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < t.depth; ++i) {
    // Masked loads never touch memory past the last column, so b may end exactly at its row's end.
    const __m512 b_lo = _mm512_maskz_loadu_ps(lo_mask, t.b + i * t.b_step);
    const __m512 b_hi = _mm512_maskz_loadu_ps(hi_mask, t.b + i * t.b_step + 16);
    const float* a = t.a + i * t.a_step;
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512 v = _mm512_set1_ps(a[r * t.a_row]);
      lo[r] = _mm512_fmadd_ps(v, b_lo, lo[r]);
      hi[r] = _mm512_fmadd_ps(v, b_hi, hi[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
    float* out = t.out + r * t.out_row;
    if (t.accumulate) {
      lo[r] = _mm512_add_ps(lo[r], _mm512_maskz_loadu_ps(lo_mask, out));
      hi[r] = _mm512_add_ps(hi[r], _mm512_maskz_loadu_ps(hi_mask, out + 16));
    }
    _mm512_mask_storeu_ps(out, lo_mask, lo[r]);
    _mm512_mask_storeu_ps(out + 16, hi_mask, hi[r]);
  }
}

using TileKernel = void (*)(const TileArgs&);

template <int... kRows>
constexpr std::array<TileKernel, sizeof...(kRows)> make_tile_kernels(std::integer_sequence<int, kRows...>) {
  return {&tile_avx512<kRows + 1>...};
}

// kAvx512Tiles[n - 1] handles tiles of n rows, so short edge tiles keep their accumulators in registers.
constexpr auto kAvx512Tiles = make_tile_kernels(std::make_integer_sequence<int, kTileRows>{});
#endif

void run_tile(const TileArgs& t, bool avx512) {
#ifdef TIKMIX_HAVE_AVX512_KERNELS
  if (avx512) {
    kAvx512Tiles[t.rows - 1](t);
    return;
  }
#endif
  tile_portable(t);
}

// acc[i] += a[i] * b[i]; element-wise, so vectorising it cannot reorder any sum.
TIKMIX_ALWAYS_INLINE void multiply_accumulate_loop(const float* a, const float* b, float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i];
}

#ifdef TIKMIX_HAVE_AVX512_KERNELS
__attribute__((target("avx512f"))) void multiply_accumulate_avx512(const float* a, const float* b, float* acc,
                                                                    int64_t n) {
  multiply_accumulate_loop(a, b, acc, n);
}
#endif

void multiply_accumulate(const float* a, const float* b, float* acc, int64_t n, bool avx512) {
#ifdef TIKMIX_HAVE_AVX512_KERNELS
  if (avx512) {
    multiply_accumulate_avx512(a, b, acc, n);
    return;
  }
#endif
  multiply_accumulate_loop(a, b, acc, n);
}

// ---------------------------------------------------------------------------------------------------
// Projections: out [r, k] = rows [r, d] @ p [d, k], float32.

// One projection matrix p [d, k], prepared once per call: float32 for at::mm, or packed into zero-padded
// [panels, d, kTileCols] panels for the tile kernel, which then splits a block into (row tile, panel) tasks.
class Projection {
 public:
  Projection(const at::Tensor& p, bool avx512) : depth_(p.size(0)), cols_(p.size(1)), avx512_(avx512) {
    if (!avx512_) {
      p_ = p.to(at::kFloat);
      return;
    }
    const int64_t panels = (cols_ + kTileCols - 1) / kTileCols;
    p_ = at::zeros({panels, depth_, kTileCols}, p.options().dtype(at::kFloat));
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t width = std::min(kTileCols, cols_ - j * kTileCols);
      p_.select(0, j).narrow(1, 0, width).copy_(p.narrow(1, j * kTileCols, width));
    }
  }

  int64_t tasks(int64_t rows) const {
    return avx512_ ? ((rows + kTileRows - 1) / kTileRows) * p_.size(0) : 0;
  }

  // Task `task` of out = rows @ p; rows must have unit column stride.
  void run_task(const at::Tensor& rows, int64_t task, at::Tensor& out) const {
    const int64_t panel = task % p_.size(0);
    const int64_t row0 = (task / p_.size(0)) * kTileRows;
    const int64_t ld = rows.stride(0);
    run_tile({rows.const_data_ptr<float>() + row0 * ld, ld, 1,
              p_.const_data_ptr<float>() + panel * depth_ * kTileCols, kTileCols, depth_,
              out.mutable_data_ptr<float>() + row0 * cols_ + panel * kTileCols, cols_,
              static_cast<int>(std::min<int64_t>(kTileRows, rows.size(0) - row0)),
              static_cast<int>(std::min(kTileCols, cols_ - panel * kTileCols)), false},
             true);
  }

  // The whole product through BLAS (portable set).
  void run_blas(const at::Tensor& rows, at::Tensor& out) const { at::mm_out(out, rows, p_); }

  bool avx512() const { return avx512_; }

 private:
  int64_t depth_;
  int64_t cols_;
  bool avx512_;
  at::Tensor p_;
};

struct ProjectionJob {
  const at::Tensor& rows;
  const Projection& projection;
  at::Tensor& out;
};

// Runs the jobs; with the tile kernel, all their tasks share one parallel loop.
void run_projections(const std::vector<ProjectionJob>& jobs) {
  int64_t total = 0;
  for (const auto& job : jobs) {
    if (!job.projection.avx512()) job.projection.run_blas(job.rows, job.out);
    total += job.projection.tasks(job.rows.size(0));
  }
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t local = task;
      size_t which = 0;
      for (int64_t n = jobs[which].projection.tasks(jobs[which].rows.size(0)); local >= n;
           n = jobs[which].projection.tasks(jobs[which].rows.size(0))) {
        local -= n;
        ++which;
      }
      jobs[which].projection.run_task(jobs[which].rows, local, jobs[which].out);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Segmented outer products: out[run.segment] += sum_{t in run} left[t]^T right[t] for every run, with left
// [rows, left_cols] and right [rows, right_cols] indexed by t - row0.
struct OuterProductSum {
  const float* left;
  int64_t left_cols;
  const float* right;
  int64_t right_cols;
  const std::vector<Run>* runs;
  int64_t row0;
  float* out;  // [segments, left_cols, right_cols]

  int64_t col_tiles() const { return (right_cols + kTileCols - 1) / kTileCols; }
  int64_t tiles() const { return ((left_cols + kTileRows - 1) / kTileRows) * col_tiles(); }

  // Accumulates output tile `tile` (row-major over the tile grid) over all runs, in token order.
  void accumulate_tile(int64_t tile, bool avx512) const {
    const int64_t i0 = (tile / col_tiles()) * kTileRows;
    const int64_t j0 = (tile % col_tiles()) * kTileCols;
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, left_cols - i0));
    const int cols = static_cast<int>(std::min(kTileCols, right_cols - j0));
    for (const Run& run : *runs) {
      const int64_t t0 = run.begin - row0;
      run_tile({left + t0 * left_cols + i0, 1, left_cols, right + t0 * right_cols + j0, right_cols,
                run.end - run.begin, out + (run.segment * left_cols + i0) * right_cols + j0, right_cols, rows,
                cols, true},
               avx512);
    }
  }
};

// Runs every tile of every sum in one parallel loop; tiles are disjoint, so no reduction is needed.
void accumulate_outer_products(const std::vector<OuterProductSum>& sums, bool avx512) {
  int64_t total = 0;
  for (const auto& sum : sums) total += sum.tiles();
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t local = task;
      size_t which = 0;
      while (local >= sums[which].tiles()) local -= sums[which++].tiles();
      sums[which].accumulate_tile(local, avx512);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The block loop shared by both ops.

// One projected block: rows [row0, row0 + rows) of the input, projected into xt [rows, k_in] and
// gt [rows, k_out] (contiguous float32), plus its runs. segment_runs split at every segment change;
// valid_runs join all non-ignored tokens (segment 0) and drive the factor sums.
struct Block {
  int64_t row0;
  int64_t rows;
  const at::Tensor& xt;
  const at::Tensor& gt;
  const std::vector<Run>& segment_runs;
  const std::vector<Run>& valid_runs;
};

// Fills the runs of tokens [start, stop).
void find_runs(const int64_t* ids, int64_t start, int64_t stop, std::vector<Run>& segment_runs,
               std::vector<Run>& valid_runs) {
  segment_runs.clear();
  valid_runs.clear();
  for (int64_t t = start; t < stop; ++t) {
    const int64_t s = ids[t];
    if (s < 0) continue;
    if (!segment_runs.empty() && segment_runs.back().end == t && segment_runs.back().segment == s) {
      segment_runs.back().end = t + 1;
    } else {
      segment_runs.push_back({t, t + 1, s});
    }
    if (!valid_runs.empty() && valid_runs.back().end == t) {
      valid_runs.back().end = t + 1;
    } else {
      valid_runs.push_back({t, t + 1, 0});
    }
  }
}

// Projects x and g block by block and calls consume(block) for each block holding a non-ignored token.
// Only the rows from a block's first to its last non-ignored token are projected, so padding at the ends
// of a block (segment id -1) costs no GEMM work.
template <typename Consume>
void for_each_projected_block(const at::Tensor& x, const at::Tensor& g, const Projection& in,
                              const Projection& out, const int64_t* ids, const ProjectionShape& shape,
                              Consume&& consume) {
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t block = std::min(kTokenBlock, std::max<int64_t>(shape.tokens, 1));
  at::Tensor xt_buf = at::empty({block, shape.k_in}, f32);
  at::Tensor gt_buf = at::empty({block, shape.k_out}, f32);
  // Rows are staged in float32 buffers when they are bf16/fp16 (upcast one block at a time) or, for the
  // tile kernel, when their columns are not contiguous.
  const auto staging_buffer = [&](const at::Tensor& t, int64_t width) {
    const bool stage = t.scalar_type() != at::kFloat || (in.avx512() && t.stride(1) != 1);
    return stage ? at::empty({block, width}, f32) : at::Tensor();
  };
  at::Tensor x_buf = staging_buffer(x, shape.d_in);
  at::Tensor g_buf = staging_buffer(g, shape.d_out);
  const auto rows_of = [](const at::Tensor& t, at::Tensor& buf, int64_t row0, int64_t rows) {
    return buf.defined() ? buf.narrow(0, 0, rows).copy_(t.narrow(0, row0, rows)) : t.narrow(0, row0, rows);
  };

  std::vector<Run> segment_runs;
  std::vector<Run> valid_runs;
  for (int64_t start = 0; start < shape.tokens; start += block) {
    find_runs(ids, start, std::min(start + block, shape.tokens), segment_runs, valid_runs);
    if (segment_runs.empty()) continue;
    const int64_t row0 = segment_runs.front().begin;
    const int64_t rows = segment_runs.back().end - row0;
    at::Tensor xt = xt_buf.narrow(0, 0, rows);
    at::Tensor gt = gt_buf.narrow(0, 0, rows);
    const at::Tensor x_rows = rows_of(x, x_buf, row0, rows);
    const at::Tensor g_rows = rows_of(g, g_buf, row0, rows);
    run_projections({{x_rows, in, xt}, {g_rows, out, gt}});
    consume(Block{row0, rows, xt, gt, segment_runs, valid_runs});
  }
}

// ---------------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, at::Tensor, at::Tensor> project_grads_cpu(const at::Tensor& x, const at::Tensor& g,
                                                                 const at::Tensor& p_in,
                                                                 const at::Tensor& p_out,
                                                                 const at::Tensor& segment_ids,
                                                                 int64_t num_segments, bool return_factors) {
  const ProjectionShape shape =
      check_projection_inputs(__func__, x, g, p_in, p_out, segment_ids, num_segments, c10::DeviceType::CPU);
  const bool avx512 = use_avx512(__func__);
  const at::Tensor ids = segment_ids.to(at::kLong).contiguous();
  check_segment_ids(__func__, ids.const_data_ptr<int64_t>(), shape.tokens, num_segments);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor phi = at::zeros({num_segments, shape.k_out, shape.k_in}, f32);
  at::Tensor a = return_factors ? at::zeros({shape.k_in, shape.k_in}, f32) : at::empty({0}, f32);
  at::Tensor b = return_factors ? at::zeros({shape.k_out, shape.k_out}, f32) : at::empty({0}, f32);
  std::vector<OuterProductSum> sums;
  const auto consume = [&](const Block& block) {
    const float* xt = block.xt.const_data_ptr<float>();
    const float* gt = block.gt.const_data_ptr<float>();
    sums.clear();
    sums.push_back({gt, shape.k_out, xt, shape.k_in, &block.segment_runs, block.row0,
                    phi.mutable_data_ptr<float>()});
    if (return_factors) {
      sums.push_back(
          {xt, shape.k_in, xt, shape.k_in, &block.valid_runs, block.row0, a.mutable_data_ptr<float>()});
      sums.push_back(
          {gt, shape.k_out, gt, shape.k_out, &block.valid_runs, block.row0, b.mutable_data_ptr<float>()});
    }
    accumulate_outer_products(sums, avx512);
  };
  for_each_projected_block(x, g, Projection(p_in, avx512), Projection(p_out, avx512),
                           ids.const_data_ptr<int64_t>(), shape, consume);
  return {phi, a, b};
}

at::Tensor segment_target_scores_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& p_in,
                                     const at::Tensor& p_out, const at::Tensor& q,
                                     const at::Tensor& segment_ids, int64_t num_segments) {
  const ProjectionShape shape =
      check_projection_inputs(__func__, x, g, p_in, p_out, segment_ids, num_segments, c10::DeviceType::CPU);
  const int64_t n_targets = check_targets(__func__, q, shape, x.device());
  const bool avx512 = use_avx512(__func__);
  const at::Tensor ids = segment_ids.to(at::kLong).contiguous();
  check_segment_ids(__func__, ids.const_data_ptr<int64_t>(), shape.tokens, num_segments);

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor scores = at::zeros({num_segments, n_targets}, f32);
  if (n_targets == 0 || shape.k_out == 0) return scores;
  // With q as [k_in, n_targets * k_out] columns, z[t, b * k_out + o] = (q[b] @ x~[t])[o] is one more
  // projection of the block; targets are chunked so that z stays within kScoreBufferFloats.
  const at::Tensor q_columns = q.reshape({n_targets * shape.k_out, shape.k_in}).t();
  const int64_t block = std::min(kTokenBlock, std::max<int64_t>(shape.tokens, 1));
  const int64_t chunk = std::clamp<int64_t>(kScoreBufferFloats / (block * shape.k_out), 1, n_targets);
  std::vector<Projection> target_chunks;
  for (int64_t first = 0; first < n_targets; first += chunk) {
    const int64_t count = std::min(chunk, n_targets - first);
    target_chunks.emplace_back(q_columns.narrow(1, first * shape.k_out, count * shape.k_out), avx512);
  }
  at::Tensor z_buf = at::empty({block * chunk * shape.k_out}, f32);
  float* score_data = scores.mutable_data_ptr<float>();

  const auto consume = [&](const Block& blk) {
    const float* gt = blk.gt.const_data_ptr<float>();
    for (size_t c = 0; c < target_chunks.size(); ++c) {
      const int64_t first = static_cast<int64_t>(c) * chunk;
      const int64_t count = std::min(chunk, n_targets - first);
      const int64_t width = count * shape.k_out;
      at::Tensor z = z_buf.narrow(0, 0, blk.rows * width).view({blk.rows, width});
      run_projections({{blk.xt, target_chunks[c], z}});
      const float* z_data = z.const_data_ptr<float>();
      // Each thread owns whole score columns and walks the runs in token order.
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(shape.k_out);
        for (int64_t target = begin; target < end; ++target) {
          for (const Run& run : blk.segment_runs) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t t = run.begin - blk.row0; t < run.end - blk.row0; ++t) {
              const float* z_row = z_data + t * width + target * shape.k_out;
              multiply_accumulate(gt + t * shape.k_out, z_row, acc.data(), shape.k_out, avx512);
            }
            float sum = 0.0f;
            for (const float value : acc) sum += value;
            score_data[run.segment * n_targets + first + target] += sum;
          }
        }
      });
    }
  };
  for_each_projected_block(x, g, Projection(p_in, avx512), Projection(p_out, avx512),
                           ids.const_data_ptr<int64_t>(), shape, consume);
  return scores;
}

}  // namespace
}  // namespace tikmix

TORCH_LIBRARY_IMPL(tikmix, CPU, m) {
  m.impl("project_grads", &tikmix::project_grads_cpu);
  m.impl("segment_target_scores", &tikmix::segment_target_scores_cpu);
}
