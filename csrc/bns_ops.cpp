// Boundary-node sampling (BNS) ops on the CPU; see bns_pipe/sampling.py for their use.
//
// filter_csr_columns(indptr, indices, values?, keep, scale) -> (indptr, indices, values)
//   A (n_rows, n_cols) -> A[:, keep] * scale (n_rows, n_kept): entries of dropped columns are
//   removed, column c becomes its rank among the kept columns, row order and the order of
//   entries within a row are kept. keep is bool (n_cols,). One pass counts each row's kept
//   entries, a prefix sum gives the output indptr, a second pass writes the entries.
// filter_csr_rows(indptr, indices, values?, keep, scale) -> (indptr, indices, values)
//   A (n_rows, n_cols) -> A[keep, :] * scale (n_kept, n_cols); keep is bool (n_rows,). The
//   output indptr is a prefix sum over the kept rows' lengths; their entries are then copied.
// Both filters return an empty values tensor when none were given (all ones, not scaled).
// pack_rows(x, index, scale) -> out
//   out[r, :] = x[index[r], :] * scale; x (n, F), index (m,), out (m, F).
// scatter_add_rows(out!, index, rows, scale) -> ()
//   out[index[r], :] += rows[r, :] * scale for r = 0, 1, ..., m - 1 in this order, so repeated
//   indices accumulate exactly as torch's index_add_ of rows * scale.
//
// Scaling is v * scalar_t(scale), rounded once, as torch's multiplication by a Python float.
// Every op checks its indices before reading through them. Parallel work is split into ranges
// of about equal work; the outputs do not depend on the number of threads. The row loops of
// pack_rows and scatter_add_rows are latency bound (random rows); on x86-64 they are also
// compiled for AVX2 (not FMA: a fused multiply-add would round differently from torch) and
// chosen at run time, which keeps more rows in flight.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "row_ranges.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_features.h"

namespace bns_pipe {
namespace {

// Elements (entries or scalars) below which a range runs serially.
constexpr int64_t kGrain = 1 << 15;

using Csr = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

bool has_values(const std::optional<at::Tensor>& values) {
  return values.has_value() && values->defined();
}

void check_csr(const at::Tensor& indptr, const at::Tensor& indices,
               const std::optional<at::Tensor>& values, const at::Tensor& keep, const char* op) {
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() >= 1 && indptr.scalar_type() == at::kLong &&
                  indptr.is_contiguous(),
              op, ": indptr must be a contiguous 1-D int64 tensor of n_rows + 1 entries");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              op, ": indices must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(indptr.data_ptr<int64_t>()[0] == 0 &&
                  indptr.data_ptr<int64_t>()[indptr.numel() - 1] == indices.numel(),
              op, ": indptr must start at 0 and end at the number of indices");
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool && keep.is_contiguous(), op,
              ": keep must be a contiguous 1-D bool tensor");
  if (has_values(values)) {
    TORCH_CHECK(values->dim() == 1 && values->numel() == indices.numel() &&
                    values->is_contiguous() &&
                    (values->scalar_type() == at::kFloat || values->scalar_type() == at::kDouble),
                op, ": values must be contiguous float32 or float64, one per index");
  }
}

// Calls fn(begin, end) on ranges of rows [0, n_rows) of about equal nnz + rows, in parallel.
template <typename Fn>
void for_row_ranges(const int64_t* indptr, int64_t n_rows, const Fn& fn) {
  const int64_t n_parts =
      std::clamp<int64_t>((indptr[n_rows] + n_rows) / kGrain, 1, at::get_num_threads());
  for_balanced_row_ranges(indptr, n_rows, n_parts, fn);
}

// indptr[r + 1] holds the length of row r on entry and the end of row r on return.
void inclusive_prefix_sum(int64_t* indptr, int64_t n_rows) {
  indptr[0] = 0;
  for (int64_t r = 0; r < n_rows; ++r) indptr[r + 1] += indptr[r];
}

