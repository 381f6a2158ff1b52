// Splitting CSR rows into parallel chunks of about equal work (entries + rows).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

// Calls fn(row_begin, row_end) in parallel for n_parts consecutive row ranges whose
// work indptr[end] + end - (indptr[begin] + begin) is about equal.
template <typename Fn>
void for_balanced_row_ranges(const int64_t* indptr, int64_t n_rows, int64_t n_parts,
                             const Fn& fn) {
  const int64_t work = indptr[n_rows] + n_rows;
  auto part_start = [&](int64_t p) -> int64_t {
    if (p == n_parts) return n_rows;
    const int64_t target = work * p / n_parts;
    int64_t lo = 0, hi = n_rows;  // first row i with indptr[i] + i >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (indptr[mid] + mid < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  };
  at::parallel_for(0, n_parts, 1, [&](int64_t p_begin, int64_t p_end) {
    fn(part_start(p_begin), part_start(p_end));
  });
}
