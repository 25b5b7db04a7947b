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
constexpr float kFp8Max = 448.0f;             // the largest finite float8 e4m3fn

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
    // Round half to even without a libm call: exact for |ratio| < 2^22 in the default rounding
    // mode (here |ratio| <= 127.x), and what torch.round does.
    const float shifted = ratio + 12582912.0f;  // 1.5 * 2^23
    float q = std::min(std::max(shifted - 12582912.0f, -127.0f), 127.0f);
    return static_cast<uint8_t>(static_cast<int8_t>(q));
  }
  // |ratio| <= 448 in exact arithmetic; the clamp keeps a rounding excess from ever reaching a
  // cast that, depending on the torch version, saturates or gives NaN.
  return c10::Float8_e4m3fn(std::fmin(std::fmax(ratio, -kFp8Max), kFp8Max)).x;
}

inline float decode_value(uint8_t code, float scale, int64_t value_format) {
  if (value_format == kInt8) return static_cast<float>(static_cast<int8_t>(code)) * scale;
  return static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits())) * scale;
}

constexpr int kTopShift = 18;               // top bins: exponent and 5 mantissa bits of |e|
constexpr int kTopBins = 1 << (31 - kTopShift);

struct Threshold {
  uint32_t bits;       // keep |e| bits > bits ...
  int64_t take_equal;  // ... and the first take_equal entries with |e| bits == bits
};

struct BlockCounts {
  std::vector<int64_t> greater, equal;  // per block: entries above t, entries equal to t
  int64_t nonfinite = 0;
};

// Exact selection in two streaming passes:
//   1. a histogram of the top bits of |e| (2 interleaved sub-tables, against store stalls) finds the
//      bin T holding the k-th largest entry, and counts NaN/Inf;
//   2. per block, entries above bin T are counted and those inside it collected; the exact
//      threshold is the (k - above)-th largest candidate (nth_element).
template <typename G, typename R>
bool exact_threshold(const Source<G, R>& src, int64_t n, int64_t block, int64_t k,
                     Threshold* threshold, BlockCounts* counts) {
  const int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(threads, std::vector<int64_t>(kTopBins, 0));
  std::vector<int64_t> nonfinite(threads, 0);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> sub(2 * kTopBins, 0);
    int64_t bad = 0;
    for (int64_t start = begin; start < end; start += kGrain) {  // uint32 counts per chunk
      const int64_t stop = std::min(end, start + kGrain);
      int64_t i = start;
      for (; i + 2 <= stop; i += 2) {
        for (int lane = 0; lane < 2; ++lane) {
          const uint32_t bits = magnitude_bits(src(i + lane));
          bad += bits >= kNonFinite;
          ++sub[lane * kTopBins + (std::min(bits, kNonFinite - 1) >> kTopShift)];
        }
      }
      for (; i < stop; ++i) {
        const uint32_t bits = magnitude_bits(src(i));
        bad += bits >= kNonFinite;
        ++sub[std::min(bits, kNonFinite - 1) >> kTopShift];
      }
      auto& total = local[at::get_thread_num()];
      for (int bin = 0; bin < kTopBins; ++bin) {
        total[bin] += sub[bin] + sub[kTopBins + bin];
      }
      std::fill(sub.begin(), sub.end(), 0u);
    }
    nonfinite[at::get_thread_num()] += bad;
  });
  for (int64_t bad : nonfinite) counts->nonfinite += bad;
  if (counts->nonfinite) return false;
  for (int t = 1; t < threads; ++t)
    for (int bin = 0; bin < kTopBins; ++bin) local[0][bin] += local[t][bin];
  int64_t above = 0;
  uint32_t bin = 0;
  for (int b = kTopBins - 1; b >= 0; --b) {
    if (above + local[0][b] >= k) {
      bin = static_cast<uint32_t>(b);
      break;
    }
    above += local[0][b];
  }

  const int64_t blocks = (n + block - 1) / block;
  counts->greater.assign(blocks, 0);
  counts->equal.assign(blocks, 0);
  std::vector<std::vector<std::pair<int64_t, uint32_t>>> candidates(threads);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    auto& mine = candidates[at::get_thread_num()];
    for (int64_t b = b0; b < b1; ++b) {
      int64_t greater = 0;
      const int64_t stop = std::min(n, (b + 1) * block);
      for (int64_t i = b * block; i < stop; ++i) {
        const uint32_t bits = magnitude_bits(src(i));
        const uint32_t top = bits >> kTopShift;
        greater += top > bin;
        if (top == bin) mine.emplace_back(i, bits);
      }
      counts->greater[b] = greater;
    }
  });
  std::vector<uint32_t> pool;
  for (const auto& mine : candidates)
    for (const auto& candidate : mine) pool.push_back(candidate.second);
  const int block_shift = __builtin_ctzll(static_cast<uint64_t>(block));  // a power of two
  const int64_t need = k - above;
  std::nth_element(pool.begin(), pool.begin() + (need - 1), pool.end(), std::greater<uint32_t>());
  const uint32_t t = pool[need - 1];
  int64_t greater_in_bin = 0;
  for (const auto& mine : candidates) {
    for (const auto& [index, bits] : mine) {
      greater_in_bin += bits > t;
      counts->greater[index >> block_shift] += bits > t;
      counts->equal[index >> block_shift] += bits == t;
    }
  }
  threshold->bits = t;
  threshold->take_equal = need - greater_in_bin;
  return true;
}

