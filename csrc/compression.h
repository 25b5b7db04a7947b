// Declarations shared by the CPU (compression.cpp) and CUDA (compression_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lightning_3d {

// value_format codes, as in lightning_3d/ops.py
constexpr int64_t kInt8 = 0;
constexpr int64_t kFp8E4M3 = 1;

#ifdef LIGHTNING_3D_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance);

void decode_cuda(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
                 int64_t n, int64_t block, int64_t value_format, at::Tensor& out,
                 bool accumulate);
#endif

}  // namespace lightning_3d
