// Sparse (CSR) times dense on the CPU:
//
//   out[i, :] = acc[i, :] + sum_{e in [indptr[i], indptr[i+1])} values[e] * x[indices[e], :]
//
// A is (n_rows, n_cols) with int64 indptr (n_rows + 1) and indices (nnz), values (nnz) or
// none (all ones); x is (n_cols, F), acc (optional) and out are (n_rows, F), all row-major.
//
// The product is bound by the latency of gathering rows of x at random. Rows of A are split
// into one range per thread of about equal nnz + n_rows; within a row, four entries are taken
// per step, so four independent rows of x are in flight at once, and their weighted sum is
// added to the output row (which stays in L1) by a contiguous loop over F that g++ -O3
// vectorises. On x86-64 the same loop is also compiled for AVX2 and chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "row_ranges.h"

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define BNS_PIPE_AVX2 1
#endif

namespace bns_pipe {
namespace {

// Multiply-adds (times F) below which a range is not split across threads.
constexpr int64_t kGrainWork = 1 << 16;

template <typename scalar_t>
struct SpmmArgs {
  const int64_t* indptr;
  const int64_t* indices;
  const scalar_t* values;  // nullptr: all ones
  const scalar_t* x;
  const scalar_t* acc;  // nullptr: start from zero
  scalar_t* out;
  int64_t F;
};

// Output rows [begin, end).
template <typename scalar_t, bool kValues>
__attribute__((always_inline)) inline void spmm_rows(const SpmmArgs<scalar_t>& a, int64_t begin,
                                                     int64_t end) {
  const int64_t F = a.F;
  auto weight = [&](int64_t e) { return kValues ? a.values[e] : scalar_t(1); };
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* __restrict__ y = a.out + i * F;
    if (a.acc != nullptr) {
      const scalar_t* __restrict__ init = a.acc + i * F;
      for (int64_t k = 0; k < F; ++k) y[k] = init[k];
    } else {
      for (int64_t k = 0; k < F; ++k) y[k] = scalar_t(0);
    }
    int64_t e = a.indptr[i];
    const int64_t stop = a.indptr[i + 1];
    for (; e + 4 <= stop; e += 4) {
      const scalar_t* __restrict__ x0 = a.x + a.indices[e] * F;
      const scalar_t* __restrict__ x1 = a.x + a.indices[e + 1] * F;
      const scalar_t* __restrict__ x2 = a.x + a.indices[e + 2] * F;
      const scalar_t* __restrict__ x3 = a.x + a.indices[e + 3] * F;
      const scalar_t v0 = weight(e), v1 = weight(e + 1), v2 = weight(e + 2), v3 = weight(e + 3);
      for (int64_t k = 0; k < F; ++k) {
        y[k] += (v0 * x0[k] + v1 * x1[k]) + (v2 * x2[k] + v3 * x3[k]);
      }
    }
    for (; e < stop; ++e) {
      const scalar_t* __restrict__ x0 = a.x + a.indices[e] * F;
      const scalar_t v0 = weight(e);
      for (int64_t k = 0; k < F; ++k) y[k] += v0 * x0[k];
    }
  }
}

#ifdef BNS_PIPE_AVX2
template <typename scalar_t, bool kValues>
__attribute__((target("avx2,fma"))) void spmm_rows_avx2(const SpmmArgs<scalar_t>& a,
                                                         int64_t begin, int64_t end) {
  spmm_rows<scalar_t, kValues>(a, begin, end);
}
#endif

template <typename scalar_t, bool kValues>
void spmm_rows_best(const SpmmArgs<scalar_t>& a, int64_t begin, int64_t end) {
#ifdef BNS_PIPE_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return spmm_rows_avx2<scalar_t, kValues>(a, begin, end);
#endif
  spmm_rows<scalar_t, kValues>(a, begin, end);
}

// All rows, split into ranges of about equal work: row i starts at indptr[i] + i.
template <typename scalar_t, bool kValues>
void spmm_parallel(const SpmmArgs<scalar_t>& a, int64_t n_rows) {
  const int64_t* indptr = a.indptr;
  const int64_t work = indptr[n_rows] + n_rows;
  const int64_t n_parts = std::clamp<int64_t>(work * std::max<int64_t>(a.F, 1) / kGrainWork, 1,
                                              at::get_num_threads());
  for_balanced_row_ranges(indptr, n_rows, n_parts, [&](int64_t begin, int64_t end) {
    spmm_rows_best<scalar_t, kValues>(a, begin, end);
  });
}

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