// Sample position j * n / m, in 128 bits so that j * n cannot overflow.
inline int64_t sample_position(int64_t j, int64_t n, int64_t m) {
  return static_cast<int64_t>(static_cast<unsigned __int128>(j) * static_cast<uint64_t>(n) /
                              static_cast<uint64_t>(m));
}

template <typename G, typename R>
uint32_t sampled_threshold(const Source<G, R>& src, int64_t n, int64_t m, double density) {
  std::vector<uint32_t> sample(m);
  for (int64_t j = 0; j < m; ++j) sample[j] = magnitude_bits(src(sample_position(j, n, m)));
  const int64_t sample_k = static_cast<int64_t>(std::ceil(density * static_cast<double>(m)));
  std::nth_element(sample.begin(), sample.begin() + (sample_k - 1), sample.end(),
                   std::greater<uint32_t>());
  return sample[sample_k - 1];
}

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
    counts = BlockCounts{};
    if (!exact_threshold(src, n, block, k, &threshold, &counts)) return fail(counts.nonfinite);
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
    std::vector<float> e(block);
    std::vector<uint32_t> magnitude(block);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, length = std::min(n, start + block) - start;
      for (int64_t j = 0; j < length; ++j) e[j] = src(start + j);
      for (int64_t j = 0; j < length; ++j) magnitude[j] = magnitude_bits(e[j]);
      uint8_t* bits_out = bitmap_ptr + start / 8;
      // Entries equal to t: all kept, none kept, or (rarely) the first few by index.
      const int64_t equal_room = std::max<int64_t>(0, take_equal - equal_before[b]);
      uint32_t max_bits = 0;
      if (counts.equal[b] == 0 || equal_room == 0 || equal_room >= counts.equal[b]) {
        const uint32_t keep_from = (counts.equal[b] && equal_room == 0) ? t + 1 : t;
        const int64_t full_bytes = length / 8;
        for (int64_t byte = 0; byte < full_bytes; ++byte) {
          uint32_t packed = 0;
          for (int bit = 0; bit < 8; ++bit) {
            const uint32_t m = magnitude[byte * 8 + bit];
            const uint32_t keep = m >= keep_from;
            packed |= keep << bit;
            max_bits = std::max(max_bits, m & (0u - keep));
          }
          bits_out[byte] = static_cast<uint8_t>(packed);
        }
        if (length % 8) {
          uint32_t packed = 0;
          for (int64_t j = full_bytes * 8; j < length; ++j) {
            const uint32_t keep = magnitude[j] >= keep_from;
            packed |= keep << (j & 7);
            max_bits = std::max(max_bits, magnitude[j] & (0u - keep));
          }
          bits_out[full_bytes] = static_cast<uint8_t>(packed);
        }
      } else {
        std::memset(bits_out, 0, (length + 7) / 8);
        int64_t equal_seen = equal_before[b];
        for (int64_t j = 0; j < length; ++j) {
          const uint32_t m = magnitude[j];
          if (m > t || (m == t && equal_seen++ < take_equal)) {
            bits_out[j >> 3] |= static_cast<uint8_t>(1u << (j & 7));
            max_bits = std::max(max_bits, m);
          }
        }
      }
      float block_max;
      std::memcpy(&block_max, &max_bits, sizeof(block_max));
      const float scale = block_max / qmax;
      scale_ptr[b] = scale;
      if (residual != nullptr) {
        for (int64_t j = 0; j < length; ++j) residual[start + j] = static_cast<R>(e[j]);
      }
      // Kept entries, in index order: walk the set bits of the block's bitmap.
      int64_t slot = offset[b];
      for (int64_t byte = 0; byte < (length + 7) / 8; ++byte) {
        uint32_t packed = bits_out[byte];
        while (packed) {
          const int64_t j = byte * 8 + __builtin_ctz(packed);
          packed &= packed - 1;
          const uint8_t code = encode_value(e[j], scale, value_format);
          value_ptr[slot++] = code;
          if (residual != nullptr) {
            residual[start + j] = static_cast<R>(e[j] - decode_value(code, scale, value_format));
          }
        }
      }
    }
  });
  return std::make_tuple(scales, bitmap, values, int64_t{0});
}

