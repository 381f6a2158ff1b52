// HAG's greedy pair merging (bns_pipe/hooks/redundancy.py: merge_shared_pairs), the same
// algorithm step for step, so both give the same hierarchy:
//
//   each group (at most 64 rows: holders are a bit mask) on its own, in parallel:
//     covers[i] = the neighbours of row i (indptr, indices: a 0/1 matrix (n, n));
//     holders[(u, v)] = the group's rows whose covers hold both u < v;
//     repeatedly take the pair with the most holders (ties: the smallest (u, v)), make it an
//     aggregation node and put the node in place of u and v in every holder;
//   taken by (count descending, group, step), a merge whose inputs were made (or are
//   nodes) reuses the node of its pair (u, v) of global ids if one exists, else gets the
//   next id n, n + 1, ... while fewer than `capacity` exist, else is not made;
//   then each node, in id order, takes the place of its pair in every cover (of any row)
//   holding both: the leaves stay each row's neighbours, and a node made in one island
//   serves every row that holds its pair.
//
// Returns (pairs (m, 2), levels (m,) with level(node) = 1 + max(level(u), level(v)), the
// covers as CSR (indptr (n + 1), indices) with each row ascending).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace bns_pipe {
namespace {

constexpr int64_t kGroupRows = 64;

// Open addressing map (u, v) -> holder mask; keys never leave (a mask may become 0).
class PairMasks {
 public:
  void reset(size_t expected) {
    size_t size = 16;
    while (size < 2 * expected) size <<= 1;
    keys_.assign(size, kEmpty);
    masks_.assign(size, 0);
    used_ = 0;
  }
  uint64_t& at(uint64_t key) {
    if (2 * (used_ + 1) > keys_.size()) grow();
    size_t slot = find(key);
    if (keys_[slot] == kEmpty) {
      keys_[slot] = key;
      ++used_;
    }
    return masks_[slot];
  }
  uint64_t get(uint64_t key) const {
    const size_t slot = find(key);
    return keys_[slot] == kEmpty ? 0 : masks_[slot];
  }
  template <typename Fn>
  void for_each(const Fn& fn) const {
    for (size_t s = 0; s < keys_.size(); ++s)
      if (keys_[s] != kEmpty) fn(keys_[s], masks_[s]);
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  size_t find(uint64_t key) const {
    const size_t mask = keys_.size() - 1;
    size_t slot = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 17) & mask;
    while (keys_[slot] != kEmpty && keys_[slot] != key) slot = (slot + 1) & mask;
    return slot;
  }
  void grow() {
    std::vector<uint64_t> keys = std::move(keys_), masks = std::move(masks_);
    keys_.assign(keys.size() * 2, kEmpty);
    masks_.assign(keys.size() * 2, 0);
    for (size_t s = 0; s < keys.size(); ++s)
      if (keys[s] != kEmpty) {
        const size_t slot = find(keys[s]);
        keys_[slot] = keys[s];
        masks_[slot] = masks[s];
      }
  }
  std::vector<uint64_t> keys_, masks_;
  size_t used_ = 0;
};

uint64_t pair_key(int64_t a, int64_t b) {
  const auto lo = static_cast<uint64_t>(std::min(a, b)), hi = static_cast<uint64_t>(std::max(a, b));
  return (lo << 32) | hi;
}

struct Merge {
  int64_t u, v, count;  // u, v: a node id < n or n + this group's step
};

struct Entry {
  int64_t count;
  uint64_t key;
  bool operator<(const Entry& other) const {  // pops more holders first, then the smaller key
    if (count != other.count) return count < other.count;
    return key > other.key;
  }
};

void erase_value(std::vector<int64_t>& values, int64_t value) {
  auto it = std::find(values.begin(), values.end(), value);
  if (it != values.end()) {
    *it = values.back();
    values.pop_back();
  }
}

// The greedy of one group of rows: its merges, at most `limit`, each of a pair shared by at
// least `min_share` rows.
std::vector<Merge> group_merges(const int64_t* indptr, const int64_t* indices, int64_t n,
                                const int64_t* rows, int64_t n_rows, int64_t limit,
                                int64_t min_share, PairMasks& holders) {
  std::vector<std::vector<int64_t>> covers(n_rows);
  std::vector<int64_t> leaves;  // every row's distinct neighbours, then the frequent ones
  for (int64_t r = 0; r < n_rows; ++r) {
    covers[r].assign(indices + indptr[rows[r]], indices + indptr[rows[r] + 1]);
    std::sort(covers[r].begin(), covers[r].end());
    covers[r].erase(std::unique(covers[r].begin(), covers[r].end()), covers[r].end());
    leaves.insert(leaves.end(), covers[r].begin(), covers[r].end());
  }
  // A neighbour held by fewer than min_share rows is in no pair, and under no aggregation
  // node, that min_share rows share: leaving it out of the covers changes no merge.
  std::sort(leaves.begin(), leaves.end());
  size_t kept = 0;
  for (size_t a = 0, b = 0; a < leaves.size(); a = b) {
    while (b < leaves.size() && leaves[b] == leaves[a]) ++b;
    if (static_cast<int64_t>(b - a) >= min_share) leaves[kept++] = leaves[a];
  }
  leaves.resize(kept);
  size_t expected = 0;
  for (auto& cover : covers) {
    cover.erase(std::remove_if(cover.begin(), cover.end(),
                               [&](int64_t w) {
                                 return !std::binary_search(leaves.begin(), leaves.end(), w);
                               }),
                cover.end());
    expected += cover.size() * cover.size() / 2;
  }
  holders.reset(expected);
  for (int64_t r = 0; r < n_rows; ++r) {
    const auto& c = covers[r];
    for (size_t a = 0; a < c.size(); ++a)
      for (size_t b = a + 1; b < c.size(); ++b) holders.at(pair_key(c[a], c[b])) |= 1ull << r;
  }
  std::priority_queue<Entry> heap;
  holders.for_each([&](uint64_t key, uint64_t mask) {
    const int64_t count = __builtin_popcountll(mask);
    if (count >= min_share) heap.push({count, key});
  });
  std::vector<Merge> merges;
  std::vector<int64_t> touched;
  while (!heap.empty() && static_cast<int64_t>(merges.size()) < limit) {
    const Entry top = heap.top();
    heap.pop();
    const uint64_t mask = holders.get(top.key);
    const int64_t count = __builtin_popcountll(mask);
    if (count != top.count) {  // stale: push its current count back
      if (count >= min_share) heap.push({count, top.key});
      continue;
    }
    const auto u = static_cast<int64_t>(top.key >> 32), v = static_cast<int64_t>(top.key & 0xFFFFFFFFu);
    const int64_t node = n + static_cast<int64_t>(merges.size());
    merges.push_back({u, v, count});
    holders.at(top.key) = 0;
    touched.clear();
    for (uint64_t bits = mask; bits; bits &= bits - 1) {
      const int r = __builtin_ctzll(bits);
      auto& cover = covers[r];
      erase_value(cover, u);
      erase_value(cover, v);
      for (const int64_t w : cover) {
        holders.at(pair_key(u, w)) &= ~(1ull << r);
        holders.at(pair_key(v, w)) &= ~(1ull << r);
        holders.at(pair_key(w, node)) |= 1ull << r;
        touched.push_back(w);
      }
      cover.push_back(node);
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (const int64_t w : touched) {
      const uint64_t key = pair_key(w, node);
      const int64_t size = __builtin_popcountll(holders.get(key));
      if (size >= min_share) heap.push({size, key});
    }
  }
  return merges;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_shared_pairs_cpu(
    const at::Tensor& indptr_t, const at::Tensor& indices_t, const at::Tensor& group_ptr_t,
    const at::Tensor& group_rows_t, int64_t capacity, int64_t min_share) {
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
  TORCH_CHECK(n < (int64_t(1) << 31) && capacity >= 0 && min_share >= 2,
              "merge_shared_pairs: n < 2^31, capacity >= 0, min_share >= 2");
  std::vector<uint8_t> grouped(n, 0);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(gptr[g + 1] - gptr[g] <= kGroupRows, "merge_shared_pairs: a group of more than 64 rows");
    for (int64_t r = gptr[g]; r < gptr[g + 1]; ++r) {
      TORCH_CHECK(grows[r] >= 0 && grows[r] < n && !grouped[grows[r]],
                  "merge_shared_pairs: group rows must be distinct row ids");
      grouped[grows[r]] = 1;
    }
  }

  std::vector<std::vector<Merge>> merges(groups);
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    PairMasks holders;
    for (int64_t g = begin; g < end; ++g)
      merges[g] = group_merges(indptr, indices, n, grows + gptr[g], gptr[g + 1] - gptr[g],
                               capacity, min_share, holders);
  });
  // the first `capacity` merges by (count descending, group, step)
  std::vector<std::tuple<int64_t, int64_t, int64_t>> all;
  for (int64_t g = 0; g < groups; ++g)
    for (size_t j = 0; j < merges[g].size(); ++j)
      all.emplace_back(-merges[g][j].count, g, static_cast<int64_t>(j));
  std::sort(all.begin(), all.end());
  std::vector<std::vector<int64_t>> id(groups);  // group, step -> node id, -1: not made
  std::unordered_map<uint64_t, int64_t> made;      // (u, v) -> node id
  std::vector<int64_t> pairs, level;
  auto global = [&](int64_t g, int64_t ref) { return ref < n ? ref : id[g][ref - n]; };
  auto level_of = [&](int64_t node) { return node < n ? int64_t(0) : level[node - n]; };
  for (const auto& [negative, g, j] : all) {  // a group's earlier steps are decided
    const Merge& merge = merges[g][j];
    const int64_t u = global(g, merge.u), v = global(g, merge.v);
    int64_t node = -1;
    if (u >= 0 && v >= 0) {
      const auto known = made.find(pair_key(u, v));
      if (known != made.end()) {
        node = known->second;
      } else if (static_cast<int64_t>(level.size()) < capacity) {
        node = n + static_cast<int64_t>(level.size());
        made.emplace(pair_key(u, v), node);
        pairs.push_back(std::min(u, v));
        pairs.push_back(std::max(u, v));
        level.push_back(1 + std::max(level_of(u), level_of(v)));
      }
    }
    id[g].push_back(node);
  }
  std::vector<std::vector<int64_t>> covers(n);
  for (int64_t i = 0; i < n; ++i) {
    covers[i].assign(indices + indptr[i], indices + indptr[i + 1]);
    std::sort(covers[i].begin(), covers[i].end());
    covers[i].erase(std::unique(covers[i].begin(), covers[i].end()), covers[i].end());
  }
  // every node, in id order, takes the place of its pair in every row holding both
  const int64_t m = static_cast<int64_t>(level.size());
  std::vector<std::vector<int64_t>> holders_of(n + m);  // a superset of the rows holding x
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e) holders_of[indices[e]].push_back(i);
  auto holds = [](const std::vector<int64_t>& cover, int64_t x) {
    return std::find(cover.begin(), cover.end(), x) != cover.end();
  };
  for (int64_t k = 0; k < m; ++k) {
    const int64_t u = pairs[2 * k], v = pairs[2 * k + 1];
    const auto& a = holders_of[u];
    const auto& b = holders_of[v];
    for (const int64_t r : a.size() <= b.size() ? a : b) {
      auto& cover = covers[r];
      if (!holds(cover, u) || !holds(cover, v)) continue;
      erase_value(cover, u);
      erase_value(cover, v);
      cover.push_back(n + k);
      holders_of[n + k].push_back(r);
    }
  }
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
        "int capacity, int min_share) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("merge_shared_pairs", &bns_pipe::merge_shared_pairs_cpu);
}
