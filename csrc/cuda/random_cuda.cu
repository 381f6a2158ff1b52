// CUDA versions of the ops of csrc/random.cpp, bit-identical to them: the same hash
//   bits(key, c) = mix(key ^ c) >> 40,   mix = splitmix64 finaliser (uint64, wrapping),
// the same threshold test and the same scaling in scalar_t. One thread per element
// (grid-stride); the dropout kernel walks rows by block and columns by thread, so no index
// division is needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../counter_hash.h"

#include <algorithm>
#include <cstdint>

namespace bns_pipe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr float kInv24 = 1.0f / 16777216.0f;

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__global__ void uniform_kernel(uint64_t key, const int64_t* __restrict__ counters,
                               float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = static_cast<float>(bits(key, static_cast<uint64_t>(counters[i]))) * kInv24;
  }
}

__global__ void keep_mask_kernel(uint64_t key, const int64_t* __restrict__ counters,
                                 int64_t threshold, bool* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = bits(key, static_cast<uint64_t>(counters[i])) < threshold;
  }
}

template <typename scalar_t>
__global__ void dropout_rows_kernel(const scalar_t* __restrict__ x,
                                    const int64_t* __restrict__ row_ids,
                                    scalar_t* __restrict__ y, int64_t n_rows, int64_t n_cols,
                                    uint64_t key, int64_t threshold, scalar_t scale) {
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const uint64_t base = static_cast<uint64_t>(row_ids[r]) * static_cast<uint64_t>(n_cols);
    for (int64_t j = threadIdx.x; j < n_cols; j += blockDim.x) {
      const int64_t i = r * n_cols + j;
      const bool keep = bits(key, base + static_cast<uint64_t>(j)) >= threshold;
      y[i] = keep ? static_cast<scalar_t>(x[i] * scale) : scalar_t(0);
    }
  }
}

at::Tensor contiguous_counters(const at::Tensor& counters, const char* op) {
  TORCH_CHECK(counters.scalar_type() == at::kLong, op, ": counters must be int64");
  return counters.contiguous();
}

at::Tensor random_uniform_cuda(int64_t key, const at::Tensor& counters) {
  const c10::cuda::CUDAGuard guard(counters.device());
  const auto c = contiguous_counters(counters, "random_uniform");
  auto out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  const int64_t n = c.numel();
  if (n > 0) {
    uniform_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<uint64_t>(key), c.data_ptr<int64_t>(), out.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor random_keep_mask_cuda(int64_t key, const at::Tensor& counters, int64_t threshold) {
  const c10::cuda::CUDAGuard guard(counters.device());
  const auto c = contiguous_counters(counters, "random_keep_mask");
  auto out = at::empty(c.sizes(), c.options().dtype(at::kBool));
  const int64_t n = c.numel();
  if (n > 0) {
    keep_mask_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<uint64_t>(key), c.data_ptr<int64_t>(), threshold, out.data_ptr<bool>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor keyed_dropout_rows_cuda(const at::Tensor& x, int64_t key, const at::Tensor& row_ids,
                                   int64_t threshold, double scale) {
  TORCH_CHECK(x.dim() == 2, "keyed_dropout_rows: x must be 2-D (R, C)");
  TORCH_CHECK(row_ids.scalar_type() == at::kLong && row_ids.dim() == 1 &&
                  row_ids.numel() == x.size(0),
              "keyed_dropout_rows: row_ids must be int64 of shape (R,)");
  TORCH_CHECK(row_ids.device() == x.device(),
              "keyed_dropout_rows: x and row_ids must be on the same device");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto ids = row_ids.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n_rows = xc.size(0);
  const int64_t n_cols = xc.size(1);
  if (n_rows == 0 || n_cols == 0) {
    return out;
  }
  const auto blocks = static_cast<unsigned int>(std::min(n_rows, kMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "keyed_dropout_rows_cuda", [&] {
        dropout_rows_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            xc.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n_rows,
            n_cols, static_cast<uint64_t>(key), threshold, static_cast<scalar_t>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_IMPL(bns_pipe, CUDA, m) {
  m.impl("random_uniform", &bns_pipe::random_uniform_cuda);
  m.impl("random_keep_mask", &bns_pipe::random_keep_mask_cuda);
  m.impl("keyed_dropout_rows", &bns_pipe::keyed_dropout_rows_cuda);
}
