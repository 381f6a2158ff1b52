// Counter-based random numbers (see bns_pipe/random.py for the specification), on the CPU.
//
//   mix(z)       = splitmix64 finaliser of z (uint64, wrapping)
//   bits(key, c) = mix(key ^ c) >> 40                   24 random bits
//   u(key, c)    = bits(key, c) * 2^-24                 float32, exact
//
// random_uniform(int key, Tensor counters) -> Tensor
//   u(key, c) for every int64 counter, as float32 of the counters' shape.
// random_keep_mask(int key, Tensor counters, int threshold) -> Tensor
//   bits(key, c) < threshold, as bool; threshold = ceil(p * 2^24) makes this u < p.
// keyed_dropout_rows(Tensor x, int key, Tensor row_ids, int threshold, float scale) -> Tensor
//   x (R, C); element (r, c) uses counter row_ids[r] * C + c and becomes
//   x[r, c] * scalar_t(scale) (computed as scalar_t) when bits >= threshold, else +0.
// keyed_dropout_csr(Tensor indptr, Tensor indices, Tensor values, int key, Tensor row_base,
//                   Tensor col_base, int threshold, float scale) -> (Tensor, Tensor, Tensor)
//   the same for a CSR's stored entries (sparse input), entry (r, c) with counter
//   row_base[r] + col_base[c] (int64), stored compact: the CSR (indptr, indices, values) of
//   the kept entries only, in their order, each scaled; the dropped ones leave the
//   structure, so products skip them. The counters come from two short tensors, not one
//   per entry: the op is memory bound, and a counter per entry was a third of its traffic.
//
// Keys and counters are int64 in the schema; their bits are read as uint64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "counter_hash.h"
#include "keep_flags.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace bns_pipe {

#if defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx2", "default")))
#endif
void keep_flags(uint64_t key, uint64_t first, int64_t n, int64_t threshold, uint8_t* keep) {
  for (int64_t j = 0; j < n; ++j) {
    keep[j] = bits(key, first + static_cast<uint64_t>(j)) >= threshold;
  }
}

namespace {

// Elements below which a range runs serially.
constexpr int64_t kGrain = 1 << 15;
// 2^-24: bits * kInv24 is exact in float32.
constexpr float kInv24 = 1.0f / 16777216.0f;

// v if keep, else +0, by masking the bits: a data-dependent branch on a random bit would be
// mispredicted half the time, and this is several times faster.
template <typename scalar_t>
inline scalar_t keep_or_zero(scalar_t v, bool keep) {
  using bits_t = std::conditional_t<
      sizeof(scalar_t) == 8, uint64_t,
      std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "unsupported element size");
  bits_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= keep ? static_cast<bits_t>(~bits_t(0)) : bits_t(0);
  std::memcpy(&v, &b, sizeof b);
  return v;
}

at::Tensor contiguous_counters(const at::Tensor& counters, const char* op) {
  TORCH_CHECK(counters.scalar_type() == at::kLong, op, ": counters must be int64");
  return counters.contiguous();
}

at::Tensor random_uniform_cpu(int64_t key, const at::Tensor& counters) {
  const auto c = contiguous_counters(counters, "random_uniform");
  auto out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  const auto* cnt = c.data_ptr<int64_t>();
  float* u = out.data_ptr<float>();
  const auto k = static_cast<uint64_t>(key);
  at::parallel_for(0, c.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      u[i] = static_cast<float>(bits(k, static_cast<uint64_t>(cnt[i]))) * kInv24;
    }
  });
  return out;
}

at::Tensor random_keep_mask_cpu(int64_t key, const at::Tensor& counters, int64_t threshold) {
  const auto c = contiguous_counters(counters, "random_keep_mask");
  auto out = at::empty(c.sizes(), c.options().dtype(at::kBool));
  const auto* cnt = c.data_ptr<int64_t>();
  bool* keep = out.data_ptr<bool>();
  const auto k = static_cast<uint64_t>(key);
  at::parallel_for(0, c.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      keep[i] = bits(k, static_cast<uint64_t>(cnt[i])) < threshold;
    }
  });
  return out;
}

