// CPU kernels of lightning_3d.compression, and the Python bindings.
//
// Semantics are defined by the reference in lightning_3d/compression.py; these kernels reproduce
// it bit for bit: the same kept entries, the same scales and codes, the same residual.
//
// Encoding runs as streaming passes over e = float(g) + float(r), never materializing e:
//   exact selection     1. histogram of the top 16 bits of |e| (and a NaN/Inf count)
//                       2. histogram of the low 16 bits inside the threshold bin -> exact
//                          threshold t and how many entries equal to t are kept (lowest index first)
//   sampled selection   1. threshold t from evenly spaced samples (nth_element)
//   both                3. per block: entries above t and equal to t -> value offsets
//                       4. per block: bitmap, scale, 8-bit codes and the new residual
// Non-negative floats order like their bit patterns, so |e| is compared as uint32.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "compression.h"

namespace lightning_3d {
namespace {

constexpr int64_t kGrain = 1 << 15;     // entries per parallel task
constexpr uint32_t kNonFinite = 0x7f800000u;  // |e| bits at or above this are Inf or NaN
constexpr int kBins = 1 << 16;

inline uint32_t magnitude_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits & 0x7fffffffu;
}

// e_i = float(g_i) + float(r_i), or float(g_i) without a residual.
template <typename G, typename R>
struct Source {
  const G* grad;
  const R* residual;
  inline float operator()(int64_t i) const {
    float e = static_cast<float>(grad[i]);
    if (residual != nullptr) e += static_cast<float>(residual[i]);
    return e;
  }
};

inline uint8_t encode_value(float e, float scale, int64_t value_format) {
  float ratio = scale > 0.0f ? e / scale : 0.0f;
  if (value_format == kInt8) {
    float q = std::min(std::max(std::nearbyint(ratio), -127.0f), 127.0f);
    return static_cast<uint8_t>(static_cast<int8_t>(q));
  }
  return c10::Float8_e4m3fn(ratio).x;
}

inline float decode_value(uint8_t code, float scale, int64_t value_format) {
  if (value_format == kInt8) return static_cast<float>(static_cast<int8_t>(code)) * scale;
  return static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits())) * scale;
}

// Per-thread histograms merged after a parallel pass.
template <typename Body>
std::vector<int64_t> histogram(int64_t n, Body body) {
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(threads, std::vector<int64_t>(kBins, 0));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    body(begin, end, local[at::get_thread_num()]);
  });
  for (int t = 1; t < threads; ++t)
    for (int b = 0; b < kBins; ++b) local[0][b] += local[t][b];
  return local[0];
}

// Highest bin at which the count from the top reaches `need`; `above` gets the count above it.
inline int top_bin(const std::vector<int64_t>& counts, int64_t need, int64_t* above) {
  int64_t running = 0;
  for (int bin = kBins - 1; bin >= 0; --bin) {
    if (running + counts[bin] >= need) {
      *above = running;
      return bin;
    }
    running += counts[bin];
  }
  *above = running;
  return 0;
}

struct Threshold {
  uint32_t bits;     // keep |e| bits > bits ...
  int64_t take_equal;  // ... and the first take_equal entries with |e| bits == bits
};

template <typename G, typename R>
bool exact_threshold(const Source<G, R>& src, int64_t n, int64_t k, Threshold* out) {
  std::vector<int64_t> nonfinite(at::get_num_threads(), 0);
  auto high = histogram(n, [&](int64_t begin, int64_t end, std::vector<int64_t>& h) {
    int64_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits = magnitude_bits(src(i));
      if (bits >= kNonFinite) {
        ++bad;
        continue;
      }
      ++h[bits >> 16];
    }
    nonfinite[at::get_thread_num()] += bad;
  });
  for (int64_t bad : nonfinite)
    if (bad) return false;
  int64_t above_high = 0;
  const uint32_t bin = static_cast<uint32_t>(top_bin(high, k, &above_high));
  auto low = histogram(n, [&](int64_t begin, int64_t end, std::vector<int64_t>& h) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits = magnitude_bits(src(i));
      if ((bits >> 16) == bin) ++h[bits & 0xffffu];
    }
  });
  int64_t above_low = 0;
  const uint32_t low_bin = static_cast<uint32_t>(top_bin(low, k - above_high, &above_low));
  out->bits = (bin << 16) | low_bin;
  out->take_equal = k - above_high - above_low;
  return true;
}

template <typename G, typename R>
uint32_t sampled_threshold(const Source<G, R>& src, int64_t n, int64_t m, double density) {
  std::vector<uint32_t> sample(m);
  for (int64_t j = 0; j < m; ++j) sample[j] = magnitude_bits(src(j * n / m));
  const int64_t sample_k = static_cast<int64_t>(std::ceil(density * static_cast<double>(m)));
  std::nth_element(sample.begin(), sample.begin() + (sample_k - 1), sample.end(),
                   std::greater<uint32_t>());
  return sample[sample_k - 1];
}