template <typename T>
void decode_typed(const float* scales, const uint8_t* bitmap, const uint8_t* values,
                  int64_t value_count, int64_t n, int64_t block, int64_t value_format, T* out,
                  bool accumulate) {
  const int64_t blocks = (n + block - 1) / block;
  std::vector<int64_t> offset(blocks + 1, 0);
  const int64_t bitmap_bytes = (n + 7) / 8, block_bytes = block / 8;
  // Bits past entry n - 1 in the last byte are padding: ignored, as the reference ignores them.
  const uint32_t last_mask = n % 8 ? (1u << (n % 8)) - 1u : 0xffu;
  auto byte_at = [&](int64_t j) -> uint32_t {
    return j == bitmap_bytes - 1 ? bitmap[j] & last_mask : bitmap[j];
  };
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0;
      const int64_t stop = std::min(bitmap_bytes, (b + 1) * block_bytes);
      for (int64_t j = b * block_bytes; j < stop; ++j) count += __builtin_popcount(byte_at(j));
      offset[b + 1] = count;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] += offset[b];
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, stop = std::min(n, start + block);
      if (!accumulate) std::fill(out + start, out + stop, static_cast<T>(0.0f));
      const float scale = scales[b];
      int64_t slot = offset[b];
      // Entries not kept decode to 0: accumulating leaves them as they are.
      for (int64_t byte = start / 8; byte < (stop + 7) / 8; ++byte) {
        uint32_t packed = byte_at(byte);
        while (packed) {
          const int64_t i = byte * 8 + __builtin_ctz(packed);
          packed &= packed - 1;
          // A damaged bitmap marking more entries than there are values: NaN, not a read
          // past the end (Python checks a whole message's count before it gets here).
          const float decoded = slot < value_count
                                    ? decode_value(values[slot], scale, value_format)
                                    : std::numeric_limits<float>::quiet_NaN();
          ++slot;
          out[i] = static_cast<T>(accumulate ? static_cast<float>(out[i]) + decoded : decoded);
        }
      }
    }
  });
}

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
                           values.data_ptr<uint8_t>(), values.numel(), n, block, value_format,
                           out.data_ptr<scalar_t>(), accumulate);
  });
}