at::Tensor keyed_dropout_rows_cpu(const at::Tensor& x, int64_t key, const at::Tensor& row_ids,
                                  int64_t threshold, double scale) {
  TORCH_CHECK(x.dim() == 2, "keyed_dropout_rows: x must be 2-D (R, C)");
  TORCH_CHECK(row_ids.scalar_type() == at::kLong && row_ids.dim() == 1 &&
                  row_ids.numel() == x.size(0),
              "keyed_dropout_rows: row_ids must be int64 of shape (R,)");
  const auto xc = x.contiguous();
  const auto ids = row_ids.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n_rows = xc.size(0);
  const int64_t n_cols = xc.size(1);
  const auto* row = ids.data_ptr<int64_t>();
  const auto k = static_cast<uint64_t>(key);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n_cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "keyed_dropout_rows", [&] {
        const auto* src = xc.data_ptr<scalar_t>();
        auto* dst = out.data_ptr<scalar_t>();
        const auto s = static_cast<scalar_t>(scale);
        at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const uint64_t base = static_cast<uint64_t>(row[r]) * static_cast<uint64_t>(n_cols);
            uint8_t keep[kFlagRun];
            for (int64_t j0 = 0; j0 < n_cols; j0 += kFlagRun) {
              const int64_t n = std::min(kFlagRun, n_cols - j0);
              keep_flags(k, base + static_cast<uint64_t>(j0), n, threshold, keep);
              const scalar_t* xr = src + r * n_cols + j0;
              scalar_t* yr = dst + r * n_cols + j0;
              for (int64_t j = 0; j < n; ++j) {
                yr[j] = keep_or_zero(static_cast<scalar_t>(xr[j] * s), keep[j]);
              }
            }
          }
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> keyed_dropout_csr_cpu(
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values, int64_t key,
    const at::Tensor& row_base, const at::Tensor& col_base, int64_t threshold, double scale) {
  TORCH_CHECK(indptr.scalar_type() == at::kLong && indices.scalar_type() == at::kLong &&
                  indptr.dim() == 1 && indptr.numel() >= 1,
              "keyed_dropout_csr: indptr (n_rows + 1) and indices must be int64");
  TORCH_CHECK(values.dim() == 1 && indices.dim() == 1 && values.numel() == indices.numel(),
              "keyed_dropout_csr: values and indices must be 1-D, one value per index");
  const auto rb = contiguous_counters(row_base, "keyed_dropout_csr");
  const auto cb = contiguous_counters(col_base, "keyed_dropout_csr");
  const auto ptr = indptr.contiguous();
  const auto idx = indices.contiguous();
  const auto vc = values.contiguous();
  const int64_t n_rows = ptr.numel() - 1;
  const int64_t nnz = idx.numel();
  TORCH_CHECK(rb.numel() == n_rows, "keyed_dropout_csr: row_base must have one entry per row");
  const auto* row_start = ptr.data_ptr<int64_t>();
  TORCH_CHECK(row_start[n_rows] == nnz, "keyed_dropout_csr: indptr[-1] != nnz");
  const auto* src_idx = idx.data_ptr<int64_t>();
  const auto* rbase = rb.data_ptr<int64_t>();
  const auto* cbase = cb.data_ptr<int64_t>();
  const auto k = static_cast<uint64_t>(key);
  // Pass 1: every entry's flag and each row's kept count (rows in parallel). The flags are a
  // tensor so that they come from PyTorch's allocator (the caching one in training).
  auto flags = at::empty({nnz}, idx.options().dtype(at::kByte));
  auto* keep = flags.data_ptr<uint8_t>();
  auto out_ptr = at::empty({n_rows + 1}, ptr.options());
  auto* kept = out_ptr.data_ptr<int64_t>();
  kept[0] = 0;
  const int64_t grain = std::max<int64_t>(1, kGrain * n_rows / std::max<int64_t>(1, nnz));
  const auto n_cols = static_cast<uint64_t>(cb.numel());
  std::atomic<bool> outside{false};
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = 0;
      const uint64_t base = static_cast<uint64_t>(rbase[r]);
      for (int64_t e = row_start[r]; e < row_start[r + 1]; ++e) {
        const auto c = static_cast<uint64_t>(src_idx[e]);
        bad |= c >= n_cols;  // checked in the pass: a separate one would cost a sixth
        const uint64_t counter = base + static_cast<uint64_t>(cbase[c < n_cols ? c : 0]);
        keep[e] = bits(k, counter) >= threshold;
        n += keep[e];
      }
      kept[r + 1] = n;
    }
    if (bad) outside = true;
  });
  TORCH_CHECK(!outside, "keyed_dropout_csr: a column index is outside col_base");
  for (int64_t r = 0; r < n_rows; ++r) kept[r + 1] += kept[r];
  // Pass 2: each row's kept entries, scaled, to their new place.
  // The kept count varies by a few hundred entries an epoch; storage rounded up to a multiple
  // of nnz / 256 falls on one or two sizes, which the caching allocator hands out again (exact
  // sizes grew its cache by each new maximum: +74 MB over 30 epochs on Coauthor CS).
  const int64_t n_kept = kept[n_rows];
  const int64_t step = std::max<int64_t>(4096, nnz / 256);
  const int64_t room = (n_kept + step - 1) / step * step;
  auto out_idx = at::empty({room}, idx.options()).narrow(0, 0, n_kept);
  auto out_val = at::empty({room}, vc.options()).narrow(0, 0, n_kept);
  auto* dst_idx = out_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, vc.scalar_type(), "keyed_dropout_csr", [&] {
        const auto* src = vc.data_ptr<scalar_t>();
        auto* dst = out_val.data_ptr<scalar_t>();
        const auto s = static_cast<scalar_t>(scale);
        at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            // every entry is written to the next free place, which only a kept one keeps
            // (no branch on the random flag); a row's places end at the next row's first
            int64_t to = kept[r];
            const int64_t stop = kept[r + 1];
            for (int64_t e = row_start[r]; e < row_start[r + 1] && to < stop; ++e) {
              dst_idx[to] = src_idx[e];
              dst[to] = static_cast<scalar_t>(src[e] * s);
              to += keep[e];
            }
          }
        });
      });
  return {out_ptr, out_idx, out_val};
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("random_uniform(int key, Tensor counters) -> Tensor");
  m.def("random_keep_mask(int key, Tensor counters, int threshold) -> Tensor");
  m.def("keyed_dropout_rows(Tensor x, int key, Tensor row_ids, int threshold, float scale) "
        "-> Tensor");
  m.def("keyed_dropout_csr(Tensor indptr, Tensor indices, Tensor values, int key, "
        "Tensor row_base, Tensor col_base, int threshold, float scale) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("random_uniform", &bns_pipe::random_uniform_cpu);
  m.impl("random_keep_mask", &bns_pipe::random_keep_mask_cpu);
  m.impl("keyed_dropout_rows", &bns_pipe::keyed_dropout_rows_cpu);
  m.impl("keyed_dropout_csr", &bns_pipe::keyed_dropout_csr_cpu);
}
