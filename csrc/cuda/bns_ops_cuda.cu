// CUDA kernels of the BNS ops (schemas and CPU kernels in csrc/bns_ops.cpp), with the same
// results: scaling is v * scalar_t(scale), rounded once; filtered entries keep their order.
//
// filter_csr_columns: one thread per row counts its kept entries, a cumsum gives the output
//   indptr, and one thread per row writes them (column c becomes rank(c) - 1, where rank is the
//   inclusive cumsum of keep). filter_csr_rows: the kept rows by nonzero, their lengths'
//   cumsum, then one block per kept row copies its entries. pack_rows / scatter_add_rows: one
//   block per row of the index, threads over features; scatter_add_rows adds with atomics, so
//   repeated indices accumulate in an unspecified order (as torch's index_add_ on CUDA).
// The filters read the output size back to the host once (a synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace bns_pipe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

using Csr = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

unsigned int blocks_per_row(int64_t n_rows) {
  return static_cast<unsigned int>(std::clamp<int64_t>(n_rows, 1, kMaxBlocks));
}

bool has_values(const std::optional<at::Tensor>& values) {
  return values.has_value() && values->defined();
}

void check_csr(const at::Tensor& indptr, const at::Tensor& indices,
               const std::optional<at::Tensor>& values, const at::Tensor& keep, const char* op) {
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() >= 1 && indptr.scalar_type() == at::kLong &&
                  indptr.is_contiguous(),
              op, ": indptr must be a contiguous 1-D int64 tensor of n_rows + 1 entries");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indices.device() == indptr.device(),
              op, ": indices must be a contiguous 1-D int64 tensor on indptr's device");
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool && keep.is_contiguous() &&
                  keep.device() == indptr.device(),
              op, ": keep must be a contiguous 1-D bool tensor on indptr's device");
  if (has_values(values)) {
    TORCH_CHECK(values->dim() == 1 && values->numel() == indices.numel() &&
                    values->is_contiguous() && values->device() == indptr.device() &&
                    (values->scalar_type() == at::kFloat || values->scalar_type() == at::kDouble),
                op, ": values must be contiguous float32 or float64, one per index, on indptr's "
                "device");
  }
}

int64_t last(const at::Tensor& t) { return t[t.numel() - 1].item<int64_t>(); }

// The output values: (nnz,) of the input values' dtype, or an empty float32 tensor without them.
at::Tensor empty_values(const std::optional<at::Tensor>& values, int64_t nnz,
                        const at::Tensor& like) {
  if (has_values(values)) return at::empty({nnz}, values->options());
  return at::empty({0}, like.options().dtype(at::kFloat));
}

__global__ void count_kept_kernel(const int64_t* __restrict__ indptr,
                                  const int64_t* __restrict__ indices,
                                  const bool* __restrict__ keep, int64_t n_rows, int64_t n_cols,
                                  int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows;
       r += stride) {
    int64_t count = 0;
    for (int64_t e = indptr[r]; e < indptr[r + 1]; ++e) {
      const int64_t c = indices[e];
      CUDA_KERNEL_ASSERT(c >= 0 && c < n_cols);
      count += keep[c];
    }
    counts[r] = count;
  }
}

template <typename scalar_t>
__global__ void fill_kept_columns_kernel(const int64_t* __restrict__ indptr,
                                         const int64_t* __restrict__ indices,
                                         const scalar_t* __restrict__ values,  // may be nullptr
                                         const bool* __restrict__ keep,
                                         const int64_t* __restrict__ rank, int64_t n_rows,
                                         const int64_t* __restrict__ out_indptr,
                                         int64_t* __restrict__ out_indices,
                                         scalar_t* __restrict__ out_values, scalar_t s) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows;
       r += stride) {
    int64_t k = out_indptr[r];
    for (int64_t e = indptr[r]; e < indptr[r + 1]; ++e) {
      const int64_t c = indices[e];
      if (keep[c]) {
        out_indices[k] = rank[c] - 1;
        if (values != nullptr) out_values[k] = values[e] * s;
        ++k;
      }
    }
  }
}

template <typename scalar_t>
__global__ void copy_rows_kernel(const int64_t* __restrict__ indptr,
                                 const int64_t* __restrict__ indices,
                                 const scalar_t* __restrict__ values,  // may be nullptr
                                 const int64_t* __restrict__ rows, int64_t n_kept,
                                 const int64_t* __restrict__ out_indptr,
                                 int64_t* __restrict__ out_indices,
                                 scalar_t* __restrict__ out_values, scalar_t s) {
  for (int64_t k = blockIdx.x; k < n_kept; k += gridDim.x) {
    const int64_t from = indptr[rows[k]];
    const int64_t to = out_indptr[k];
    const int64_t len = out_indptr[k + 1] - to;
    for (int64_t e = threadIdx.x; e < len; e += blockDim.x) {
      out_indices[to + e] = indices[from + e];
      if (values != nullptr) out_values[to + e] = values[from + e] * s;
    }
  }
}

template <typename scalar_t>
__global__ void pack_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ index,
                                 int64_t n, int64_t m, int64_t F, scalar_t s,
                                 scalar_t* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const int64_t i = index[r];
    CUDA_KERNEL_ASSERT(i >= 0 && i < n);
    for (int64_t f = threadIdx.x; f < F; f += blockDim.x) out[r * F + f] = x[i * F + f] * s;
  }
}

