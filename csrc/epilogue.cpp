// The end of a hidden layer in one pass over its output, forward and backward.
//
// layer_epilogue(Tensor h, Tensor? bias, Tensor? residual, bool relu, int key, Tensor row_ids,
//                int threshold, float scale) -> (Tensor y, Tensor mask)
//   h (R, C); bias (C,); residual (R, C); row_ids (R,) int64 global ids.
//   pre = (h + bias) + residual           (absent terms skipped; scalar_t arithmetic)
//   a   = relu ? (pre < 0 ? 0 : pre) : pre   (NaN propagates, as torch.relu)
//   y   = a * scalar_t(scale) if kept else +0, kept = bits(key, row_ids[r]·C + c) >= threshold
//         (the keyed dropout of bns_pipe/nn/dropout.py; threshold 0 keeps every element)
//   mask (R, C) uint8: 1 iff y depends on pre (kept, and a > 0 under relu)
// layer_epilogue_backward(Tensor grad, Tensor mask, float scale, bool bias_grad)
//     -> (Tensor grad_pre, Tensor grad_bias)
//   grad_pre = mask ? grad * scalar_t(scale) : +0   (R, C)
//   grad_bias = column sums of grad_pre (C,), accumulated in double over fixed blocks of rows
//   and then over the blocks in order (the same bits for any thread count); (0,) when
//   bias_grad is false.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "keep_flags.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace bns_pipe {
namespace {

constexpr int64_t kRowBlock = 1024;  // rows per partial bias sum

void check_rows(const at::Tensor& t, const at::Tensor& h, const char* what) {
  TORCH_CHECK(t.sizes() == h.sizes() && t.scalar_type() == h.scalar_type(),
              "layer_epilogue: ", what, " must match h's shape and dtype");
}

// The bits of v where m is all ones, +0 where m is 0: a select that compiles without a
// branch. all_ones<T>(c) is the mask of the condition c.
template <typename scalar_t>
using bits_of = std::conditional_t<sizeof(scalar_t) == 8, uint64_t, uint32_t>;

template <typename scalar_t>
inline bits_of<scalar_t> all_ones(bool c) {
  return -static_cast<bits_of<scalar_t>>(c);
}

template <typename scalar_t>
inline scalar_t masked(scalar_t v, bits_of<scalar_t> m) {
  bits_of<scalar_t> b;
  std::memcpy(&b, &v, sizeof b);
  b &= m;
  std::memcpy(&v, &b, sizeof b);
  return v;
}

// One layer's tensors (row-major, n_cols wide); bias and residual may be null.
template <typename scalar_t>
struct Rows {
  const scalar_t* src;
  const scalar_t* bias;
  const scalar_t* residual;
  scalar_t* dst;
  uint8_t* mask;
  int64_t n_cols;
  bool relu;
  scalar_t scale;
};

// Elements [at, at + n) of the flat arrays, columns [col, col + n), with keep flags. The
// pointers are copied into restrict-qualified locals: the uint8 mask stores could otherwise
// alias everything reached through `rows`, and the loop would reload it per element (10x).
template <typename scalar_t>
__attribute__((always_inline)) inline void epilogue_run_impl(const Rows<scalar_t>& rows,
                                                             int64_t at, int64_t col, int64_t n,
                                                             const uint8_t* __restrict keep) {
  const scalar_t* __restrict src = rows.src + at;
  const scalar_t* __restrict bias = rows.bias ? rows.bias + col : nullptr;
  const scalar_t* __restrict residual = rows.residual ? rows.residual + at : nullptr;
  scalar_t* __restrict dst = rows.dst + at;
  uint8_t* __restrict mask = rows.mask + at;
  const scalar_t s = rows.scale;
  // Simple loops with the branches outside them and selections done on bits, so that each
  // vectorises: GCC keeps a ?: of floats as a branch (it may not speculate a product that
  // could trap), mispredicted half the time on random signs (3.5x slower).
  if (bias) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] + bias[j];
  } else {
    std::copy(src, src + n, dst);
  }
  if (residual) {
    for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] + residual[j];
  }
  if (rows.relu) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t a = masked(dst[j], all_ones<scalar_t>(!(dst[j] < scalar_t(0))));
      mask[j] = keep[j] & static_cast<uint8_t>(a > scalar_t(0));
      dst[j] = masked(static_cast<scalar_t>(a * s), all_ones<scalar_t>(keep[j]));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      mask[j] = keep[j];
      dst[j] = masked(static_cast<scalar_t>(dst[j] * s), all_ones<scalar_t>(keep[j]));
    }
  }
}

// The loops above and the backward's below also compiled for AVX2 (no FMA: no product may
// be fused with a sum, so the values stay those of the unfused ops), chosen at run time.
#ifdef BNS_PIPE_AVX2
template <typename scalar_t>
__attribute__((target("avx2"))) void epilogue_run_avx2(const Rows<scalar_t>& rows, int64_t at,
                                                       int64_t col, int64_t n,
                                                       const uint8_t* keep) {
  epilogue_run_impl(rows, at, col, n, keep);
}
#endif

template <typename scalar_t>
void epilogue_run(const Rows<scalar_t>& rows, int64_t at, int64_t col, int64_t n,
                  const uint8_t* keep) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2()) return epilogue_run_avx2(rows, at, col, n, keep);
#endif
  epilogue_run_impl(rows, at, col, n, keep);
}

