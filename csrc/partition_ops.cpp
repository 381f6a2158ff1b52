// Partition-local CSR build: the in-edges of a part's inner nodes, relabelled to local ids.
//
// build_local_csr(global_indptr, global_indices, rows, local_of) -> (indptr, indices)
//   global_indptr (N+1,), global_indices (E,): the global graph, row v = in-neighbours of v.
//   rows (R,): global ids of the part's inner nodes, in local order.
//   local_of (N,): local id of every global node in this part (inner, then halo), -1 if absent.
// Row r of the result holds local_of[u] for every in-neighbour u of rows[r], sorted ascending.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>

namespace {

std::tuple<at::Tensor, at::Tensor> build_local_csr_cpu(const at::Tensor& global_indptr,
                                                       const at::Tensor& global_indices,
                                                       const at::Tensor& rows,
                                                       const at::Tensor& local_of) {
  for (const auto* t : {&global_indptr, &global_indices, &rows, &local_of}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "build_local_csr: expected contiguous 1-D int64 tensors");
  }
  TORCH_CHECK(global_indptr.numel() == local_of.numel() + 1,
              "build_local_csr: global_indptr must have N+1 entries for N = local_of.numel()");
  const int64_t n_rows = rows.numel();
  const int64_t n_nodes = local_of.numel();
  const int64_t* gptr = global_indptr.data_ptr<int64_t>();
  const int64_t* gidx = global_indices.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* local = local_of.data_ptr<int64_t>();

  auto indptr = at::empty({n_rows + 1}, rows.options());
  int64_t* ptr = indptr.data_ptr<int64_t>();
  ptr[0] = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t v = row[r];
    TORCH_CHECK(v >= 0 && v < n_nodes, "build_local_csr: row id out of range");
    ptr[r + 1] = ptr[r] + (gptr[v + 1] - gptr[v]);
  }
  auto indices = at::empty({ptr[n_rows]}, rows.options());
  int64_t* out = indices.data_ptr<int64_t>();
  std::atomic<bool> missing{false};
  at::parallel_for(0, n_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t v = row[r];
      int64_t* dst = out + ptr[r];
      for (int64_t e = gptr[v]; e < gptr[v + 1]; ++e) {
        const int64_t id = local[gidx[e]];
        if (id < 0) missing.store(true, std::memory_order_relaxed);
        *dst++ = id;
      }
      std::sort(out + ptr[r], dst);
    }
  });
  TORCH_CHECK(!missing.load(), "build_local_csr: an in-neighbour has no local id (local_of = -1)");
  return {indptr, indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("build_local_csr(Tensor global_indptr, Tensor global_indices, Tensor rows, "
        "Tensor local_of) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) { m.impl("build_local_csr", &build_local_csr_cpu); }
