// Input checks shared by the CPU and CUDA implementations of the tikmix:: projected-gradient ops.
//
// The schema of both ops lives in schema.cpp; this header only validates arguments so that the two
// backends reject exactly the same inputs with the same messages (expected vs actual, and the op name).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tikmix {

// Sizes of one projected-gradient problem, read off validated inputs.
struct ProjectionShape {
  int64_t tokens;  // N
  int64_t d_in;
  int64_t d_out;
  int64_t k_in;
  int64_t k_out;
};

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Validates x [N, d_in], g [N, d_out], p_in [d_in, k_in], p_out [d_out, k_out], segment_ids [N] and
// num_segments for `op`, requiring every tensor on a device of `device_type`. Segment id *values* are
// checked by the kernels themselves (on the CPU) because that needs a pass over the data.
inline ProjectionShape check_projection_inputs(const char* op, const at::Tensor& x, const at::Tensor& g,
                                               const at::Tensor& p_in, const at::Tensor& p_out,
                                               const at::Tensor& segment_ids, int64_t num_segments,
                                               c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2, op, ": expected x to be 2-D [N, d_in], got shape ", x.sizes());
  TORCH_CHECK(g.dim() == 2, op, ": expected g to be 2-D [N, d_out], got shape ", g.sizes());
  TORCH_CHECK(p_in.dim() == 2, op, ": expected p_in to be 2-D [d_in, k_in], got shape ", p_in.sizes());
  TORCH_CHECK(p_out.dim() == 2, op, ": expected p_out to be 2-D [d_out, k_out], got shape ",
              p_out.sizes());
  TORCH_CHECK(segment_ids.dim() == 1, op, ": expected segment_ids to be 1-D [N], got shape ",
              segment_ids.sizes());

  const ProjectionShape shape{x.size(0), x.size(1), g.size(1), p_in.size(1), p_out.size(1)};
  TORCH_CHECK(g.size(0) == shape.tokens, op, ": expected g to have N=", shape.tokens,
              " rows like x (shape ", x.sizes(), "), got shape ", g.sizes());
  TORCH_CHECK(segment_ids.size(0) == shape.tokens, op, ": expected segment_ids of shape [", shape.tokens,
              "] (one id per row of x), got shape ", segment_ids.sizes());
  TORCH_CHECK(p_in.size(0) == shape.d_in, op, ": expected p_in of shape [", shape.d_in,
              ", k_in] (d_in of x), got shape ", p_in.sizes());
  TORCH_CHECK(p_out.size(0) == shape.d_out, op, ": expected p_out of shape [", shape.d_out,
              ", k_out] (d_out of g), got shape ", p_out.sizes());
  TORCH_CHECK(num_segments >= 0, op, ": expected num_segments >= 0, got ", num_segments);

  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": expected x of dtype float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), op, ": expected g of dtype ", x.scalar_type(),
              " (the dtype of x), got ", g.scalar_type());
  TORCH_CHECK(p_in.scalar_type() == x.scalar_type(), op, ": expected p_in of dtype ", x.scalar_type(),
              " (the dtype of x), got ", p_in.scalar_type());
  TORCH_CHECK(p_out.scalar_type() == x.scalar_type(), op, ": expected p_out of dtype ", x.scalar_type(),
              " (the dtype of x), got ", p_out.scalar_type());
  TORCH_CHECK(segment_ids.scalar_type() == at::kLong || segment_ids.scalar_type() == at::kInt, op,
              ": expected segment_ids of dtype int64 or int32, got ", segment_ids.scalar_type());

  const at::Device device = x.device();
  TORCH_CHECK(device.type() == device_type, op, ": expected x on a ", c10::DeviceTypeName(device_type),
              " device, got ", device);
  const at::Tensor* others[] = {&g, &p_in, &p_out, &segment_ids};
  const char* names[] = {"g", "p_in", "p_out", "segment_ids"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(others[i]->device() == device, op, ": expected ", names[i], " on ", device,
                " (the device of x), got ", others[i]->device());
  }
  return shape;
}

// Validates the target matrices q [n_targets, k_out, k_in] of segment_target_scores; returns n_targets.
inline int64_t check_targets(const char* op, const at::Tensor& q, const ProjectionShape& shape,
                             const at::Device& device) {
  TORCH_CHECK(q.dim() == 3, op, ": expected q to be 3-D [n_targets, k_out, k_in], got shape ", q.sizes());
  TORCH_CHECK(q.size(1) == shape.k_out && q.size(2) == shape.k_in, op, ": expected q of shape [n_targets, ",
              shape.k_out, ", ", shape.k_in, "] (k_out of p_out, k_in of p_in), got shape ", q.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()), op,
              ": expected q of dtype float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.device() == device, op, ": expected q on ", device, " (the device of x), got ", q.device());
  return q.size(0);
}

}  // namespace tikmix
