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
// The arithmetic is float32 in the order of the PyTorch ops (subtract, divide, add, floor);
// no multiply-add is fused where it could change a rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "counter_hash.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace bns_pipe {
namespace {

constexpr float kInv24 = 1.0f / 16777216.0f;
constexpr int64_t kGrain = 256;  // rows

uint16_t bf16_bits(c10::BFloat16 v) { return v.x; }

c10::BFloat16 from_bits(uint16_t b) { return c10::BFloat16(b, c10::BFloat16::from_bits()); }

// One bfloat16 step from v toward -inf (down) or +inf (up), as torch.nextafter.
c10::BFloat16 next_toward(c10::BFloat16 v, bool up) {
  const uint16_t b = bf16_bits(v);
  const bool negative = b & 0x8000;
  const bool zero = (b & 0x7FFF) == 0;
  if (zero) return from_bits(up ? 0x0001 : 0x8001);
  return from_bits((negative != up) ? b + 1 : b - 1);  // away from zero : toward zero
}

// value rounded to bfloat16, then one step toward -inf / +inf if the rounding went the other way.
c10::BFloat16 round_toward(float value, bool up) {
  const c10::BFloat16 rounded(value);  // round to nearest even, as Tensor.to(torch.bfloat16)
  const float r = static_cast<float>(rounded);
  return (up ? r < value : r > value) ? next_toward(rounded, up) : rounded;
}

int64_t code_bytes(int64_t width, int64_t bits) { return (width * bits + 7) / 8; }

void check_bits(int64_t n_bits) {
  TORCH_CHECK(n_bits == 2 || n_bits == 4 || n_bits == 8, "quantize: bits must be 2, 4 or 8");
}

at::Tensor quantize_rows_cpu(const at::Tensor& x, int64_t n_bits, int64_t key,
                             const at::Tensor& row_ids) {
  check_bits(n_bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantize_rows: x must be a contiguous (m, F) float32 tensor");
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.numel() == x.size(0) &&
                  row_ids.scalar_type() == at::kLong && row_ids.is_contiguous(),
              "quantize_rows: row_ids must be contiguous int64 with one id per row");
  const int64_t m = x.size(0), width = x.size(1), nb = code_bytes(width, n_bits);
  auto out = at::zeros({m, nb + 4}, x.options().dtype(at::kByte));
  const float* xs = x.data_ptr<float>();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  uint8_t* os = out.data_ptr<uint8_t>();
  const float levels = static_cast<float>((1 << n_bits) - 1);
  const int per_byte = static_cast<int>(8 / n_bits);
  const uint64_t k = static_cast<uint64_t>(key);
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xs + r * width;
      uint8_t* dst = os + r * (nb + 4);
      float lo_f = width ? row[0] : 0.0f, hi_f = lo_f;
      for (int64_t c = 1; c < width; ++c) {
        lo_f = std::min(lo_f, row[c]);
        hi_f = std::max(hi_f, row[c]);
      }
      const c10::BFloat16 lo = round_toward(lo_f, false);
      const float lo_v = static_cast<float>(lo);
      const float spread = hi_f - lo_v;
      const c10::BFloat16 step = round_toward(spread / levels, true);
      const float step_v = static_cast<float>(step);
      const float divisor = step_v > 0.0f ? step_v : 1.0f;
      const uint64_t base = static_cast<uint64_t>(ids[r]) * static_cast<uint64_t>(width);
      for (int64_t c = 0; c < width; ++c) {
        const float u = static_cast<float>(bits(k, base + static_cast<uint64_t>(c))) * kInv24;
        const float scaled = (row[c] - lo_v) / divisor;
        const float code = std::min(std::max(std::floor(scaled + u), 0.0f), levels);
        const int shift = static_cast<int>((c % per_byte) * n_bits);
        dst[c / per_byte] |= static_cast<uint8_t>(static_cast<int>(code) << shift);
      }
      const uint16_t meta[2] = {bf16_bits(lo), bf16_bits(step)};
      std::memcpy(dst + nb, meta, sizeof meta);
    }
  });
  return out;
}

at::Tensor dequantize_rows_cpu(const at::Tensor& payload, int64_t n_bits, int64_t width) {
  check_bits(n_bits);
  const int64_t nb = code_bytes(width, n_bits);
  TORCH_CHECK(payload.dim() == 2 && payload.scalar_type() == at::kByte &&
                  payload.size(1) == nb + 4,
              "dequantize_rows: payload must be (m, ceil(width * bits / 8) + 4) uint8");
  const auto p = payload.contiguous();
  const int64_t m = p.size(0);
  auto out = at::empty({m, width}, p.options().dtype(at::kFloat));
  const uint8_t* ps = p.data_ptr<uint8_t>();
  float* os = out.data_ptr<float>();
  const int per_byte = static_cast<int>(8 / n_bits);
  const int mask = (1 << n_bits) - 1;
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* src = ps + r * (nb + 4);
      uint16_t meta[2];
      std::memcpy(meta, src + nb, sizeof meta);
      const float lo = static_cast<float>(from_bits(meta[0]));
      const float step = static_cast<float>(from_bits(meta[1]));
      for (int64_t c = 0; c < width; ++c) {
        const int code = (src[c / per_byte] >> ((c % per_byte) * n_bits)) & mask;
        os[r * width + c] = lo + static_cast<float>(code) * step;
      }
    }
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
