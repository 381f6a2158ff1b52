// Sparse (CSR) times dense on the CPU:
//
//   out[i, :] = acc[i, :] + sum_{e in [indptr[i], indptr[i+1])} values[e] * x[indices[e], :]
//
// A is (n_rows, n_cols) with int64 indptr (n_rows + 1) and indices (nnz), values (nnz) or
// none (all ones); x is (n_cols, F), acc (optional) and out are (n_rows, F), all row-major.
//
// The row kernel (csrc/spmm_rows.h) gathers four rows of x at a time, one thread per range
// of rows of about equal work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "spmm_rows.h"

namespace bns_pipe {
namespace {

at::Tensor spmm_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                    const std::optional<at::Tensor>& values, const at::Tensor& x,
                    const std::optional<at::Tensor>& acc) {
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() >= 1 && indptr.scalar_type() == at::kLong &&
                  indptr.is_contiguous(),
              "spmm: indptr must be a contiguous 1-D int64 tensor of n_rows + 1 entries");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous(),
              "spmm: indices must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "spmm: x must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "spmm: x must be float32 or float64, got ", x.scalar_type());
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t F = x.size(1);
  TORCH_CHECK(indptr.data_ptr<int64_t>()[n_rows] == indices.numel(),
              "spmm: indptr[-1] must equal the number of indices");
  const bool with_values = values.has_value() && values->defined();
  if (with_values) {
    TORCH_CHECK(values->dim() == 1 && values->numel() == indices.numel() &&
                    values->scalar_type() == x.scalar_type() && values->is_contiguous(),
                "spmm: values must be contiguous, 1-D, one per index and of x's dtype");
  }
  const bool with_acc = acc.has_value() && acc->defined();
  if (with_acc) {
    TORCH_CHECK(acc->dim() == 2 && acc->size(0) == n_rows && acc->size(1) == F &&
                    acc->scalar_type() == x.scalar_type() && acc->is_contiguous(),
                "spmm: acc must be a contiguous (n_rows, F) tensor of x's dtype");
  }

  at::Tensor out = at::empty({n_rows, F}, x.options());
  if (n_rows == 0 || F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bns_pipe::spmm", [&] {
    const SpmmArgs<scalar_t> args{indptr.data_ptr<int64_t>(),
                                  indices.data_ptr<int64_t>(),
                                  with_values ? values->data_ptr<scalar_t>() : nullptr,
                                  x.data_ptr<scalar_t>(),
                                  with_acc ? acc->data_ptr<scalar_t>() : nullptr,
                                  out.data_ptr<scalar_t>(),
                                  F};
    if (with_values) {
      spmm_parallel<scalar_t, true>(args, n_rows);
    } else {
      spmm_parallel<scalar_t, false>(args, n_rows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def(
      "spmm(Tensor indptr, Tensor indices, Tensor? values, Tensor x, Tensor? acc=None) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) { m.impl("spmm", &spmm_cpu); }

}  // namespace bns_pipe