struct BlockCounts {
  std::vector<int64_t> greater, equal;
  int64_t nonfinite = 0;
};

template <typename G, typename R>
BlockCounts count_blocks(const Source<G, R>& src, int64_t n, int64_t block, uint32_t t) {
  const int64_t blocks = (n + block - 1) / block;
  BlockCounts counts{std::vector<int64_t>(blocks), std::vector<int64_t>(blocks)};
  std::vector<int64_t> nonfinite(at::get_num_threads(), 0);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    int64_t bad = 0;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t greater = 0, equal = 0;
      const int64_t stop = std::min(n, (b + 1) * block);
      for (int64_t i = b * block; i < stop; ++i) {
        uint32_t bits = magnitude_bits(src(i));
        bad += bits >= kNonFinite;
        greater += bits > t;
        equal += bits == t;
      }
      counts.greater[b] = greater;
      counts.equal[b] = equal;
    }
    nonfinite[at::get_thread_num()] += bad;
  });
  for (int64_t bad : nonfinite) counts.nonfinite += bad;
  return counts;
}

template <typename G, typename R>
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_typed(
    const G* grad, R* residual, int64_t n, double density, int64_t block, int64_t value_format,
    int64_t sample_count, double tolerance, const at::TensorOptions& options) {
  const Source<G, R> src{grad, residual};
  const int64_t blocks = (n + block - 1) / block;
  auto empty = at::empty({0}, options.dtype(at::kByte));
  auto fail = [&](int64_t bad) {
    return std::make_tuple(at::empty({0}, options.dtype(at::kFloat)), empty, empty, bad);
  };
  const int64_t k = static_cast<int64_t>(std::ceil(density * static_cast<double>(n)));
  const int64_t low = static_cast<int64_t>(std::floor((1.0 - tolerance) * static_cast<double>(k)));
  const int64_t high = static_cast<int64_t>(std::ceil((1.0 + tolerance) * static_cast<double>(k)));

  Threshold threshold{0, std::numeric_limits<int64_t>::max()};
  BlockCounts counts;
  bool decided = false;
  if (sample_count > 0) {
    threshold.bits = sampled_threshold(src, n, sample_count, density);
    counts = count_blocks(src, n, block, threshold.bits);
    if (counts.nonfinite) return fail(counts.nonfinite);
    int64_t kept = 0;
    for (int64_t b = 0; b < blocks; ++b) kept += counts.greater[b] + counts.equal[b];
    decided = low <= kept && kept <= high;
  }
  if (!decided) {
    if (!exact_threshold(src, n, k, &threshold)) {
      return fail(count_blocks(src, n, block, 0).nonfinite);
    }
    counts = count_blocks(src, n, block, threshold.bits);
  }

  // Offsets: entries equal to t before each block, and kept entries before each block.
  std::vector<int64_t> equal_before(blocks), offset(blocks + 1, 0);
  int64_t equal_running = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    equal_before[b] = equal_running;
    const int64_t room = std::max<int64_t>(0, threshold.take_equal - equal_running);
    offset[b + 1] = offset[b] + counts.greater[b] + std::min(counts.equal[b], room);
    equal_running += counts.equal[b];
  }

  auto scales = at::empty({blocks}, options.dtype(at::kFloat));
  auto bitmap = at::empty({(n + 7) / 8}, options.dtype(at::kByte));
  auto values = at::empty({offset[blocks]}, options.dtype(at::kByte));
  float* scale_ptr = scales.data_ptr<float>();
  uint8_t* bitmap_ptr = bitmap.data_ptr<uint8_t>();
  uint8_t* value_ptr = values.data_ptr<uint8_t>();
  const float qmax = value_format == kInt8 ? 127.0f : 448.0f;
  const uint32_t t = threshold.bits;
  const int64_t take_equal = threshold.take_equal;

  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, stop = std::min(n, start + block);
      uint8_t* bits_out = bitmap_ptr + start / 8;
      std::memset(bits_out, 0, (stop - start + 7) / 8);
      int64_t equal_seen = equal_before[b];
      float block_max = 0.0f;
      for (int64_t i = start; i < stop; ++i) {
        const float e = src(i);
        const uint32_t bits = magnitude_bits(e);
        const bool keep = bits > t || (bits == t && equal_seen++ < take_equal);
        if (keep) {
          bits_out[(i - start) >> 3] |= static_cast<uint8_t>(1u << ((i - start) & 7));
          block_max = std::max(block_max, std::fabs(e));
        }
      }
      const float scale = block_max / qmax;
      scale_ptr[b] = scale;
      int64_t slot = offset[b];
      for (int64_t i = start; i < stop; ++i) {
        const float e = src(i);
        const bool kept = (bits_out[(i - start) >> 3] >> ((i - start) & 7)) & 1u;
        float decoded = 0.0f;
        if (kept) {
          const uint8_t code = encode_value(e, scale, value_format);
          value_ptr[slot++] = code;
          decoded = decode_value(code, scale, value_format);
        }
        if (residual != nullptr) residual[i] = static_cast<R>(e - decoded);
      }
    }
  });
  return std::make_tuple(scales, bitmap, values, int64_t{0});
}