namespace {

void check_format(const char* op, int64_t block, int64_t value_format) {
  TORCH_CHECK(block >= 8 && (block & (block - 1)) == 0, "lightning_3d.", op,
              ": the block size must be a power of two >= 8, got ", block);
  TORCH_CHECK(value_format == kInt8 || value_format == kFp8E4M3, "lightning_3d.", op,
              ": unknown value format code ", value_format);
}

void check_inputs(const at::Tensor& grad, const c10::optional<at::Tensor>& residual,
                  double density, int64_t block, int64_t value_format, int64_t sample_count) {
  // Python sends empty tensors dense; with n = 0 there is no k-th largest entry to select.
  TORCH_CHECK(grad.numel() > 0, "lightning_3d.encode: the input must not be empty");
  TORCH_CHECK(grad.is_contiguous(), "lightning_3d.encode: the input must be contiguous");
  TORCH_CHECK(density > 0.0 && density <= 1.0, "lightning_3d.encode: density must be in (0, 1]");
  TORCH_CHECK(sample_count >= 0 && sample_count <= grad.numel(),
              "lightning_3d.encode: sample_count must be in [0, numel]");
  check_format("encode", block, value_format);
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
  check_inputs(grad, residual, density, block, value_format, sample_count);
  if (grad.is_cuda()) {
#ifdef LIGHTNING_3D_WITH_CUDA
    return encode_cuda(grad, residual, density, block, value_format, sample_count, tolerance);
#else
    TORCH_CHECK(false, "lightning_3d was built without CUDA kernels");
#endif
  }
  return encode_cpu(grad, residual, density, block, value_format, sample_count, tolerance);
}

// `values` may be longer than the bitmap marks (a fixed-size slot's unused room). Entries a
// damaged bitmap marks past the values decode to NaN on both devices: no host round trip, no
// exception from inside a parallel region.
void decode(const at::Tensor& scales, const at::Tensor& bitmap, const at::Tensor& values,
            int64_t n, int64_t block, int64_t value_format, at::Tensor out, bool accumulate) {
  // Python decodes empty messages itself; n = 0 leaves nothing to decode.
  TORCH_CHECK(n > 0, "lightning_3d.decode: the message must not be empty");
  check_format("decode", block, value_format);
  TORCH_CHECK(out.is_contiguous() && out.numel() == n,
              "lightning_3d.decode: out must be contiguous with one entry per encoded entry");
  TORCH_CHECK(scales.device() == out.device() && bitmap.device() == out.device() &&
                  values.device() == out.device(),
              "lightning_3d.decode: scales, bitmap and values must be on out's device (",
              out.device(), ")");
  const int64_t blocks = (n + block - 1) / block;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == blocks,
              "lightning_3d.decode: scales must be float32 with ", blocks, " entries, got ",
              scales.scalar_type(), " with ", scales.numel());
  TORCH_CHECK(bitmap.scalar_type() == at::kByte && bitmap.numel() == (n + 7) / 8,
              "lightning_3d.decode: bitmap must be uint8 with ", (n + 7) / 8, " entries, got ",
              bitmap.scalar_type(), " with ", bitmap.numel());
  TORCH_CHECK(values.scalar_type() == at::kByte, "lightning_3d.decode: values must be uint8, got ",
              values.scalar_type());
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

void encode_into(const at::Tensor& grad, const c10::optional<at::Tensor>& residual, int64_t k,
                 int64_t block, int64_t value_format, at::Tensor scales, at::Tensor bitmap,
                 at::Tensor values, at::Tensor nonfinite) {
  check_inputs(grad, residual, 1.0, block, value_format, 0);
  const int64_t n = grad.numel();
  TORCH_CHECK(k > 0 && k <= n, "lightning_3d.encode_into: k must be in [1, numel], got ", k);
  const int64_t blocks = (n + block - 1) / block;
  for (const at::Tensor* view : {&scales, &bitmap, &values, &nonfinite}) {
    TORCH_CHECK(view->device() == grad.device() && view->is_contiguous(),
                "lightning_3d.encode_into: outputs must be contiguous on the input's device");
  }
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == blocks,
              "lightning_3d.encode_into: scales must be float32 with ", blocks, " entries");
  TORCH_CHECK(bitmap.scalar_type() == at::kByte && bitmap.numel() == (n + 7) / 8,
              "lightning_3d.encode_into: bitmap must be uint8 with ", (n + 7) / 8, " entries");
  TORCH_CHECK(values.scalar_type() == at::kByte && values.numel() == k,
              "lightning_3d.encode_into: values must be uint8 with ", k, " entries");
  TORCH_CHECK(nonfinite.scalar_type() == at::kLong && nonfinite.numel() == 1,
              "lightning_3d.encode_into: nonfinite must be one int64");
#ifdef LIGHTNING_3D_WITH_CUDA
  TORCH_CHECK(grad.is_cuda(), "lightning_3d.encode_into runs on CUDA tensors only");
  encode_into_cuda(grad, residual, k, block, value_format, scales, bitmap, values, nonfinite);
#else
  TORCH_CHECK(false, "lightning_3d was built without CUDA kernels");
#endif
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
  module.def("encode_into", &lightning_3d::encode_into,
             "exact top-k encode into caller-owned views, without host syncs (CUDA)");
  module.def("has_cuda", &lightning_3d::has_cuda, "whether the CUDA kernels were built");
}
