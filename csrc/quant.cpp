// Halo-message quantization on the CPU, bit-identical to bns_pipe/hooks/quant.py (which states
// the format): per row, lo = min rounded down to bfloat16, step = (max - lo) / L rounded up to
// bfloat16 (L = 2^b - 1), code = clamp(floor((x - lo) / step + u), 0, L) with
// u = bits(key, row_id * F + c) * 2^-24, packed 8/b codes a byte, then lo and step.
//
// quantize_rows(Tensor x, int bits, int key, Tensor row_ids) -> Tensor
//   x (m, F) float32 contiguous, row_ids (m,) int64 -> (m, ceil(F*b/8) + 4) uint8
// dequantize_rows(Tensor payload, int bits, int width) -> Tensor
//   (m, ceil(width*b/8) + 4) uint8 -> (m, width) float32: lo + code * step (code * step is
//   exact in float32: at most 8 + 8 significant bits)
//
// The per-row grid and code are csrc/quant.h's (shared with the CUDA kernels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "quant.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace bns_pipe {
namespace {

constexpr int64_t kGrain = 256;  // rows

// One row's codes, one byte each: a loop without dependences between columns, which the
// compiler vectorises (the hash's 64-bit multiplies too where AVX-512 DQ has them). The
// clamp comes before the truncation to an integer: clamp(floor(v), 0, L) equals
// trunc(clamp(v, 0, L)) for every v, and truncation vectorises where floorf does not.
#define BNS_PIPE_ROW_CODES_BODY                                                           \
  for (int64_t c = 0; c < width; ++c) {                                                  \
    const float u = static_cast<float>(static_cast<int32_t>(mix(key ^ (base + c)) >> 40)) * \
                    (1.0f / 16777216.0f);                                                \
    const float v = (row[c] - lo) / divisor + u;                                         \
    codes[c] = static_cast<uint8_t>(                                                     \
        static_cast<int32_t>(v < 0.0f ? 0.0f : (v > levels ? levels : v)));              \
  }

void row_codes_default(const float* __restrict row, int64_t width, uint64_t key, uint64_t base,
                       float lo, float divisor, float levels, uint8_t* __restrict codes) {
  BNS_PIPE_ROW_CODES_BODY
}

#if defined(__GNUC__) && defined(__x86_64__)
#define BNS_PIPE_X86 1
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))) void row_codes_avx512(
    const float* __restrict row, int64_t width, uint64_t key, uint64_t base, float lo,
    float divisor, float levels, uint8_t* __restrict codes) {
  BNS_PIPE_ROW_CODES_BODY
}

__attribute__((target("avx2"))) void row_codes_avx2(const float* __restrict row, int64_t width,
                                                     uint64_t key, uint64_t base, float lo,
                                                     float divisor, float levels,
                                                     uint8_t* __restrict codes) {
  BNS_PIPE_ROW_CODES_BODY
}
#endif

using RowCodes = void (*)(const float*, int64_t, uint64_t, uint64_t, float, float, float,
                          uint8_t*);

// The widest build this CPU runs (the same codes: only float32 ops in one order).
RowCodes row_codes() {
#ifdef BNS_PIPE_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return row_codes_avx512;
  if (__builtin_cpu_supports("avx2")) return row_codes_avx2;
#endif
  return row_codes_default;
}

// Rows [begin, end) of x (m, width) into out; kBits a compile-time constant, so a code's
// byte and shift are shifts and masks, not divisions.
template <int kBits>
void quantize_range(const float* xs, const int64_t* ids, int64_t width, uint64_t key,
                    uint8_t* os, int64_t begin, int64_t end) {
  constexpr int kPerByte = 8 / kBits;
  const int64_t nb = code_bytes(width, kBits);
  const RowCodes codes_of = row_codes();
  std::vector<uint8_t> codes(nb * kPerByte, 0);  // padded to whole bytes: zero codes
  for (int64_t r = begin; r < end; ++r) {
    const float* row = xs + r * width;
    uint8_t* dst = os + r * (nb + 4);
    float lo = width ? row[0] : 0.0f, hi = lo;
    for (int64_t c = 1; c < width; ++c) {
      lo = std::min(lo, row[c]);
      hi = std::max(hi, row[c]);
    }
    const RowGrid grid(lo, hi, static_cast<float>((1 << kBits) - 1));
    const uint64_t base = static_cast<uint64_t>(ids[r]) * static_cast<uint64_t>(width);
    codes_of(row, width, key, base, grid.lo, grid.divisor, grid.levels, codes.data());
    for (int64_t i = 0; i < nb; ++i) {
      uint8_t byte = 0;
      for (int k = 0; k < kPerByte; ++k) byte |= codes[i * kPerByte + k] << (k * kBits);
      dst[i] = byte;
    }
    std::memcpy(dst + nb, grid.meta, sizeof grid.meta);
  }
}

template <int kBits>
void dequantize_range(const uint8_t* ps, int64_t width, float* os, int64_t begin, int64_t end) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kMask = (1 << kBits) - 1;
  const int64_t nb = code_bytes(width, kBits), whole = width / kPerByte;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* src = ps + r * (nb + 4);
    float* out = os + r * width;
    uint16_t meta[2];
    std::memcpy(meta, src + nb, sizeof meta);
    const float lo = bf16_value(meta[0]), step = bf16_value(meta[1]);
    for (int64_t i = 0; i < whole; ++i) {
      for (int k = 0; k < kPerByte; ++k)
        out[i * kPerByte + k] = lo + static_cast<float>((src[i] >> (k * kBits)) & kMask) * step;
    }
    for (int64_t c = whole * kPerByte; c < width; ++c) {
      const int code = (src[c / kPerByte] >> (static_cast<int>(c % kPerByte) * kBits)) & kMask;
      out[c] = lo + static_cast<float>(code) * step;
    }
  }
}

// fn.template operator()<kBits>() for n_bits in {2, 4, 8}.
template <typename Fn>
void with_bits(int64_t n_bits, const Fn& fn) {
  if (n_bits == 2) return fn(std::integral_constant<int, 2>{});
  if (n_bits == 4) return fn(std::integral_constant<int, 4>{});
  fn(std::integral_constant<int, 8>{});
}

at::Tensor quantize_rows_cpu(const at::Tensor& x, int64_t n_bits, int64_t key,
                             const at::Tensor& row_ids) {
  check_quantize_inputs(x, n_bits, row_ids);
  const int64_t m = x.size(0), width = x.size(1);
  auto out = at::zeros({m, code_bytes(width, n_bits) + 4}, x.options().dtype(at::kByte));
  const float* xs = x.data_ptr<float>();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  uint8_t* os = out.data_ptr<uint8_t>();
  with_bits(n_bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
      quantize_range<kBits>(xs, ids, width, static_cast<uint64_t>(key), os, begin, end);
    });
  });
  return out;
}

at::Tensor dequantize_rows_cpu(const at::Tensor& payload, int64_t n_bits, int64_t width) {
  check_payload(payload, n_bits, width);
  const auto p = payload.contiguous();
  const int64_t m = p.size(0);
  auto out = at::empty({m, width}, p.options().dtype(at::kFloat));
  const uint8_t* ps = p.data_ptr<uint8_t>();
  float* os = out.data_ptr<float>();
  with_bits(n_bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
      dequantize_range<kBits>(ps, width, os, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("quantize_rows(Tensor x, int bits, int key, Tensor row_ids) -> Tensor");
  m.def("dequantize_rows(Tensor payload, int bits, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("dequantize_rows", &dequantize_rows_cpu);
}

}  // namespace bns_pipe
