// The CPU row kernel of a CSR product, shared by spmm.cpp and hag.cpp:
//
//   out[i, :] = acc[i, :] + sum_{e in [indptr[i], indptr[i+1])} values[e] * src(indices[e])
//
// src(j) is row j of x, or with a tail (kTail) row j - n_head of tail for j >= n_head, so a
// product can read [x; tail] without the two being copied into one table.
//
// The product is bound by the latency of gathering source rows at random. Rows of A are split
// into one range per thread of about equal nnz + n_rows; within a row, four entries are taken
// per step, so four independent source rows are in flight at once, and their weighted sum is
// added to the output row (which stays in L1) by a contiguous loop over F that g++ -O3
// vectorises. On x86-64 the same loop is also compiled for AVX2 and chosen at run time.
#pragma once

#include <ATen/Parallel.h>

#include "cpu_features.h"
#include "row_ranges.h"

#include <algorithm>
#include <cstdint>

namespace bns_pipe {

template <typename scalar_t>
struct SpmmArgs {
  const int64_t* indptr;
  const int64_t* indices;
  const scalar_t* values;  // nullptr: all ones
  const scalar_t* x;
  const scalar_t* acc;  // nullptr: start from zero
  scalar_t* out;
  int64_t F;
  const scalar_t* tail = nullptr;  // kTail: source rows n_head.. are tail's rows 0..
  int64_t n_head = 0;
};

// Output rows [begin, end).
template <typename scalar_t, bool kValues, bool kTail>
__attribute__((always_inline)) inline void spmm_rows(const SpmmArgs<scalar_t>& a, int64_t begin,
                                                     int64_t end) {
  const int64_t F = a.F;
  auto weight = [&](int64_t e) { return kValues ? a.values[e] : scalar_t(1); };
  auto source = [&](int64_t e) -> const scalar_t* {
    const int64_t j = a.indices[e];
    return kTail && j >= a.n_head ? a.tail + (j - a.n_head) * F : a.x + j * F;
  };
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
      const scalar_t* __restrict__ x0 = source(e);
      const scalar_t* __restrict__ x1 = source(e + 1);
      const scalar_t* __restrict__ x2 = source(e + 2);
      const scalar_t* __restrict__ x3 = source(e + 3);
      const scalar_t v0 = weight(e), v1 = weight(e + 1), v2 = weight(e + 2), v3 = weight(e + 3);
      for (int64_t k = 0; k < F; ++k) {
        y[k] += (v0 * x0[k] + v1 * x1[k]) + (v2 * x2[k] + v3 * x3[k]);
      }
    }
    for (; e < stop; ++e) {
      const scalar_t* __restrict__ x0 = source(e);
      const scalar_t v0 = weight(e);
      for (int64_t k = 0; k < F; ++k) y[k] += v0 * x0[k];
    }
  }
}

#ifdef BNS_PIPE_AVX2
template <typename scalar_t, bool kValues, bool kTail>
__attribute__((target("avx2,fma"))) void spmm_rows_avx2(const SpmmArgs<scalar_t>& a,
                                                         int64_t begin, int64_t end) {
  spmm_rows<scalar_t, kValues, kTail>(a, begin, end);
}
#endif

template <typename scalar_t, bool kValues, bool kTail>
void spmm_rows_best(const SpmmArgs<scalar_t>& a, int64_t begin, int64_t end) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2_fma()) return spmm_rows_avx2<scalar_t, kValues, kTail>(a, begin, end);
#endif
  spmm_rows<scalar_t, kValues, kTail>(a, begin, end);
}

// All n_rows rows, split into ranges of about equal work (row i starts at indptr[i] + i);
// a range is not split across threads below 2^16 multiply-adds (times F).
template <typename scalar_t, bool kValues, bool kTail = false>
void spmm_parallel(const SpmmArgs<scalar_t>& a, int64_t n_rows) {
  constexpr int64_t kGrainWork = 1 << 16;
  const int64_t work = a.indptr[n_rows] + n_rows;
  const int64_t n_parts = std::clamp<int64_t>(work * std::max<int64_t>(a.F, 1) / kGrainWork, 1,
                                              at::get_num_threads());
  for_balanced_row_ranges(a.indptr, n_rows, n_parts, [&](int64_t begin, int64_t end) {
    spmm_rows_best<scalar_t, kValues, kTail>(a, begin, end);
  });
}

}  // namespace bns_pipe
