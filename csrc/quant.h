// The per-row grid of halo-message quantization (bns_pipe/hooks/quant.py states the format),
// for the CPU (csrc/quant.cpp) and CUDA (csrc/cuda/quant_cuda.cu) kernels alike. The
// arithmetic is float32 in the order of the PyTorch fallback's ops (subtract, divide, add,
// floor), so every path gives the same bytes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include "counter_hash.h"

#include <cmath>
#include <cstdint>

namespace bns_pipe {

BNS_PIPE_HOST_DEVICE int64_t code_bytes(int64_t width, int64_t n_bits) {
  return (width * n_bits + 7) / 8;
}

BNS_PIPE_HOST_DEVICE float bf16_value(uint16_t b) {
  return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
}

// value rounded to bfloat16 (nearest even, as Tensor.to(torch.bfloat16)), then one step
// toward -inf (up = false) or +inf (up = true) if the rounding went the other way, as
// torch.nextafter does. Returns the bits.
BNS_PIPE_HOST_DEVICE uint16_t bf16_toward(float value, bool up) {
  const uint16_t b = c10::BFloat16(value).x;
  const float r = bf16_value(b);
  if (!(up ? r < value : r > value)) return b;
  if ((b & 0x7FFF) == 0) return up ? 0x0001 : 0x8001;  // from a zero: the smallest subnormal
  const bool negative = b & 0x8000;
  return static_cast<uint16_t>(negative != up ? b + 1 : b - 1);  // away from : toward zero
}

// lo = min rounded down, step = (max - lo) / levels rounded up; code of a value with its draw.
struct RowGrid {
  uint16_t meta[2];  // bfloat16 bits of lo and step, as they travel
  float lo, divisor, levels;

  BNS_PIPE_HOST_DEVICE RowGrid(float min, float max, float levels_) : levels(levels_) {
    meta[0] = bf16_toward(min, false);
    lo = bf16_value(meta[0]);
    meta[1] = bf16_toward((max - lo) / levels, true);
    const float step = bf16_value(meta[1]);
    divisor = step > 0.0f ? step : 1.0f;
  }

  // clamp(floor((x - lo) / step + u), 0, levels), u = bits(key, counter) * 2^-24
  BNS_PIPE_HOST_DEVICE int code(float x, uint64_t key, uint64_t counter) const {
    const float u = static_cast<float>(bits(key, counter)) * (1.0f / 16777216.0f);
    const float c = floorf((x - lo) / divisor + u);
    return static_cast<int>(c < 0.0f ? 0.0f : (c > levels ? levels : c));
  }
};

inline void check_quantize_inputs(const at::Tensor& x, int64_t n_bits, const at::Tensor& row_ids) {
  TORCH_CHECK(n_bits == 2 || n_bits == 4 || n_bits == 8, "quantize_rows: bits must be 2, 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantize_rows: x must be a contiguous (m, F) float32 tensor");
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.numel() == x.size(0) &&
                  row_ids.scalar_type() == at::kLong && row_ids.is_contiguous() &&
                  row_ids.device() == x.device(),
              "quantize_rows: row_ids must be contiguous int64 on x's device, one id per row");
}

inline void check_payload(const at::Tensor& payload, int64_t n_bits, int64_t width) {
  TORCH_CHECK(n_bits == 2 || n_bits == 4 || n_bits == 8,
              "dequantize_rows: bits must be 2, 4 or 8");
  TORCH_CHECK(payload.dim() == 2 && payload.scalar_type() == at::kByte &&
                  payload.size(1) == code_bytes(width, n_bits) + 4,
              "dequantize_rows: payload must be (m, ceil(width * bits / 8) + 4) uint8");
}

}  // namespace bns_pipe
