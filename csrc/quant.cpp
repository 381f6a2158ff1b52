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

namespace bns_pipe {
namespace {

constexpr int64_t kGrain = 256;  // rows

at::Tensor quantize_rows_cpu(const at::Tensor& x, int64_t n_bits, int64_t key,
                             const at::Tensor& row_ids) {
  check_quantize_inputs(x, n_bits, row_ids);
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
      const RowGrid grid(lo_f, hi_f, levels);
      const uint64_t base = static_cast<uint64_t>(ids[r]) * static_cast<uint64_t>(width);
      for (int64_t c = 0; c < width; ++c) {
        const int shift = static_cast<int>((c % per_byte) * n_bits);
        dst[c / per_byte] |= static_cast<uint8_t>(grid.code(row[c], k, base + c) << shift);
      }
      std::memcpy(dst + nb, grid.meta, sizeof grid.meta);
    }
  });
  return out;
}

at::Tensor dequantize_rows_cpu(const at::Tensor& payload, int64_t n_bits, int64_t width) {
  check_payload(payload, n_bits, width);
  const int64_t nb = code_bytes(width, n_bits);
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
      const float lo = bf16_value(meta[0]), step = bf16_value(meta[1]);
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
