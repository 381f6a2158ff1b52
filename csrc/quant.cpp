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

namespace bns_pipe {
namespace {

constexpr int64_t kGrain = 256;  // rows

// Rows [begin, end) of x (m, width) into out; kBits a compile-time constant, so a code's
// byte and shift are shifts and masks, not divisions.
template <int kBits>
void quantize_range(const float* xs, const int64_t* ids, int64_t width, uint64_t key,
                    uint8_t* os, int64_t begin, int64_t end) {
  constexpr int kPerByte = 8 / kBits;
  const int64_t nb = code_bytes(width, kBits);
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
    for (int64_t c = 0; c < width; ++c) {
      const int shift = static_cast<int>(c % kPerByte) * kBits;
      dst[c / kPerByte] |= static_cast<uint8_t>(grid.code(row[c], key, base + c) << shift);
    }
    std::memcpy(dst + nb, grid.meta, sizeof grid.meta);
  }
}

template <int kBits>
void dequantize_range(const uint8_t* ps, int64_t width, float* os, int64_t begin, int64_t end) {
  constexpr int kPerByte = 8 / kBits;
  const int64_t nb = code_bytes(width, kBits);
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* src = ps + r * (nb + 4);
    uint16_t meta[2];
    std::memcpy(meta, src + nb, sizeof meta);
    const float lo = bf16_value(meta[0]), step = bf16_value(meta[1]);
    for (int64_t c = 0; c < width; ++c) {
      const int code = (src[c / kPerByte] >> (static_cast<int>(c % kPerByte) * kBits)) &
                       ((1 << kBits) - 1);
      os[r * width + c] = lo + static_cast<float>(code) * step;
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