// dst[k] = src[k] * s for k in [0, n).
template <typename scalar_t>
__attribute__((always_inline)) inline void scaled_copy(const scalar_t* __restrict__ src,
                                                       scalar_t* __restrict__ dst, int64_t n,
                                                       scalar_t s) {
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k] * s;
}

// The kept columns as a bitmap with a rank directory (n_cols / 4 bytes in all, so the random
// lookups of a column filter stay in cache): rank(c) is the number of kept columns below c.
class KeptColumns {
 public:
  KeptColumns(const bool* keep, int64_t n_cols)
      : words_((n_cols + 63) / 64), before_(words_.size()) {
    for (int64_t c = 0; c < n_cols; ++c) words_[c >> 6] |= uint64_t{keep[c]} << (c & 63);
    int64_t total = 0;
    for (size_t w = 0; w < words_.size(); ++w) {
      before_[w] = total;
      total += std::popcount(words_[w]);
    }
  }

  bool kept(int64_t c) const { return (words_[c >> 6] >> (c & 63)) & 1; }

  int64_t rank(int64_t c) const {
    const uint64_t below = (uint64_t{1} << (c & 63)) - 1;
    return before_[c >> 6] + std::popcount(words_[c >> 6] & below);
  }

 private:
  std::vector<uint64_t> words_;
  std::vector<int64_t> before_;
};

Csr filter_csr_columns_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                           const std::optional<at::Tensor>& values, const at::Tensor& keep,
                           double scale) {
  check_csr(indptr, indices, values, keep, "filter_csr_columns");
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t n_cols = keep.numel();
  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const int64_t* col = indices.data_ptr<int64_t>();

  const KeptColumns cols(keep.data_ptr<bool>(), n_cols);

  auto out_indptr = at::empty({n_rows + 1}, indptr.options());
  int64_t* optr = out_indptr.data_ptr<int64_t>();
  std::atomic<bool> out_of_range{false};
  for_row_ranges(ptr, n_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t count = 0;
      for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
        const int64_t c = col[e];
        if (c < 0 || c >= n_cols) {
          out_of_range.store(true, std::memory_order_relaxed);
          continue;
        }
        count += cols.kept(c);
      }
      optr[r + 1] = count;
    }
  });
  TORCH_CHECK(!out_of_range.load(), "filter_csr_columns: a column index is outside [0, ",
              n_cols, ")");
  inclusive_prefix_sum(optr, n_rows);

  const int64_t nnz = optr[n_rows];
  auto out_indices = at::empty({nnz}, indices.options());
  int64_t* ocol = out_indices.data_ptr<int64_t>();
  if (!has_values(values)) {
    for_row_ranges(ptr, n_rows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t k = optr[r];
        for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
          if (cols.kept(col[e])) ocol[k++] = cols.rank(col[e]);
        }
      }
    });
    return {out_indptr, out_indices, at::empty({0}, indptr.options().dtype(at::kFloat))};
  }
  auto out_values = at::empty({nnz}, values->options());
  AT_DISPATCH_FLOATING_TYPES(values->scalar_type(), "filter_csr_columns", [&] {
    const scalar_t* val = values->data_ptr<scalar_t>();
    scalar_t* oval = out_values.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    for_row_ranges(ptr, n_rows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t k = optr[r];
        for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
          if (cols.kept(col[e])) {
            ocol[k] = cols.rank(col[e]);
            oval[k] = val[e] * s;
            ++k;
          }
        }
      }
    });
  });
  return {out_indptr, out_indices, out_values};
}