template <typename T>
void decode_typed(const float* scales, const uint8_t* bitmap, const uint8_t* values, int64_t n,
                  int64_t block, int64_t value_format, T* out, bool accumulate) {
  const int64_t blocks = (n + block - 1) / block;
  std::vector<int64_t> offset(blocks + 1, 0);
  const int64_t bitmap_bytes = (n + 7) / 8, block_bytes = block / 8;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0;
      const int64_t stop = std::min(bitmap_bytes, (b + 1) * block_bytes);
      for (int64_t j = b * block_bytes; j < stop; ++j) count += __builtin_popcount(bitmap[j]);
      offset[b + 1] = count;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] += offset[b];
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, stop = std::min(n, start + block);
      const float scale = scales[b];
      int64_t slot = offset[b];
      for (int64_t i = start; i < stop; ++i) {
        const bool kept = (bitmap[i >> 3] >> (i & 7)) & 1u;
        const float decoded = kept ? decode_value(values[slot++], scale, value_format) : 0.0f;
        out[i] = static_cast<T>(accumulate ? static_cast<float>(out[i]) + decoded : decoded);
      }
    }
  });
}

#define LIGHTNING_3D_DISPATCH_FLOAT(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)     \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode_cpu(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance) {
  const int64_t n = grad.numel();
  const auto options = grad.options();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> result;
  LIGHTNING_3D_DISPATCH_FLOAT(grad.scalar_type(), "lightning_3d_encode", [&] {
    using G = scalar_t;
    const G* g = grad.data_ptr<G>();
    if (!residual.has_value()) {
      result = encode_typed<G, float>(g, nullptr, n, density, block, value_format, sample_count,
                                      tolerance, options);
    } else if (residual->scalar_type() == at::kFloat) {
      result = encode_typed<G, float>(g, residual->data_ptr<float>(), n, density, block,
                                      value_format, sample_count, tolerance, options);
    } else {
      result = encode_typed<G, c10::BFloat16>(g, residual->data_ptr<c10::BFloat16>(), n, density,
                                              block, value_format, sample_count, tolerance,
                                              options);
    }
  });
  return result;
}

void decode_cpu(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
                int64_t n, int64_t block, int64_t value_format, at::Tensor& out,
                bool accumulate) {
  LIGHTNING_3D_DISPATCH_FLOAT(out.scalar_type(), "lightning_3d_decode", [&] {
    decode_typed<scalar_t>(scales.data_ptr<float>(), bitmap.data_ptr<uint8_t>(),
                           values.data_ptr<uint8_t>(), n, block, value_format,
                           out.data_ptr<scalar_t>(), accumulate);
  });
}

namespace {

void check_inputs(const at::Tensor& grad, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(grad.is_contiguous(), "lightning_3d.encode: the input must be contiguous");
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->numel() == grad.numel(),
                "lightning_3d.encode: the residual must be contiguous and match the input size");
    TORCH_CHECK(residual->device() == grad.device(),
                "lightning_3d.encode: the residual must be on the input's device");
    TORCH_CHECK(residual->scalar_type() == at::kFloat ||
                    residual->scalar_type() == at::kBFloat16,
                "lightning_3d.encode: the residual must be float32 or bfloat16");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> encode(
    const at::Tensor& grad, const c10::optional<at::Tensor>& residual, double density,
    int64_t block, int64_t value_format, int64_t sample_count, double tolerance) {
  check_inputs(grad, residual);
  if (grad.is_cuda()) {
#ifdef LIGHTNING_3D_WITH_CUDA
    return encode_cuda(grad, residual, density, block, value_format, sample_count, tolerance);
#else
    TORCH_CHECK(false, "lightning_3d was built without CUDA kernels");
#endif
  }
  return encode_cpu(grad, residual, density, block, value_format, sample_count, tolerance);
}

void decode(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
            int64_t n, int64_t block, int64_t value_format, at::Tensor out, bool accumulate) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == n,
              "lightning_3d.decode: out must be contiguous with one entry per encoded entry");
  if (out.is_cuda()) {
#ifdef LIGHTNING_3D_WITH_CUDA
    return decode_cuda(scales, bitmap, values, n, block, value_format, out, accumulate);
#else
    TORCH_CHECK(false, "lightning_3d was built without CUDA kernels");
#endif
  }
  decode_cpu(scales.contiguous(), bitmap.contiguous(), values.contiguous(), n, block,
             value_format, out, accumulate);
}

bool has_cuda() {
#ifdef LIGHTNING_3D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace lightning_3d

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lightning-3d native kernels (see lightning_3d/compression.py for semantics)";
  module.def("encode", &lightning_3d::encode, "top-k + 8-bit block encode with error feedback");
  module.def("decode", &lightning_3d::decode, "decode (or accumulate) a compressed message");
  module.def("has_cuda", &lightning_3d::has_cuda, "whether the CUDA kernels were built");
}
