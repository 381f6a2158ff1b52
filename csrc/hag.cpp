// The aggregation nodes of a redundancy-free aggregation (bns_pipe/hooks/redundancy.py):
//
//   forward:   table[n + k, :] = table[u_k, :] + table[v_k, :]            for k = 0 .. m-1
//   backward:  table[u_k, :] += table[n + k, :]; table[v_k, :] += table[n + k, :]
//                                                                         for k = m-1 .. 0
//
// table is (n + m, F) row-major, inputs (m, 2) int64 with u_k, v_k < n + k, so creation order
// is a topological order (and its reverse one for the backward). Aggregates depend on each
// other along rows, never across columns: threads take column blocks and run every
// aggregate in order on their block, so there is no race and no ordering between threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace bns_pipe {
namespace {

// Columns a thread takes at least (a cache line of float32).
constexpr int64_t kGrainColumns = 16;

void check(const at::Tensor& table, const at::Tensor& inputs, int64_t n) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "pair_sums: table must be 2-D contiguous");
  TORCH_CHECK(inputs.dim() == 2 && inputs.size(1) == 2 && inputs.scalar_type() == at::kLong &&
                  inputs.is_contiguous(),
              "pair_sums: inputs must be (m, 2) int64 contiguous");
  TORCH_CHECK(n >= 0 && n + inputs.size(0) == table.size(0),
              "pair_sums: table must have n + m rows");
}

template <typename scalar_t, bool kBackward>
void run(at::Tensor& table, const at::Tensor& inputs, int64_t n) {
  const int64_t m = inputs.size(0), F = table.size(1);
  scalar_t* t = table.data_ptr<scalar_t>();
  const int64_t* in = inputs.data_ptr<int64_t>();
  at::parallel_for(0, F, kGrainColumns, [&](int64_t c0, int64_t c1) {
    for (int64_t step = 0; step < m; ++step) {
      const int64_t k = kBackward ? m - 1 - step : step;
      scalar_t* __restrict__ node = t + (n + k) * F;
      scalar_t* u = t + in[2 * k] * F;
      scalar_t* v = t + in[2 * k + 1] * F;
      for (int64_t c = c0; c < c1; ++c) {
        if (kBackward) {
          u[c] += node[c];
          v[c] += node[c];
        } else {
          node[c] = u[c] + v[c];
        }
      }
    }
  });
}

void pair_sums_cpu(at::Tensor table, const at::Tensor& inputs, int64_t n) {
  check(table, inputs, n);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "pair_sums",
                             [&] { run<scalar_t, false>(table, inputs, n); });
}

void pair_sums_backward_cpu(at::Tensor table, const at::Tensor& inputs, int64_t n) {
  check(table, inputs, n);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "pair_sums_backward",
                             [&] { run<scalar_t, true>(table, inputs, n); });
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("pair_sums_(Tensor(a!) table, Tensor inputs, int n) -> ()");
  m.def("pair_sums_backward_(Tensor(a!) table, Tensor inputs, int n) -> ()");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("pair_sums_", &bns_pipe::pair_sums_cpu);
  m.impl("pair_sums_backward_", &bns_pipe::pair_sums_backward_cpu);
}
