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
// keyed_dropout_entries(Tensor values, int key, Tensor counters, int threshold, float scale)
//   -> Tensor: the same for a flat tensor, entry i with counter counters[i] (sparse input).
//
// Keys and counters are int64 in the schema; their bits are read as uint64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "counter_hash.h"
#include "keep_flags.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
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

at::Tensor keyed_dropout_entries_cpu(const at::Tensor& values, int64_t key,
                                     const at::Tensor& counters, int64_t threshold,
                                     double scale) {
  const auto c = contiguous_counters(counters, "keyed_dropout_entries");
  TORCH_CHECK(values.dim() == 1 && values.numel() == c.numel(),
              "keyed_dropout_entries: values must be 1-D with one counter each");
  const auto vc = values.contiguous();
  auto out = at::empty_like(vc);
  const auto* cnt = c.data_ptr<int64_t>();
  const auto k = static_cast<uint64_t>(key);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, vc.scalar_type(), "keyed_dropout_entries", [&] {
        const auto* src = vc.data_ptr<scalar_t>();
        auto* dst = out.data_ptr<scalar_t>();
        const auto s = static_cast<scalar_t>(scale);
        at::parallel_for(0, vc.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const bool keep = bits(k, static_cast<uint64_t>(cnt[i])) >= threshold;
            dst[i] = keep_or_zero(static_cast<scalar_t>(src[i] * s), keep);
          }
        });
      });
  return out;
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("random_uniform(int key, Tensor counters) -> Tensor");
  m.def("random_keep_mask(int key, Tensor counters, int threshold) -> Tensor");
  m.def("keyed_dropout_rows(Tensor x, int key, Tensor row_ids, int threshold, float scale) "
        "-> Tensor");
  m.def("keyed_dropout_entries(Tensor values, int key, Tensor counters, int threshold, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("random_uniform", &bns_pipe::random_uniform_cpu);
  m.impl("random_keep_mask", &bns_pipe::random_keep_mask_cpu);
  m.impl("keyed_dropout_rows", &bns_pipe::keyed_dropout_rows_cpu);
  m.impl("keyed_dropout_entries", &bns_pipe::keyed_dropout_entries_cpu);
}
