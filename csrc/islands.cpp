// I-GCN's island search (bns_pipe/hooks/island.py: find_islands), the same steps in the same
// order, so both give the same hubs, islands and order:
//
//   while threshold >= floor: the unclassified nodes of degree >= threshold become hubs (id
//   order); for each, in id order, a breadth-first search from each unclassified neighbour
//   (CSR order) over unclassified nodes grows an island of at most max_island nodes;
//   threshold /= 2 (the first round always runs: a hub_degree below the floor is honoured
//   once). Then islands grow the same way from each node still unclassified.
//
// Returns (hubs (h,), island_ptr (k + 1,), island_nodes (n - h,) island by island in search
// order, order (n,): hub, its islands, next hub, ..., then the islands of no hub).
// Single-threaded: each search depends on what the previous ones classified; it is linear in
// the edges.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace bns_pipe {
namespace {

at::Tensor to_tensor(const std::vector<int64_t>& values) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
  std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> find_islands_cpu(
    const at::Tensor& indptr_t, const at::Tensor& indices_t, int64_t threshold, int64_t floor,
    int64_t max_island) {
  TORCH_CHECK(indptr_t.scalar_type() == at::kLong && indices_t.scalar_type() == at::kLong,
              "find_islands: int64 indptr and indices expected");
  TORCH_CHECK(max_island >= 1, "find_islands: max_island must be at least 1");
  TORCH_CHECK(floor >= 1, "find_islands: floor must be at least 1");
  const at::Tensor indptr_c = indptr_t.contiguous(), indices_c = indices_t.contiguous();
  const int64_t* ptr = indptr_c.data_ptr<int64_t>();
  const int64_t* nbr = indices_c.data_ptr<int64_t>();
  const int64_t n = indptr_c.numel() - 1;

  std::vector<uint8_t> unclassified(n, 1);
  std::vector<int64_t> hubs, island_ptr{0}, members, order;
  members.reserve(n);
  order.reserve(n);
  // one island from start; the island itself is the search's queue
  auto grow = [&](int64_t start) {
    const size_t begin = members.size();
    const auto full = [&] { return static_cast<int64_t>(members.size() - begin) >= max_island; };
    members.push_back(start);
    unclassified[start] = 0;
    for (size_t head = begin; head < members.size() && !full(); ++head) {
      const int64_t node = members[head];
      for (int64_t e = ptr[node]; e < ptr[node + 1] && !full(); ++e) {
        const int64_t j = nbr[e];
        if (unclassified[j]) {
          unclassified[j] = 0;
          members.push_back(j);
        }
      }
    }
    island_ptr.push_back(static_cast<int64_t>(members.size()));
    order.insert(order.end(), members.begin() + begin, members.end());
  };

  std::vector<int64_t> fresh;
  for (bool first = true; first || threshold >= floor; first = false, threshold /= 2) {
    fresh.clear();
    for (int64_t i = 0; i < n; ++i)
      if (unclassified[i] && ptr[i + 1] - ptr[i] >= threshold) fresh.push_back(i);
    for (const int64_t hub : fresh) unclassified[hub] = 0;
    for (const int64_t hub : fresh) {
      hubs.push_back(hub);
      order.push_back(hub);
      for (int64_t e = ptr[hub]; e < ptr[hub + 1]; ++e)
        if (unclassified[nbr[e]]) grow(nbr[e]);
    }
  }
  for (int64_t i = 0; i < n; ++i)
    if (unclassified[i]) grow(i);
  return {to_tensor(hubs), to_tensor(island_ptr), to_tensor(members), to_tensor(order)};
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("find_islands(Tensor indptr, Tensor indices, int threshold, int floor, int max_island) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) { m.impl("find_islands", &bns_pipe::find_islands_cpu); }
