// HAG's greedy pair merging (bns_pipe/hooks/redundancy.py: merge_shared_pairs), the same
// algorithm step for step, so both give the same hierarchy:
//
//   covers[i] = the neighbours of row i (indptr, indices: a 0/1 matrix (n, n));
//   holders[(g, u, v)] = the rows of group g whose covers hold both u < v;
//   repeatedly take the key with the most holders (ties: the smallest (g, u, v)), give the
//   pair (u, v) an aggregation node (a new one, id n + m, while m < capacity, or the one an
//   earlier group made), and in every holder replace u and v by it, updating the counts.
//
// Returns (pairs (m, 2), levels (m,) with level(node) = 1 + max(level(u), level(v)), the
// covers as CSR (indptr (n + 1), indices) with each row ascending). Single-threaded: the
// merges depend on each other.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace bns_pipe {
namespace {

using Key = std::tuple<int64_t, int64_t, int64_t>;  // (group, u, v), u < v

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = static_cast<uint64_t>(std::get<0>(k)) * 0x9E3779B97F4A7C15ull;
    h ^= static_cast<uint64_t>(std::get<1>(k)) + 0x7F4A7C159E3779B9ull + (h << 6) + (h >> 2);
    h ^= static_cast<uint64_t>(std::get<2>(k)) + 0x94D049BB133111EBull + (h << 6) + (h >> 2);
    return static_cast<size_t>(h);
  }
};

struct Entry {
  int64_t count;
  Key key;
  // priority_queue pops the largest: more holders first, then the smallest key
  bool operator<(const Entry& other) const {
    if (count != other.count) return count < other.count;
    return key > other.key;
  }
};

Key ordered(int64_t g, int64_t a, int64_t b) { return a < b ? Key{g, a, b} : Key{g, b, a}; }

void erase_value(std::vector<int64_t>& values, int64_t value) {
  auto it = std::find(values.begin(), values.end(), value);
  if (it != values.end()) {
    *it = values.back();
    values.pop_back();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_shared_pairs_cpu(
    const at::Tensor& indptr_t, const at::Tensor& indices_t, const at::Tensor& group_ptr_t,
    const at::Tensor& group_rows_t, int64_t capacity) {
  TORCH_CHECK(indptr_t.scalar_type() == at::kLong && indices_t.scalar_type() == at::kLong &&
                  group_ptr_t.scalar_type() == at::kLong && group_rows_t.scalar_type() == at::kLong,
              "merge_shared_pairs: int64 tensors expected");
  const at::Tensor indptr_c = indptr_t.contiguous(), indices_c = indices_t.contiguous();
  const at::Tensor gptr_c = group_ptr_t.contiguous(), grows_c = group_rows_t.contiguous();
  const int64_t* indptr = indptr_c.data_ptr<int64_t>();
  const int64_t* indices = indices_c.data_ptr<int64_t>();
  const int64_t* gptr = gptr_c.data_ptr<int64_t>();
  const int64_t* grows = grows_c.data_ptr<int64_t>();
  const int64_t n = indptr_c.numel() - 1, groups = gptr_c.numel() - 1;

  std::vector<std::vector<int64_t>> covers(n);
  for (int64_t i = 0; i < n; ++i) {
    covers[i].assign(indices + indptr[i], indices + indptr[i + 1]);
    std::sort(covers[i].begin(), covers[i].end());
    covers[i].erase(std::unique(covers[i].begin(), covers[i].end()), covers[i].end());
  }
  std::unordered_map<Key, std::vector<int64_t>, KeyHash> holders;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = gptr[g]; r < gptr[g + 1]; ++r) {
      const int64_t dest = grows[r];
      const auto& members = covers[dest];
      for (size_t a = 0; a < members.size(); ++a)
        for (size_t b = a + 1; b < members.size(); ++b)
          holders[Key{g, members[a], members[b]}].push_back(dest);
    }
  }
  std::priority_queue<Entry> heap;
  for (const auto& [key, rows] : holders)
    if (rows.size() > 1) heap.push({static_cast<int64_t>(rows.size()), key});

  std::unordered_map<uint64_t, int64_t> made;  // (u, v) → node id
  auto pair_id = [](int64_t u, int64_t v) {
    return (static_cast<uint64_t>(u) << 32) ^ static_cast<uint64_t>(v);
  };
  std::vector<int64_t> pairs, level;
  auto level_of = [&](int64_t node) { return node < n ? int64_t(0) : level[node - n]; };
  while (!heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto found = holders.find(top.key);
    const int64_t current = found == holders.end() ? 0 : static_cast<int64_t>(found->second.size());
    if (current != top.count) {  // stale: push its current count back
      if (current > 1) heap.push({current, top.key});
      continue;
    }
    const auto [g, u, v] = top.key;
    int64_t node;
    auto known = made.find(pair_id(u, v));
    if (known != made.end()) {
      node = known->second;
    } else {
      if (static_cast<int64_t>(pairs.size()) / 2 >= capacity) continue;
      node = n + static_cast<int64_t>(pairs.size()) / 2;
      made[pair_id(u, v)] = node;
      pairs.push_back(u);
      pairs.push_back(v);
      level.push_back(1 + std::max(level_of(u), level_of(v)));
    }
    const std::vector<int64_t> shared = std::move(found->second);
    holders.erase(found);
    std::vector<Key> touched;
    for (const int64_t dest : shared) {
      auto& cover = covers[dest];
      erase_value(cover, u);
      erase_value(cover, v);
      for (const int64_t w : cover) {
        auto uw = holders.find(ordered(g, u, w));
        if (uw != holders.end()) erase_value(uw->second, dest);
        auto vw = holders.find(ordered(g, v, w));
        if (vw != holders.end()) erase_value(vw->second, dest);
        const Key fresh = ordered(g, w, node);
        holders[fresh].push_back(dest);
        touched.push_back(fresh);
      }
      cover.push_back(node);
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (const Key& key : touched) {
      const auto size = static_cast<int64_t>(holders[key].size());
      if (size > 1) heap.push({size, key});
    }
  }
  const int64_t m = static_cast<int64_t>(level.size());
  at::Tensor out_pairs = at::empty({m, 2}, indptr_c.options());
  std::copy(pairs.begin(), pairs.end(), out_pairs.data_ptr<int64_t>());
  at::Tensor out_level = at::empty({m}, indptr_c.options());
  std::copy(level.begin(), level.end(), out_level.data_ptr<int64_t>());
  at::Tensor cover_ptr = at::empty({n + 1}, indptr_c.options());
  int64_t* cp = cover_ptr.data_ptr<int64_t>();
  cp[0] = 0;
  for (int64_t i = 0; i < n; ++i) cp[i + 1] = cp[i] + static_cast<int64_t>(covers[i].size());
  at::Tensor cover_idx = at::empty({cp[n]}, indptr_c.options());
  int64_t* ci = cover_idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    std::sort(covers[i].begin(), covers[i].end());
    std::copy(covers[i].begin(), covers[i].end(), ci + cp[i]);
  }
  return {out_pairs, out_level, cover_ptr, cover_idx};
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("merge_shared_pairs(Tensor indptr, Tensor indices, Tensor group_ptr, Tensor group_rows, "
        "int capacity) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("merge_shared_pairs", &bns_pipe::merge_shared_pairs_cpu);
}
