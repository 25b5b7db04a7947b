// Declarations shared by the CPU (compression.cpp) and CUDA (compression_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <tuple>

namespace lightning_3d {

// value_format codes, as in lightning_3d/ops.py
constexpr int64_t kInt8 = 0;
constexpr int64_t kFp8E4M3 = 1;

// The input and output dtypes the kernels are built for: float32, bfloat16 and float16 (no double).
#define LIGHTNING_3D_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

#ifdef LIGHTNING_3D_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance);

// Exact selection of k entries written into caller-owned views (a collective's send slot), with
// no host synchronization: the non-finite count stays on the device, in `nonfinite` (int64[1]).
void encode_into_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                      int64_t k, int64_t block, int64_t value_format, at::Tensor& scales,
                      at::Tensor& bitmap, at::Tensor& values, at::Tensor& nonfinite);

void decode_cuda(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
                 int64_t n, int64_t block, int64_t value_format, at::Tensor& out,
                 bool accumulate);
#endif

}  // namespace lightning_3d
