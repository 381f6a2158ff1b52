// CUDA kernels of quantize_rows / dequantize_rows (schemas and CPU kernels in csrc/quant.cpp),
// the same bytes: the grid and the codes are csrc/quant.h's.
//
// quantize: one warp per row (grid-stride over rows): the lanes reduce the row's min and max
//   by shuffles, then each lane writes whole bytes (8/b columns each), so no atomics.
// dequantize: one thread per value.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../quant.h"

#include <algorithm>
#include <cstdint>

namespace bns_pipe {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = 65535;

__global__ void quantize_kernel(const float* __restrict__ x, const int64_t* __restrict__ ids,
                                int64_t m, int64_t width, int n_bits, uint64_t key,
                                uint8_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t nb = code_bytes(width, n_bits);
  const int per_byte = 8 / n_bits;
  for (int64_t r = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < m; r += warps) {
    const float* row = x + r * width;
    float lo = row[0], hi = row[0];
    for (int64_t c = lane; c < width; c += kWarp) {
      lo = fminf(lo, row[c]);
      hi = fmaxf(hi, row[c]);
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffff, lo, offset));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffff, hi, offset));
    }
    const RowGrid grid(lo, hi, static_cast<float>((1 << n_bits) - 1));
    const uint64_t base = static_cast<uint64_t>(ids[r]) * static_cast<uint64_t>(width);
    uint8_t* dst = out + r * (nb + 4);
    for (int64_t byte = lane; byte < nb; byte += kWarp) {
      int packed = 0;
      for (int q = 0; q < per_byte; ++q) {
        const int64_t c = byte * per_byte + q;
        if (c < width) packed |= grid.code(row[c], key, base + c) << (q * n_bits);
      }
      dst[byte] = static_cast<uint8_t>(packed);
    }
    if (lane < 4) dst[nb + lane] = reinterpret_cast<const uint8_t*>(grid.meta)[lane];
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ payload, int64_t m, int64_t width,
                                  int n_bits, float* __restrict__ out) {
  const int64_t nb = code_bytes(width, n_bits);
  const int per_byte = 8 / n_bits;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m * width;
       i += stride) {
    const int64_t r = i / width, c = i % width;
    const uint8_t* src = payload + r * (nb + 4);
    const float lo = bf16_value(static_cast<uint16_t>(src[nb] | (src[nb + 1] << 8)));
    const float step = bf16_value(static_cast<uint16_t>(src[nb + 2] | (src[nb + 3] << 8)));
    const int code = (src[c / per_byte] >> ((c % per_byte) * n_bits)) & ((1 << n_bits) - 1);
    out[i] = lo + static_cast<float>(code) * step;  // code * step is exact: no fma effect
  }
}

unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>(std::clamp<int64_t>((threads + kThreads - 1) / kThreads, 1,
                                                       kMaxBlocks));
}

at::Tensor quantize_rows_cuda(const at::Tensor& x, int64_t n_bits, int64_t key,
                              const at::Tensor& row_ids) {
  check_quantize_inputs(x, n_bits, row_ids);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), width = x.size(1);
  auto out = at::empty({m, code_bytes(width, n_bits) + 4}, x.options().dtype(at::kByte));
  if (m == 0 || width == 0) return out;
  quantize_kernel<<<blocks_for(m * kWarp), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), row_ids.data_ptr<int64_t>(), m, width, static_cast<int>(n_bits),
      static_cast<uint64_t>(key), out.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_rows_cuda(const at::Tensor& payload, int64_t n_bits, int64_t width) {
  check_payload(payload, n_bits, width);
  const c10::cuda::CUDAGuard guard(payload.device());
  const auto p = payload.contiguous();
  const int64_t m = p.size(0);
  auto out = at::empty({m, width}, p.options().dtype(at::kFloat));
  if (m == 0 || width == 0) return out;
  dequantize_kernel<<<blocks_for(m * width), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<uint8_t>(), m, width, static_cast<int>(n_bits), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_IMPL(bns_pipe, CUDA, m) {
  m.impl("quantize_rows", &bns_pipe::quantize_rows_cuda);
  m.impl("dequantize_rows", &bns_pipe::dequantize_rows_cuda);
}