Csr filter_csr_rows_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                        const std::optional<at::Tensor>& values, const at::Tensor& keep,
                        double scale) {
  check_csr(indptr, indices, values, keep, "filter_csr_rows");
  const int64_t n_rows = indptr.numel() - 1;
  TORCH_CHECK(keep.numel() == n_rows, "filter_csr_rows: keep must have one entry per row (",
              n_rows, "), got ", keep.numel());
  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const bool* kept = keep.data_ptr<bool>();

  // The kept rows in order, and the output indptr from their lengths.
  std::vector<int64_t> rows;
  rows.reserve(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (kept[r]) rows.push_back(r);
  }
  const auto n_kept = static_cast<int64_t>(rows.size());
  auto out_indptr = at::empty({n_kept + 1}, indptr.options());
  int64_t* optr = out_indptr.data_ptr<int64_t>();
  for (int64_t k = 0; k < n_kept; ++k) optr[k + 1] = ptr[rows[k] + 1] - ptr[rows[k]];
  inclusive_prefix_sum(optr, n_kept);

  const int64_t nnz = optr[n_kept];
  auto out_indices = at::empty({nnz}, indices.options());
  const int64_t* col = indices.data_ptr<int64_t>();
  int64_t* ocol = out_indices.data_ptr<int64_t>();
  if (!has_values(values)) {
    for_row_ranges(optr, n_kept, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        std::copy(col + ptr[rows[k]], col + ptr[rows[k] + 1], ocol + optr[k]);
      }
    });
    return {out_indptr, out_indices, at::empty({0}, indptr.options().dtype(at::kFloat))};
  }
  auto out_values = at::empty({nnz}, values->options());
  AT_DISPATCH_FLOATING_TYPES(values->scalar_type(), "filter_csr_rows", [&] {
    const scalar_t* val = values->data_ptr<scalar_t>();
    scalar_t* oval = out_values.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    for_row_ranges(optr, n_kept, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t from = ptr[rows[k]];
        const int64_t len = ptr[rows[k] + 1] - from;
        std::copy(col + from, col + from + len, ocol + optr[k]);
        scaled_copy(val + from, oval + optr[k], len, s);
      }
    });
  });
  return {out_indptr, out_indices, out_values};
}

// pack_rows on rows [begin, end): dst[r, :] = src[id[r], :] * s.
template <typename scalar_t>
__attribute__((always_inline)) inline void pack_range(const scalar_t* src, const int64_t* id,
                                                      scalar_t* dst, int64_t F, scalar_t s,
                                                      int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) scaled_copy(src + id[r] * F, dst + r * F, F, s);
}

// scatter_add_rows on columns [f0, f1): dst[id[r], f] += src[r, f] * s for r = 0, ..., m - 1.
template <typename scalar_t>
__attribute__((always_inline)) inline void scatter_columns(const scalar_t* src, const int64_t* id,
                                                           scalar_t* dst, int64_t m, int64_t F,
                                                           scalar_t s, int64_t f0, int64_t f1) {
  for (int64_t r = 0; r < m; ++r) {
    const scalar_t* __restrict__ a = src + r * F;
    scalar_t* __restrict__ y = dst + id[r] * F;
    for (int64_t f = f0; f < f1; ++f) y[f] += a[f] * s;
  }
}

#ifdef BNS_PIPE_AVX2
template <typename scalar_t>
__attribute__((target("avx2"))) void pack_range_avx2(const scalar_t* src, const int64_t* id,
                                                     scalar_t* dst, int64_t F, scalar_t s,
                                                     int64_t begin, int64_t end) {
  pack_range(src, id, dst, F, s, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2"))) void scatter_columns_avx2(const scalar_t* src, const int64_t* id,
                                                          scalar_t* dst, int64_t m, int64_t F,
                                                          scalar_t s, int64_t f0, int64_t f1) {
  scatter_columns(src, id, dst, m, F, s, f0, f1);
}
#endif

template <typename scalar_t>
void pack_range_best(const scalar_t* src, const int64_t* id, scalar_t* dst, int64_t F, scalar_t s,
                     int64_t begin, int64_t end) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2()) return pack_range_avx2(src, id, dst, F, s, begin, end);
#endif
  pack_range(src, id, dst, F, s, begin, end);
}

template <typename scalar_t>
void scatter_columns_best(const scalar_t* src, const int64_t* id, scalar_t* dst, int64_t m,
                          int64_t F, scalar_t s, int64_t f0, int64_t f1) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2()) return scatter_columns_avx2(src, id, dst, m, F, s, f0, f1);
