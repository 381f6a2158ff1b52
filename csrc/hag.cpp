// The redundancy-free aggregation of bns_pipe/hooks/redundancy.py on the CPU. With n nodes,
// m aggregates k (inputs u_k, v_k < n + k, weights w_k = (w_k0, w_k1)) and the source rows
// t = [x; a] ((n + m, F): node rows, then aggregate rows):
//
//   hag_product:          a_k = w_k0 t_{u_k} + w_k1 t_{v_k}     for k = 0 .. m-1
//                         y   = C t                              (C: the weighted cover CSR)
//   hag_pairs_backward_:  t_{u_k} += w_k0 t_{n+k};  t_{v_k} += w_k1 t_{n+k}
//                                                                for k = m-1 .. 0
//
// (the backward's table is Cᵀ g, built by spmm before). Creation order is a topological
// order, its reverse one for the backward. Aggregates depend on each other along rows,
// never across columns: threads take column blocks and run every aggregate in order on
// their block, so there is no race and no ordering between threads. The cover product reads
// x and a in place (spmm_rows.h's tail), so x is never copied into a table.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "spmm_rows.h"

#include <cstdint>

namespace bns_pipe {
namespace {

// Columns a thread takes at least (a cache line of float32).
constexpr int64_t kGrainColumns = 16;

void check_pairs(const at::Tensor& inputs, const at::Tensor& weights, const at::Tensor& rows) {
  TORCH_CHECK(inputs.dim() == 2 && inputs.size(1) == 2 && inputs.scalar_type() == at::kLong &&
                  inputs.is_contiguous(),
              "hag: inputs must be (m, 2) int64 contiguous");
  TORCH_CHECK(weights.sizes() == inputs.sizes() && weights.scalar_type() == rows.scalar_type() &&
                  weights.is_contiguous(),
              "hag: weights must be (m, 2), contiguous, of the rows' dtype");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "hag: rows must be 2-D contiguous");
}

// The aggregates' rows on columns [c0, c1): sources below n are x's rows, the rest a's.
template <typename scalar_t>
void pairs_forward(const scalar_t* x, scalar_t* a, const int64_t* in, const scalar_t* w,
                   int64_t n, int64_t m, int64_t F, int64_t c0, int64_t c1) {
  auto source = [&](int64_t j) -> const scalar_t* { return j < n ? x + j * F : a + (j - n) * F; };
  for (int64_t k = 0; k < m; ++k) {
    scalar_t* __restrict__ node = a + k * F;
    const scalar_t* __restrict__ u = source(in[2 * k]);
    const scalar_t* __restrict__ v = source(in[2 * k + 1]);
    const scalar_t wu = w[2 * k], wv = w[2 * k + 1];
    for (int64_t c = c0; c < c1; ++c) node[c] = wu * u[c] + wv * v[c];
  }
}

template <typename scalar_t>
void pairs_backward(scalar_t* t, const int64_t* in, const scalar_t* w, int64_t n, int64_t m,
                    int64_t F, int64_t c0, int64_t c1) {
  for (int64_t k = m - 1; k >= 0; --k) {
    const scalar_t* __restrict__ node = t + (n + k) * F;
    scalar_t* __restrict__ u = t + in[2 * k] * F;
    scalar_t* __restrict__ v = t + in[2 * k + 1] * F;
    const scalar_t wu = w[2 * k], wv = w[2 * k + 1];
    for (int64_t c = c0; c < c1; ++c) {
      u[c] += wu * node[c];
      v[c] += wv * node[c];
    }
  }
}

#ifdef BNS_PIPE_AVX2
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void pairs_forward_avx2(const scalar_t* x, scalar_t* a,
                                                             const int64_t* in, const scalar_t* w,
                                                             int64_t n, int64_t m, int64_t F,
                                                             int64_t c0, int64_t c1) {
  pairs_forward(x, a, in, w, n, m, F, c0, c1);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void pairs_backward_avx2(scalar_t* t, const int64_t* in,
                                                              const scalar_t* w, int64_t n,
                                                              int64_t m, int64_t F, int64_t c0,
                                                              int64_t c1) {
  pairs_backward(t, in, w, n, m, F, c0, c1);
}
#endif

at::Tensor hag_product_cpu(const at::Tensor& x, const at::Tensor& inputs, const at::Tensor& weights,
                           const at::Tensor& indptr, const at::Tensor& indices,
                           const at::Tensor& values) {
  check_pairs(inputs, weights, x);
  const int64_t n = x.size(0), m = inputs.size(0), F = x.size(1);
  const int64_t n_rows = indptr.numel() - 1;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hag_product: x must be float32 or float64");
  TORCH_CHECK(indptr.dim() == 1 && n_rows >= 0 && indptr.scalar_type() == at::kLong &&
                  indptr.is_contiguous() && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous() && indptr.data_ptr<int64_t>()[n_rows] == indices.numel(),
              "hag_product: the cover must be a CSR with int64 indptr and indices");
  TORCH_CHECK(values.dim() == 1 && values.numel() == indices.numel() &&
                  values.scalar_type() == x.scalar_type() && values.is_contiguous(),
              "hag_product: the cover's values must be one per index, of x's dtype");
  at::Tensor a = at::empty({m, F}, x.options());
  at::Tensor out = at::empty({n_rows, F}, x.options());
  if (F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hag_product", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    const int64_t* in = inputs.data_ptr<int64_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, F, kGrainColumns, [&](int64_t c0, int64_t c1) {
#ifdef BNS_PIPE_AVX2
      if (cpu_has_avx2_fma()) return pairs_forward_avx2(xp, ap, in, w, n, m, F, c0, c1);
#endif
      pairs_forward(xp, ap, in, w, n, m, F, c0, c1);
    });
    SpmmArgs<scalar_t> args{indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
                            values.data_ptr<scalar_t>(), xp, nullptr, out.data_ptr<scalar_t>(),
                            F, ap, n};
    spmm_parallel<scalar_t, true, true>(args, n_rows);
  });
  return out;
}

void hag_pairs_backward_cpu(at::Tensor table, const at::Tensor& inputs, const at::Tensor& weights,
                            int64_t n) {
  check_pairs(inputs, weights, table);
  const int64_t m = inputs.size(0), F = table.size(1);
  TORCH_CHECK(n >= 0 && n + m == table.size(0), "hag_pairs_backward_: table must have n + m rows");
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "hag_pairs_backward_", [&] {
    scalar_t* t = table.data_ptr<scalar_t>();
    const int64_t* in = inputs.data_ptr<int64_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, F, kGrainColumns, [&](int64_t c0, int64_t c1) {
#ifdef BNS_PIPE_AVX2
      if (cpu_has_avx2_fma()) return pairs_backward_avx2(t, in, w, n, m, F, c0, c1);
#endif
      pairs_backward(t, in, w, n, m, F, c0, c1);
    });
  });
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def(
      "hag_product(Tensor x, Tensor inputs, Tensor weights, Tensor indptr, Tensor indices, "
      "Tensor values) -> Tensor");
  m.def("hag_pairs_backward_(Tensor(a!) table, Tensor inputs, Tensor weights, int n) -> ()");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("hag_product", &bns_pipe::hag_product_cpu);
  m.impl("hag_pairs_backward_", &bns_pipe::hag_pairs_backward_cpu);
}