std::tuple<at::Tensor, at::Tensor> layer_epilogue_cpu(
    const at::Tensor& h, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, int64_t key, const at::Tensor& row_ids,
    int64_t threshold, double scale) {
  TORCH_CHECK(h.dim() == 2, "layer_epilogue: h must be 2-D (R, C)");
  const int64_t n_rows = h.size(0), n_cols = h.size(1);
  TORCH_CHECK(row_ids.scalar_type() == at::kLong && row_ids.dim() == 1 &&
                  row_ids.numel() == n_rows,
              "layer_epilogue: row_ids must be int64 of shape (R,)");
  const auto hc = h.contiguous();
  at::Tensor bc, rc;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n_cols &&
                    bias->scalar_type() == h.scalar_type(),
                "layer_epilogue: bias must be (C,) of h's dtype");
    bc = bias->contiguous();
  }
  if (residual) {
    check_rows(*residual, h, "residual");
    rc = residual->contiguous();
  }
  const auto ids = row_ids.contiguous();
  auto y = at::empty_like(hc);
  auto mask = at::empty(hc.sizes(), hc.options().dtype(at::kByte));
  const auto* row = ids.data_ptr<int64_t>();
  const auto k = static_cast<uint64_t>(key);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, n_cols));
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "layer_epilogue", [&] {
    const Rows<scalar_t> rows{hc.data_ptr<scalar_t>(),
                              bias ? bc.data_ptr<scalar_t>() : nullptr,
                              residual ? rc.data_ptr<scalar_t>() : nullptr,
                              y.data_ptr<scalar_t>(),
                              mask.data_ptr<uint8_t>(),
                              n_cols,
                              relu,
                              static_cast<scalar_t>(scale)};
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      uint8_t keep[kFlagRun];
      std::fill(keep, keep + kFlagRun, uint8_t(1));
      for (int64_t r = begin; r < end; ++r) {
        const uint64_t base = static_cast<uint64_t>(row[r]) * static_cast<uint64_t>(n_cols);
        for (int64_t j0 = 0; j0 < n_cols; j0 += kFlagRun) {
          const int64_t n = std::min(kFlagRun, n_cols - j0);
          if (threshold > 0) keep_flags(k, base + static_cast<uint64_t>(j0), n, threshold, keep);
          epilogue_run(rows, r * n_cols + j0, j0, n, keep);
        }
      }
    });
  });
  return {y, mask};
}

// Rows [begin, end) of the backward: out = mask ? g * s : 0, and out added to sums (when
// not null), all n_cols wide.
template <typename scalar_t>
__attribute__((always_inline)) inline void backward_rows_impl(
    const scalar_t* __restrict g, const uint8_t* __restrict mask, scalar_t* __restrict out,
    double* __restrict sums, int64_t begin, int64_t end, int64_t n_cols, scalar_t s) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = r * n_cols;
    for (int64_t j = 0; j < n_cols; ++j) {
      const scalar_t v = static_cast<scalar_t>(g[at + j] * s);  // a bit select, not a branch
      out[at + j] = masked(v, all_ones<scalar_t>(mask[at + j]));
    }
    if (sums) {
      for (int64_t j = 0; j < n_cols; ++j) sums[j] += static_cast<double>(out[at + j]);
    }
  }
}

#ifdef BNS_PIPE_AVX2
template <typename scalar_t>
__attribute__((target("avx2"))) void backward_rows_avx2(const scalar_t* g, const uint8_t* mask,
                                                        scalar_t* out, double* sums,
                                                        int64_t begin, int64_t end,
                                                        int64_t n_cols, scalar_t s) {
  backward_rows_impl(g, mask, out, sums, begin, end, n_cols, s);
}
#endif

template <typename scalar_t>
void backward_rows(const scalar_t* g, const uint8_t* mask, scalar_t* out, double* sums,
                   int64_t begin, int64_t end, int64_t n_cols, scalar_t s) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2()) return backward_rows_avx2(g, mask, out, sums, begin, end, n_cols, s);
#endif
  backward_rows_impl(g, mask, out, sums, begin, end, n_cols, s);
}

std::tuple<at::Tensor, at::Tensor> layer_epilogue_backward_cpu(const at::Tensor& grad,
                                                               const at::Tensor& mask,
                                                               double scale, bool bias_grad) {
  TORCH_CHECK(grad.dim() == 2 && mask.sizes() == grad.sizes() &&
                  mask.scalar_type() == at::kByte,
              "layer_epilogue_backward: grad (R, C) and a uint8 mask of its shape");
  const auto gc = grad.contiguous();
  const auto mc = mask.contiguous();
  const int64_t n_rows = gc.size(0), n_cols = gc.size(1);
  auto out = at::empty_like(gc);
  const int64_t n_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(bias_grad ? n_blocks * n_cols : 0, 0.0);
  const uint8_t* m = mc.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "layer_epilogue_backward", [&] {
    const scalar_t* g = gc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    at::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t blk = first; blk < last; ++blk) {
        double* sums = bias_grad ? partial.data() + blk * n_cols : nullptr;
        const int64_t end = std::min(n_rows, (blk + 1) * kRowBlock);
        backward_rows(g, m, dst, sums, blk * kRowBlock, end, n_cols, s);
      }
    });
  });
  if (!bias_grad) return {out, at::empty({0}, gc.options())};
  std::vector<double> total(n_cols, 0.0);
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    for (int64_t j = 0; j < n_cols; ++j) total[j] += partial[blk * n_cols + j];
  }
  auto bias = at::empty({n_cols}, gc.options().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), bias.data_ptr<double>());
  return {out, bias.to(gc.scalar_type())};
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("layer_epilogue(Tensor h, Tensor? bias, Tensor? residual, bool relu, int key, "
        "Tensor row_ids, int threshold, float scale) -> (Tensor, Tensor)");
  m.def("layer_epilogue_backward(Tensor grad, Tensor mask, float scale, bool bias_grad) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("layer_epilogue", &bns_pipe::layer_epilogue_cpu);
  m.impl("layer_epilogue_backward", &bns_pipe::layer_epilogue_backward_cpu);
}