template <typename scalar_t>
__global__ void scatter_add_rows_kernel(scalar_t* __restrict__ out,
                                        const int64_t* __restrict__ index,
                                        const scalar_t* __restrict__ rows, int64_t n, int64_t m,
                                        int64_t F, scalar_t s) {
  for (int64_t r = blockIdx.x; r < m; r += gridDim.x) {
    const int64_t i = index[r];
    CUDA_KERNEL_ASSERT(i >= 0 && i < n);
    for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
      const scalar_t v = rows[r * F + f] * s;
      gpuAtomicAdd(out + i * F + f, v);
    }
  }
}

Csr filter_csr_columns_cuda(const at::Tensor& indptr, const at::Tensor& indices,
                            const std::optional<at::Tensor>& values, const at::Tensor& keep,
                            double scale) {
  check_csr(indptr, indices, values, keep, "filter_csr_columns");
  const c10::cuda::CUDAGuard guard(indptr.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t n_cols = keep.numel();
  const auto rank = at::cumsum(keep, 0, at::kLong);

  auto out_indptr = at::zeros({n_rows + 1}, indptr.options());
  if (n_rows > 0) {
    count_kept_kernel<<<blocks_for(n_rows), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), keep.data_ptr<bool>(), n_rows,
        n_cols, out_indptr.data_ptr<int64_t>() + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out_indptr.narrow(0, 1, n_rows).cumsum_(0);
  }
  const int64_t nnz = last(out_indptr);
  auto out_indices = at::empty({nnz}, indices.options());
  auto out_values = empty_values(values, nnz, indptr);
  if (nnz == 0) return {out_indptr, out_indices, out_values};
  AT_DISPATCH_FLOATING_TYPES(out_values.scalar_type(), "filter_csr_columns_cuda", [&] {
    fill_kept_columns_kernel<scalar_t><<<blocks_for(n_rows), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
        has_values(values) ? values->data_ptr<scalar_t>() : nullptr, keep.data_ptr<bool>(),
        rank.data_ptr<int64_t>(), n_rows, out_indptr.data_ptr<int64_t>(),
        out_indices.data_ptr<int64_t>(),
        has_values(values) ? out_values.data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_indptr, out_indices, out_values};
}

Csr filter_csr_rows_cuda(const at::Tensor& indptr, const at::Tensor& indices,
                         const std::optional<at::Tensor>& values, const at::Tensor& keep,
                         double scale) {
  check_csr(indptr, indices, values, keep, "filter_csr_rows");
  const int64_t n_rows = indptr.numel() - 1;
  TORCH_CHECK(keep.numel() == n_rows, "filter_csr_rows: keep must have one entry per row (",
              n_rows, "), got ", keep.numel());
  const c10::cuda::CUDAGuard guard(indptr.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const auto rows = at::nonzero(keep).view({-1});
  const int64_t n_kept = rows.numel();
  const auto lengths = indptr.index_select(0, rows + 1) - indptr.index_select(0, rows);
  const auto out_indptr = at::cat({at::zeros({1}, indptr.options()), at::cumsum(lengths, 0)});
  const int64_t nnz = last(out_indptr);
  auto out_indices = at::empty({nnz}, indices.options());
  auto out_values = empty_values(values, nnz, indptr);
  if (nnz == 0) return {out_indptr, out_indices, out_values};
  AT_DISPATCH_FLOATING_TYPES(out_values.scalar_type(), "filter_csr_rows_cuda", [&] {
    copy_rows_kernel<scalar_t><<<blocks_per_row(n_kept), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
        has_values(values) ? values->data_ptr<scalar_t>() : nullptr, rows.data_ptr<int64_t>(),
        n_kept, out_indptr.data_ptr<int64_t>(), out_indices.data_ptr<int64_t>(),
        has_values(values) ? out_values.data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_indptr, out_indices, out_values};
}

void check_rows(const at::Tensor& x, const at::Tensor& index, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": expected a 2-D float32 or float64 tensor, got ", x.dim(), "-D ",
              x.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong &&
                  index.device() == x.device(),
              op, ": index must be a 1-D int64 tensor on the rows' device");
}

at::Tensor pack_rows_cuda(const at::Tensor& x, const at::Tensor& index, double scale) {
  check_rows(x, index, "pack_rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto idx = index.contiguous();
  const int64_t m = idx.numel();
  const int64_t F = xc.size(1);
  auto out = at::empty({m, F}, xc.options());
  if (m == 0 || F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "pack_rows_cuda", [&] {
    pack_rows_kernel<scalar_t>
        <<<blocks_per_row(m), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            xc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), xc.size(0), m, F,
            static_cast<scalar_t>(scale), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void scatter_add_rows_cuda(const at::Tensor& out, const at::Tensor& index, const at::Tensor& rows,
                           double scale) {
  check_rows(out, index, "scatter_add_rows");
  TORCH_CHECK(out.is_contiguous(), "scatter_add_rows: out must be contiguous");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == index.numel() && rows.size(1) == out.size(1) &&
                  rows.scalar_type() == out.scalar_type() && rows.device() == out.device(),
              "scatter_add_rows: rows must be (len(index), F) of out's dtype and device");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto rc = rows.contiguous();
  const auto idx = index.contiguous();
  const int64_t m = idx.numel();
  const int64_t F = out.size(1);
  if (m == 0 || F == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scatter_add_rows_cuda", [&] {
    scatter_add_rows_kernel<scalar_t>
        <<<blocks_per_row(m), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            out.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), rc.data_ptr<scalar_t>(),
            out.size(0), m, F, static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_IMPL(bns_pipe, CUDA, m) {
  m.impl("filter_csr_columns", &bns_pipe::filter_csr_columns_cuda);
  m.impl("filter_csr_rows", &bns_pipe::filter_csr_rows_cuda);
  m.impl("pack_rows", &bns_pipe::pack_rows_cuda);
  m.impl("scatter_add_rows", &bns_pipe::scatter_add_rows_cuda);
}
