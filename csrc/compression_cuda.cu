// CUDA kernels of lightning_3d.compression (built only when torch has CUDA).
//
// Same semantics as the reference in lightning_3d/compression.py and the CPU kernels:
//   exact selection    radix select on the bits of |e| (4 passes of 8 bits, NaN/Inf counted in the
//                      first), giving the threshold t and how many entries equal to t are kept
//   sampled selection  t from evenly spaced samples, sorted with ATen
//   both               per block: entries above / equal to t (offsets by ATen cumsum), then one
//                      warp per block writes bitmap, scale, codes and residual in index order
// Every float operation uses the __f*_rn intrinsics so nvcc cannot fuse a multiply and an add into
// an FMA: results stay bit-identical to the CPU.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "compression.h"

namespace lightning_3d {
namespace {

constexpr uint32_t kNonFinite = 0x7f800000u;
constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;

template <typename G, typename R>
__device__ __forceinline__ float load_e(const G* grad, const R* residual, int64_t i) {
  const float g = static_cast<float>(grad[i]);
  return residual != nullptr ? __fadd_rn(g, static_cast<float>(residual[i])) : g;
}

__device__ __forceinline__ uint32_t magnitude_bits(float value) {
  return __float_as_uint(value) & 0x7fffffffu;
}

__device__ __forceinline__ uint8_t encode_value(float e, float scale, int64_t value_format) {
  const float ratio = scale > 0.0f ? __fdiv_rn(e, scale) : 0.0f;
  if (value_format == kInt8) {
    const float q = fminf(fmaxf(rintf(ratio), -127.0f), 127.0f);  // round half to even
    return static_cast<uint8_t>(static_cast<int8_t>(q));
  }
  return c10::Float8_e4m3fn(ratio).x;
}

__device__ __forceinline__ float decode_value(uint8_t code, float scale, int64_t value_format) {
  const float q = value_format == kInt8
                      ? static_cast<float>(static_cast<int8_t>(code))
                      : static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits()));
  return __fmul_rn(q, scale);
}