#endif
  scatter_columns(src, id, dst, m, F, s, f0, f1);
}

void check_rows(const at::Tensor& x, const at::Tensor& index, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": expected a 2-D float32 or float64 tensor, got ", x.dim(), "-D ",
              x.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op,
              ": index must be a 1-D int64 tensor");
}

// Throws unless every index[r] is in [0, n).
void check_range(const int64_t* index, int64_t m, int64_t n, const char* op) {
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t r = begin; r < end; ++r) bad |= index[r] < 0 || index[r] >= n;
    if (bad) out_of_range.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK(!out_of_range.load(), op, ": an index is outside [0, ", n, ")");
}

at::Tensor pack_rows_cpu(const at::Tensor& x, const at::Tensor& index, double scale) {
  check_rows(x, index, "pack_rows");
  const auto xc = x.contiguous();
  const auto idx = index.contiguous();
  const int64_t n = xc.size(0);
  const int64_t F = xc.size(1);
  const int64_t m = idx.numel();
  const int64_t* id = idx.data_ptr<int64_t>();
  check_range(id, m, n, "pack_rows");
  auto out = at::empty({m, F}, xc.options());
  if (m == 0 || F == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "pack_rows", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    at::parallel_for(0, m, std::max<int64_t>(1, kGrain / F), [&](int64_t begin, int64_t end) {
      pack_range_best(src, id, dst, F, s, begin, end);
    });
  });
  return out;
}

// Feature columns are split among threads in whole cache lines: every thread walks all rows in
// order over its own columns, so repeated indices need no atomics and the sum order is fixed.
void scatter_add_rows_cpu(const at::Tensor& out, const at::Tensor& index, const at::Tensor& rows,
                          double scale) {
  check_rows(out, index, "scatter_add_rows");
  TORCH_CHECK(out.is_contiguous(), "scatter_add_rows: out must be contiguous");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == index.numel() && rows.size(1) == out.size(1) &&
                  rows.scalar_type() == out.scalar_type(),
              "scatter_add_rows: rows must be (len(index), F) of out's dtype");
  const auto rc = rows.contiguous();
  const auto idx = index.contiguous();
  const int64_t F = out.size(1);
  const int64_t m = idx.numel();
  const int64_t* id = idx.data_ptr<int64_t>();
  check_range(id, m, out.size(0), "scatter_add_rows");
  if (m == 0 || F == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scatter_add_rows", [&] {
    const scalar_t* src = rc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    constexpr int64_t line = 64 / sizeof(scalar_t);
    const int64_t n_lines = (F + line - 1) / line;
    const int64_t n_parts =
        std::clamp<int64_t>(m * F / kGrain, 1, std::min<int64_t>(n_lines, at::get_num_threads()));
    auto part_start = [&](int64_t p) { return std::min(F, n_lines * p / n_parts * line); };
    at::parallel_for(0, n_parts, 1, [&](int64_t p_begin, int64_t p_end) {
      const int64_t f0 = part_start(p_begin);
      scatter_columns_best(src, id, dst, m, F, s, f0, part_start(p_end));
    });
  });
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("filter_csr_columns(Tensor indptr, Tensor indices, Tensor? values, Tensor keep, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("filter_csr_rows(Tensor indptr, Tensor indices, Tensor? values, Tensor keep, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("pack_rows(Tensor x, Tensor index, float scale) -> Tensor");
  m.def("scatter_add_rows(Tensor(a!) out, Tensor index, Tensor rows, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("filter_csr_columns", &bns_pipe::filter_csr_columns_cpu);
  m.impl("filter_csr_rows", &bns_pipe::filter_csr_rows_cpu);
  m.impl("pack_rows", &bns_pipe::pack_rows_cpu);
  m.impl("scatter_add_rows", &bns_pipe::scatter_add_rows_cpu);
}
