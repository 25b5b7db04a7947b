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
#include <type_traits>

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
  // As on the CPU: clamp to the largest finite float8 before the cast, whatever it does beyond.
  return c10::Float8_e4m3fn(fminf(fmaxf(ratio, -448.0f), 448.0f)).x;
}

__device__ __forceinline__ float decode_value(uint8_t code, float scale, int64_t value_format) {
  const float q = value_format == kInt8
                      ? static_cast<float>(static_cast<int8_t>(code))
                      : static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits()));
  return __fmul_rn(q, scale);
}

// Histogram of the 8-bit digit of |e| at `shift`, over entries whose higher bits equal the prefix
// in state[1] (read on the device: no host round trip between passes). Each warp counts into its
// own shared sub-histogram: gradients crowd into a few exponent digits, and one histogram for
// the whole CTA would serialize every warp on the same few counters.
template <typename G, typename R>
__global__ void digit_histogram(const G* grad, const R* residual, int64_t n, int shift,
                                const int64_t* state, unsigned long long* counts,
                                unsigned long long* nonfinite) {
  __shared__ unsigned int local[kWarpsPerCta][256];
  for (int i = threadIdx.x; i < kWarpsPerCta * 256; i += blockDim.x) (&local[0][0])[i] = 0;
  __syncthreads();
  const uint32_t prefix = shift == 24 ? 0u : static_cast<uint32_t>(state[1]);
  unsigned int* mine = local[threadIdx.x / 32];
  unsigned int bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t bits = magnitude_bits(load_e(grad, residual, i));
    if (shift == 24) bad += bits >= kNonFinite;
    if (shift == 24 || (bits >> (shift + 8)) == prefix) atomicAdd(&mine[(bits >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    unsigned int total = 0;
    for (int w = 0; w < kWarpsPerCta; ++w) total += local[w][i];
    if (total) atomicAdd(&counts[i], static_cast<unsigned long long>(total));
  }
  if (bad) atomicAdd(nonfinite, static_cast<unsigned long long>(bad));
}

// Radix select state: state[0] = entries still needed, state[1] = the bits chosen so far. After
// the last digit, state[1] is the threshold t and state[0] how many entries equal to t are kept.
__global__ void start_select(int64_t* state, int64_t k) {
  state[0] = k;
  state[1] = 0;
}

// One thread: walk the digits from the top, taking whole buckets while they fit.
__global__ void pick_digit(const unsigned long long* counts, int64_t* state) {
  int64_t need = state[0];
  int digit = 255;
  for (; digit > 0 && static_cast<int64_t>(counts[digit]) < need; --digit)
    need -= static_cast<int64_t>(counts[digit]);
  state[0] = need;
  state[1] = (state[1] << 8) | digit;
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
                             int64_t blocks, const int64_t* state, int64_t* greater,
                             int64_t* equal, unsigned long long* nonfinite) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const uint32_t t = static_cast<uint32_t>(state[1]);
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
// and tie ranks follow index order exactly as on the CPU. With a non-finite input (counted in
// the first histogram pass, before this kernel) the block writes an empty bitmap and a zero
// scale and leaves the residual as it was.
template <typename G, typename R>
__global__ void encode_blocks(const G* grad, R* residual, int64_t n, int64_t block, int64_t blocks,
                              const int64_t* state, const int64_t* equal_before,
                              const int64_t* offset, const unsigned long long* nonfinite,
                              float qmax, int64_t value_format, float* scales, uint8_t* bitmap,
                              uint8_t* values) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerCta) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const int64_t start = b * block, stop = min(n, start + block);
  if (*nonfinite != 0) {
    for (int64_t j = start / 8 + lane; j < (stop + 7) / 8; j += 32) bitmap[j] = 0;
    if (lane == 0) scales[b] = 0.0f;
    return;
  }
  const int64_t take_equal = state[0];
  const uint32_t t = static_cast<uint32_t>(state[1]);
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

// Slots past the values held (a damaged bitmap) decode to NaN instead of reading out of bounds:
// the check stays on the device, so decoding never waits for the host.
template <typename T>
__global__ void decode_blocks(const float* scales, const uint8_t* bitmap, const uint8_t* values,
                              int64_t value_count, const int64_t* offset, int64_t n, int64_t block,
                              int64_t blocks, int64_t value_format, T* out, bool accumulate) {
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
      const int64_t at = slot + __popc(kept & lower);
      const float decoded = at < value_count ? decode_value(values[at], scale, value_format)
                                             : __int_as_float(0x7fc00000);
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

// Where one encode writes: views of the caller's buffers (a message's tensors or a slot's ranges).
struct EncodeOutputs {
  float* scales;
  uint8_t* bitmap;
  uint8_t* values;
  unsigned long long* nonfinite;  // zeroed by the caller; the first histogram pass counts into it
};

// Exact top-k threshold by radix select on the device: four histogram passes over the bits of
// |e|, the digit choice made by one thread between passes. state ends as [take_equal, t].
template <typename G, typename R>
void select_on_device(const G* grad, const R* residual, int64_t n, int64_t k, at::Tensor& state,
                      unsigned long long* nonfinite, cudaStream_t stream) {
  auto counts = at::empty({256}, state.options());
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const int grid = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  start_select<<<1, 1, 0, stream>>>(state.data_ptr<int64_t>(), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int shift = 24; shift >= 0; shift -= 8) {
    counts.zero_();
    digit_histogram<G, R><<<grid, kThreads, 0, stream>>>(
        grad, residual, n, shift, state.data_ptr<int64_t>(), counts_ptr, nonfinite);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_digit<<<1, 1, 0, stream>>>(counts_ptr, state.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Per-block counts against t, their offsets, then the encode proper; all on the device.
// Returns the per-block selected counts (their sum is the message's value count).
template <typename G, typename R>
at::Tensor write_blocks(const G* grad, R* residual, int64_t n, int64_t block,
                        int64_t value_format, const at::Tensor& state,
                        const EncodeOutputs& outputs, cudaStream_t stream) {
  const int64_t blocks = (n + block - 1) / block;
  auto greater = at::empty({blocks}, state.options());
  auto equal = at::empty({blocks}, state.options());
  // count_blocks adds non-finite entries again: count them into scratch, not the result.
  auto scratch = at::zeros({1}, state.options());
  count_blocks<G, R><<<grid_for(blocks), kThreads, 0, stream>>>(
      grad, residual, n, block, blocks, state.data_ptr<int64_t>(), greater.data_ptr<int64_t>(),
      equal.data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(scratch.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto equal_before = at::cumsum(equal, 0) - equal;
  auto room = at::clamp_min(state.narrow(0, 0, 1) - equal_before, 0);
  auto selected = greater + at::minimum(equal, room);
  auto offset = at::cumsum(selected, 0) - selected;
  encode_blocks<G, R><<<grid_for(blocks), kThreads, 0, stream>>>(
      grad, residual, n, block, blocks, state.data_ptr<int64_t>(),
      equal_before.data_ptr<int64_t>(), offset.data_ptr<int64_t>(), outputs.nonfinite,
      value_format == kInt8 ? 127.0f : 448.0f, value_format, outputs.scales, outputs.bitmap,
      outputs.values);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return selected;
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
  auto state = at::empty({2}, long_options);
  auto fail = [&](int64_t bad) {
    auto empty = at::empty({0}, options.dtype(at::kByte));
    return std::make_tuple(at::empty({0}, options.dtype(at::kFloat)), empty, empty, bad);
  };
  const int64_t k = static_cast<int64_t>(std::ceil(density * static_cast<double>(n)));
  const int64_t low = static_cast<int64_t>(std::floor((1.0 - tolerance) * static_cast<double>(k)));
  const int64_t high = static_cast<int64_t>(std::ceil((1.0 + tolerance) * static_cast<double>(k)));

  // Sampled selection decides on the host whether its threshold keeps close enough to k.
  int64_t total = k;
  bool decided = false;
  if (sample_count > 0) {
    auto sample = at::empty({sample_count}, options.dtype(at::kInt));
    gather_sample<G, R><<<static_cast<int>((sample_count + kThreads - 1) / kThreads), kThreads, 0,
                          stream>>>(grad, residual, n, sample_count, sample.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t sample_k = static_cast<int64_t>(std::ceil(density * double(sample_count)));
    auto sorted = std::get<0>(at::sort(sample, /*dim=*/0, /*descending=*/true));
    state.narrow(0, 0, 1).fill_(std::numeric_limits<int64_t>::max());  // every tie is kept
    state.narrow(0, 1, 1).copy_(sorted.narrow(0, sample_k - 1, 1));
    auto greater = at::empty({blocks}, long_options);
    auto equal = at::empty({blocks}, long_options);
    count_blocks<G, R><<<grid_for(blocks), kThreads, 0, stream>>>(
        grad, residual, n, block, blocks, state.data_ptr<int64_t>(), greater.data_ptr<int64_t>(),
        equal.data_ptr<int64_t>(), nonfinite_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t bad = nonfinite.item<int64_t>();
    if (bad) return fail(bad);
    total = (greater + equal).sum().item<int64_t>();
    decided = low <= total && total <= high;
  }
  if (!decided) {
    total = k;
    select_on_device<G, R>(grad, residual, n, k, state, nonfinite_ptr, stream);
    const int64_t bad = nonfinite.item<int64_t>();  // the message API reports it on the host
    if (bad) return fail(bad);
  }
  auto scales = at::empty({blocks}, options.dtype(at::kFloat));
  auto bitmap = at::empty({(n + 7) / 8}, options.dtype(at::kByte));
  auto values = at::empty({total}, options.dtype(at::kByte));
  const EncodeOutputs outputs{scales.data_ptr<float>(), bitmap.data_ptr<uint8_t>(),
                              values.data_ptr<uint8_t>(), nonfinite_ptr};
  write_blocks<G, R>(grad, residual, n, block, value_format, state, outputs, stream);
  return std::make_tuple(scales, bitmap, values, int64_t{0});
}

template <typename Body>
void with_residual(const at::Tensor& grad, const c10::optional<at::Tensor>& residual, Body body) {
  LIGHTNING_3D_DISPATCH_FLOAT(grad.scalar_type(), "lightning_3d_encode_cuda", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    if (!residual.has_value()) {
      body(g, static_cast<float*>(nullptr));
    } else if (residual->scalar_type() == at::kFloat) {
      body(g, residual->data_ptr<float>());
    } else {
      body(g, residual->data_ptr<c10::BFloat16>());
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_cuda(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance) {
  const c10::cuda::CUDAGuard guard(grad.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> result;
  with_residual(grad, residual, [&](auto* g, auto* r) {
    using G = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    using R = std::remove_pointer_t<decltype(r)>;
    result = encode_typed<G, R>(g, r, grad.numel(), density, block, value_format, sample_count,
                                tolerance, grad.options());
  });
  return result;
}

void encode_into_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                      int64_t k, int64_t block, int64_t value_format, at::Tensor& scales,
                      at::Tensor& bitmap, at::Tensor& values, at::Tensor& nonfinite) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto state = at::empty({2}, grad.options().dtype(at::kLong));
  nonfinite.zero_();
  auto* nonfinite_ptr = reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>());
  const EncodeOutputs outputs{scales.data_ptr<float>(), bitmap.data_ptr<uint8_t>(),
                              values.data_ptr<uint8_t>(), nonfinite_ptr};
  with_residual(grad, residual, [&](auto* g, auto* r) {
    using G = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    using R = std::remove_pointer_t<decltype(r)>;
    select_on_device<G, R>(g, r, grad.numel(), k, state, nonfinite_ptr, stream);
    write_blocks<G, R>(g, r, grad.numel(), block, value_format, state, outputs, stream);
  });
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
  auto offset = at::cumsum(counts, 0) - counts;
  const auto scales_c = scales.contiguous();
  const auto values_c = values.contiguous();
  LIGHTNING_3D_DISPATCH_FLOAT(out.scalar_type(), "lightning_3d_decode_cuda", [&] {
    decode_blocks<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        scales_c.data_ptr<float>(), bitmap_c.data_ptr<uint8_t>(), values_c.data_ptr<uint8_t>(),
        values_c.numel(), offset.data_ptr<int64_t>(), n, block, blocks, value_format,
        out.data_ptr<scalar_t>(), accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lightning_3d