// Histogram of the 8-bit digit of |e| at `shift`, over entries whose higher bits equal `prefix`.
template <typename G, typename R>
__global__ void digit_histogram(const G* grad, const R* residual, int64_t n, int shift,
                                uint32_t prefix, unsigned long long* counts,
                                unsigned long long* nonfinite) {
  __shared__ unsigned int local[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
  __syncthreads();
  unsigned int bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t bits = magnitude_bits(load_e(grad, residual, i));
    if (shift == 24) bad += bits >= kNonFinite;
    const bool match = shift == 24 || (bits >> (shift + 8)) == prefix;
    if (match) atomicAdd(&local[(bits >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    if (local[i]) atomicAdd(&counts[i], static_cast<unsigned long long>(local[i]));
  if (bad) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
}

template <typename G, typename R>
__global__ void gather_sample(const G* grad, const R* residual, int64_t n, int64_t m,
                              int32_t* sample) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  // j * n / m in 128 bits so that j * n cannot overflow.
  const int64_t i = static_cast<int64_t>(static_cast<unsigned __int128>(j) *
                                         static_cast<uint64_t>(n) / static_cast<uint64_t>(m));
  sample[j] = static_cast<int32_t>(magnitude_bits(load_e(grad, residual, i)));
}

// One warp per compression block: entries above t, equal to t, and non-finite.
template <typename G, typename R>
__global__ void count_blocks(const G* grad, const R* residual, int64_t n, int64_t block,
                             int64_t blocks, uint32_t t, int64_t* greater, int64_t* equal,
                             unsigned long long* nonfinite) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * block, stop = min(n, start + block);
  int64_t above = 0, same = 0, bad = 0;
  for (int64_t i = start + lane; i < stop; i += 32) {
    const uint32_t bits = magnitude_bits(load_e(grad, residual, i));
    above += bits > t;
    same += bits == t;
    bad += bits >= kNonFinite;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    above += __shfl_down_sync(0xffffffffu, above, offset);
    same += __shfl_down_sync(0xffffffffu, same, offset);
    bad += __shfl_down_sync(0xffffffffu, bad, offset);
  }
  if (lane == 0) {
    greater[b] = above;
    equal[b] = same;
    if (bad) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
  }
}

// One warp per compression block, 32 consecutive entries per step, so bitmap bits, value slots
// and tie ranks follow index order exactly as on the CPU.
template <typename G, typename R>
__global__ void encode_blocks(const G* grad, R* residual, int64_t n, int64_t block, int64_t blocks,
                              uint32_t t, int64_t take_equal, const int64_t* equal_before,
                              const int64_t* offset, float qmax, int64_t value_format,
                              float* scales, uint8_t* bitmap, uint8_t* values) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * block, stop = min(n, start + block);
  const unsigned lower = (1u << lane) - 1u;
  // Sweep 1: which entries are kept, the bitmap, the block maximum.
  int64_t equal_seen = equal_before[b];
  uint32_t max_bits = 0;
  for (int64_t chunk = start; chunk < stop; chunk += 32) {
    const int64_t i = chunk + lane;
    const bool inside = i < stop;
    const uint32_t bits = inside ? magnitude_bits(load_e(grad, residual, i)) : 0u;
    const unsigned equal_mask = __ballot_sync(0xffffffffu, inside && bits == t);
    const int64_t rank = equal_seen + __popc(equal_mask & lower);
    const bool keep = inside && (bits > t || (bits == t && rank < take_equal));
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    equal_seen += __popc(equal_mask);
    if (keep) max_bits = max(max_bits, bits);
    const int64_t byte0 = (chunk - start) / 8;
    const int bytes = static_cast<int>(min(int64_t{4}, (stop - chunk + 7) / 8));
    if (lane < bytes) bitmap[start / 8 + byte0 + lane] = static_cast<uint8_t>(kept >> (8 * lane));
  }
  for (int o = 16; o > 0; o /= 2) max_bits = max(max_bits, __shfl_xor_sync(0xffffffffu, max_bits, o));
  const float scale = __fdiv_rn(__uint_as_float(max_bits), qmax);
  if (lane == 0) scales[b] = scale;
  __syncwarp();
  // Sweep 2: codes in index order and the new residual.
  int64_t slot = offset[b];
  for (int64_t chunk = start; chunk < stop; chunk += 32) {
    const int64_t i = chunk + lane;
    const bool inside = i < stop;
    const int64_t byte = (i - start) / 8;
    const bool keep = inside && ((bitmap[start / 8 + byte] >> ((i - start) & 7)) & 1u);
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    if (inside) {
      const float e = load_e(grad, residual, i);
      float decoded = 0.0f;
      if (keep) {
        const uint8_t code = encode_value(e, scale, value_format);
        values[slot + __popc(kept & lower)] = code;
        decoded = decode_value(code, scale, value_format);
      }
      if (residual != nullptr) residual[i] = static_cast<R>(__fsub_rn(e, decoded));
    }
    slot += __popc(kept);
  }
}

__global__ void count_bits(const uint8_t* bitmap, int64_t n, int64_t block, int64_t blocks,
                           int64_t* counts) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t bitmap_bytes = (n + 7) / 8;
  const int64_t first = b * block / 8, last = min(bitmap_bytes, (b + 1) * block / 8);
  // Bits past entry n - 1 in the last byte are padding: not counted (decode_blocks skips them).
  const uint32_t last_mask = n % 8 ? (1u << (n % 8)) - 1u : 0xffu;
  int64_t total = 0;
  for (int64_t j = first + lane; j < last; j += 32)
    total += __popc(j == bitmap_bytes - 1 ? bitmap[j] & last_mask : bitmap[j]);
  for (int o = 16; o > 0; o /= 2) total += __shfl_down_sync(0xffffffffu, total, o);
  if (lane == 0) counts[b] = total;
}

