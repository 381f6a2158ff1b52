// CUDA kernel of bns_pipe::spmm (schema and CPU kernel in csrc/spmm.cpp):
//
//   out[i, :] = acc[i, :] + sum_{e in [indptr[i], indptr[i+1])} values[e] * x[indices[e], :]
//
// One warp per output row; lane l accumulates columns l, l + 32, ... in a register, so each
// gathered row of x is read by coalesced 32-wide loads and each output element is written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace bns_pipe {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

template <typename scalar_t>
__global__ void spmm_kernel(const int64_t* __restrict__ indptr,
                            const int64_t* __restrict__ indices,
                            const scalar_t* __restrict__ values,  // nullptr: all ones
                            const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ acc,  // nullptr: start from zero
                            scalar_t* __restrict__ out, int64_t n_rows, int64_t F) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= n_rows) return;
  const int64_t begin = indptr[row];
  const int64_t end = indptr[row + 1];
  for (int64_t f = threadIdx.x; f < F; f += kWarp) {
    scalar_t sum = acc != nullptr ? acc[row * F + f] : scalar_t(0);
    for (int64_t e = begin; e < end; ++e) {
      const scalar_t v = values != nullptr ? values[e] : scalar_t(1);
      sum += v * x[indices[e] * F + f];
    }
    out[row * F + f] = sum;
  }
}

at::Tensor spmm_cuda(const at::Tensor& indptr, const at::Tensor& indices,
                     const std::optional<at::Tensor>& values, const at::Tensor& x,
                     const std::optional<at::Tensor>& acc) {
  // The CPU kernel's checks, except indptr[-1] == nnz, which would synchronise the device.
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() >= 1 && indptr.scalar_type() == at::kLong &&
                  indptr.is_contiguous() && indptr.device() == x.device(),
              "spmm: indptr must be a contiguous 1-D int64 tensor of n_rows + 1 entries on x's "
              "device");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indices.device() == x.device(),
              "spmm: indices must be a contiguous 1-D int64 tensor on x's device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "spmm: x must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "spmm: x must be float32 or float64, got ", x.scalar_type());
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t F = x.size(1);
  const bool with_values = values.has_value() && values->defined();
  if (with_values) {
    TORCH_CHECK(values->dim() == 1 && values->numel() == indices.numel() &&
                    values->scalar_type() == x.scalar_type() && values->is_contiguous() &&
                    values->device() == x.device(),
                "spmm: values must be contiguous, 1-D, one per index and of x's dtype and device");
  }
  const bool with_acc = acc.has_value() && acc->defined();
  if (with_acc) {
    TORCH_CHECK(acc->dim() == 2 && acc->size(0) == n_rows && acc->size(1) == F &&
                    acc->scalar_type() == x.scalar_type() && acc->is_contiguous() &&
                    acc->device() == x.device(),
                "spmm: acc must be a contiguous (n_rows, F) tensor of x's dtype and device");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({n_rows, F}, x.options());
  if (n_rows == 0 || F == 0) return out;
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned int>((n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bns_pipe::spmm_cuda", [&] {
    spmm_kernel<scalar_t><<<grid, block, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
        with_values ? values->data_ptr<scalar_t>() : nullptr, x.data_ptr<scalar_t>(),
        with_acc ? acc->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), n_rows, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bns_pipe, CUDA, m) { m.impl("spmm", &spmm_cuda); }

}  // namespace bns_pipe