template <typename T>
__global__ void decode_blocks(const float* scales, const uint8_t* bitmap, const uint8_t* values,
                              const int64_t* offset, int64_t n, int64_t block, int64_t blocks,
                              int64_t value_format, T* out, bool accumulate) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * block, stop = min(n, start + block);
  const unsigned lower = (1u << lane) - 1u;
  const float scale = scales[b];
  int64_t slot = offset[b];
  for (int64_t chunk = start; chunk < stop; chunk += 32) {
    const int64_t i = chunk + lane;
    const bool inside = i < stop;
    const bool keep = inside && ((bitmap[i >> 3] >> (i & 7)) & 1u);
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    if (keep) {
      const float decoded = decode_value(values[slot + __popc(kept & lower)], scale, value_format);
      out[i] = static_cast<T>(accumulate ? __fadd_rn(static_cast<float>(out[i]), decoded) : decoded);
    } else if (inside && !accumulate) {
      out[i] = static_cast<T>(0.0f);
    }
    slot += __popc(kept);
  }
}

int grid_for(int64_t blocks) {
  return static_cast<int>((blocks + kWarpsPerCta - 1) / kWarpsPerCta);
}

template <typename G, typename R>
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_typed(
    const G* grad, R* residual, int64_t n, double density, int64_t block, int64_t value_format,
    int64_t sample_count, double tolerance, const at::TensorOptions& options) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n + block - 1) / block;
  const auto long_options = options.dtype(at::kLong);
  auto nonfinite = at::zeros({1}, long_options);
  auto* nonfinite_ptr = reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>());
  auto greater = at::empty({blocks}, long_options);
  auto equal = at::empty({blocks}, long_options);
  auto fail = [&](int64_t bad) {
    auto empty = at::empty({0}, options.dtype(at::kByte));
    return std::make_tuple(at::empty({0}, options.dtype(at::kFloat)), empty, empty, bad);
  };
  const int64_t k = static_cast<int64_t>(std::ceil(density * static_cast<double>(n)));
  const int64_t low = static_cast<int64_t>(std::floor((1.0 - tolerance) * static_cast<double>(k)));
  const int64_t high = static_cast<int64_t>(std::ceil((1.0 + tolerance) * static_cast<double>(k)));
  auto count_with = [&](uint32_t t) {
    count_blocks<G, R><<<grid_for(blocks), kThreads, 0, stream>>>(
        grad, residual, n, block, blocks, t, greater.data_ptr<int64_t>(),
        equal.data_ptr<int64_t>(), nonfinite_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  uint32_t t = 0;
  int64_t take_equal = std::numeric_limits<int64_t>::max();
  bool decided = false;
  if (sample_count > 0) {
    auto sample = at::empty({sample_count}, options.dtype(at::kInt));
    gather_sample<G, R><<<static_cast<int>((sample_count + kThreads - 1) / kThreads), kThreads, 0,
                          stream>>>(grad, residual, n, sample_count, sample.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t sample_k = static_cast<int64_t>(std::ceil(density * double(sample_count)));
    auto sorted = std::get<0>(at::sort(sample, /*dim=*/0, /*descending=*/true));
    t = static_cast<uint32_t>(sorted[sample_k - 1].item<int32_t>());
    count_with(t);
    const int64_t bad = nonfinite.item<int64_t>();
    if (bad) return fail(bad);
    const int64_t kept = (greater + equal).sum().item<int64_t>();
    decided = low <= kept && kept <= high;
  }
  if (!decided) {
    auto counts = at::zeros({256}, long_options);
    auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    const int grid = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
    int64_t need = k;
    uint32_t prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      counts.zero_();
      digit_histogram<G, R><<<grid, kThreads, 0, stream>>>(grad, residual, n, shift, prefix,
                                                          counts_ptr, nonfinite_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (shift == 24) {
        const int64_t bad = nonfinite.item<int64_t>();
        if (bad) return fail(bad);
      }
      auto host = counts.cpu();
      const int64_t* h = host.data_ptr<int64_t>();
      int digit = 255;
      for (; digit > 0 && h[digit] < need; --digit) need -= h[digit];
      prefix = (prefix << 8) | static_cast<uint32_t>(digit);
    }
    t = prefix;
    take_equal = need;  // entries equal to t still needed after all those above it
    count_with(t);
  }

  auto equal_before = at::cumsum(equal, 0) - equal;
  auto room = at::clamp_min(take_equal == std::numeric_limits<int64_t>::max()
                                ? equal
                                : at::full_like(equal, take_equal) - equal_before,
                            0);
  auto selected = greater + at::minimum(equal, room);
  auto offset = at::cumsum(selected, 0) - selected;
  const int64_t total = selected.sum().item<int64_t>();

  auto scales = at::empty({blocks}, options.dtype(at::kFloat));
  auto bitmap = at::empty({(n + 7) / 8}, options.dtype(at::kByte));
  auto values = at::empty({total}, options.dtype(at::kByte));
  encode_blocks<G, R><<<grid_for(blocks), kThreads, 0, stream>>>(
      grad, residual, n, block, blocks, t, take_equal, equal_before.data_ptr<int64_t>(),
      offset.data_ptr<int64_t>(), value_format == kInt8 ? 127.0f : 448.0f, value_format,
      scales.data_ptr<float>(), bitmap.data_ptr<uint8_t>(), values.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(scales, bitmap, values, int64_t{0});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  const auto options = grad.options();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> result;
  LIGHTNING_3D_DISPATCH_FLOAT(grad.scalar_type(), "lightning_3d_encode_cuda", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    if (!residual.has_value()) {
      result = encode_typed<scalar_t, float>(g, nullptr, n, density, block, value_format,
                                             sample_count, tolerance, options);
    } else if (residual->scalar_type() == at::kFloat) {
      result = encode_typed<scalar_t, float>(g, residual->data_ptr<float>(), n, density, block,
                                             value_format, sample_count, tolerance, options);
    } else {
      result = encode_typed<scalar_t, c10::BFloat16>(g, residual->data_ptr<c10::BFloat16>(), n,
                                                     density, block, value_format, sample_count,
                                                     tolerance, options);
    }
  });
  return result;
}

void decode_cuda(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
                 int64_t n, int64_t block, int64_t value_format, at::Tensor& out,
                 bool accumulate) {
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n + block - 1) / block;
  auto counts = at::empty({blocks}, out.options().dtype(at::kLong));
  const auto bitmap_c = bitmap.contiguous();
  count_bits<<<grid_for(blocks), kThreads, 0, stream>>>(bitmap_c.data_ptr<uint8_t>(), n, block,
                                                         blocks, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto running = at::cumsum(counts, 0);
  auto offset = running - counts;
  // A damaged bitmap must not make decode_blocks read past the values (one host sync).
  const int64_t marked = running[blocks - 1].item<int64_t>();
  TORCH_CHECK(marked == values.numel(), "lightning_3d.decode: the bitmap marks ", marked,
              " entries but the message holds ", values.numel(), " values (a damaged message)");
  const auto scales_c = scales.contiguous();
  const auto values_c = values.contiguous();
  LIGHTNING_3D_DISPATCH_FLOAT(out.scalar_type(), "lightning_3d_decode_cuda", [&] {
    decode_blocks<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        scales_c.data_ptr<float>(), bitmap_c.data_ptr<uint8_t>(), values_c.data_ptr<uint8_t>(),
        offset.data_ptr<int64_t>(), n, block, blocks, value_format, out.data_ptr<scalar_t>(),
        accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lightning_3d
