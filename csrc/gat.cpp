// Fused GAT attention on the CPU: edge softmax and aggregation in one pass over each
// destination row, and its backward (bns_pipe/nn/attention.py states the same math).
//
// Row i (a destination node) has the in-edges e in [indptr[i], indptr[i+1]) from the columns
// j = indices[e], plus a self-loop from column i. A source row is src[j] = [z_j (H*C) | s_j (H)]:
// transformed features and source attention logits; d = a_dst (n_rows, H). Per head h:
//
//   l_e     = leaky_relu(s_j[h] + d_i[h], slope)
//   alpha_e = exp(l_e - max_i) / sum over row i's edges and self-loop
//   beta_e  = alpha_e * (keep_e ? scale : 0)                     attention dropout
//   out[i, h*C:(h+1)*C] = sum_e beta_e * z_j[h*C:(h+1)*C]
//
// keep_e = bits(key, (mix(row_ids[i]) ^ col_ids[j]) * H + h) >= threshold (threshold 0: no
// dropout), so the mask depends on global ids only, not on the partitioning.
//
// gat_attention(indptr, indices, src, a_dst, heads, slope, key, row_ids, col_ids, threshold,
//               scale) -> (out (n_rows, H*C), alpha (nnz, H), alpha_self (n_rows, H))
// gat_attention_backward(indptr, indices, t_indptr, t_rows, t_edges, src, a_dst, alpha,
//               alpha_self, grad_out, heads, slope, key, row_ids, col_ids, threshold, scale)
//               -> (grad_src (n_cols, H*(C+1)), grad_a_dst (n_rows, H))
//
// alpha is the softmax before dropout. The forward is one pass over each row's neighbours
// (an online softmax). The backward runs over rows (the softmax's backward and d a_dst,
// leaving each edge's [beta | dL/ds] in a buffer), then over the columns of the transposed
// pattern (t_indptr, t_rows: each entry's row, t_edges: its edge id) for d src: every output
// row is written by one thread, so the result does not depend on the number of threads.
// Kernels are compiled for AVX2 + FMA too, chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "gat.h"
#include "row_ranges.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace bns_pipe {
namespace {

// Multiply-adds below which a range is not split across threads.
constexpr int64_t kGrainWork = 1 << 16;

template <typename scalar_t>
__attribute__((always_inline)) inline void axpy(scalar_t* __restrict__ y, scalar_t a,
                                                const scalar_t* __restrict__ x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t dot(const scalar_t* __restrict__ x,
                                                   const scalar_t* __restrict__ y, int64_t n) {
  scalar_t sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * y[k];
  return sum;
}

template <typename scalar_t>
int64_t parts_for(const Attention<scalar_t>& a, int64_t work) {
  return std::clamp<int64_t>(work * std::max<int64_t>(a.W, 1) / kGrainWork, 1,
                             at::get_num_threads());
}

// fn(), compiled for AVX2 + FMA when the CPU has them (flatten inlines the kernel into it).
#ifdef BNS_PIPE_AVX2
template <typename Fn>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Fn& fn) {
  fn();
}
#endif

template <typename Fn>
void run_best(const Fn& fn) {
#ifdef BNS_PIPE_AVX2
  if (cpu_has_avx2_fma()) return run_avx2(fn);
#endif
  fn();
}

// Forward over rows [begin, end) in one pass over the neighbours (an online softmax: the
// running sum and output are rescaled when a larger logit arrives), then the row's alphas
// normalised from the logits kept in alpha.
template <typename scalar_t>
void forward_rows(const Attention<scalar_t>& a, scalar_t* out, scalar_t* alpha,
                  scalar_t* alpha_self, int64_t begin, int64_t end) {
  const int64_t H = a.H, C = a.C;
  std::vector<scalar_t> peak(H), total(H);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t first = a.indptr[i], stop = a.indptr[i + 1];
    const uint64_t dst_mix = a.dst_mix(i);
    scalar_t* y = out + i * H * C;
    for (int64_t h = 0; h < H; ++h) {
      peak[h] = alpha_self[i * H + h] = a.logit(i, i, h);
      total[h] = 1;
      const scalar_t* z = a.src + i * a.W + h * C;
      const scalar_t keep = a.dropout(dst_mix, i, h);
      for (int64_t k = 0; k < C; ++k) y[h * C + k] = keep * z[k];
    }
    for (int64_t e = first; e < stop; ++e) {
      const int64_t j = a.indices[e];
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t l = alpha[e * H + h] = a.logit(i, j, h);
        if (l > peak[h]) {
          const scalar_t r = std::exp(peak[h] - l);
          total[h] *= r;
          for (int64_t k = 0; k < C; ++k) y[h * C + k] *= r;
          peak[h] = l;
        }
        const scalar_t w = std::exp(l - peak[h]);
        total[h] += w;
        axpy(y + h * C, w * a.dropout(dst_mix, j, h), a.src + j * a.W + h * C, C);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t inv = scalar_t(1) / total[h];
      for (int64_t k = 0; k < C; ++k) y[h * C + k] *= inv;
      scalar_t& self = alpha_self[i * H + h];
      self = std::exp(self - peak[h]) * inv;
      for (int64_t e = first; e < stop; ++e) {
        scalar_t& w = alpha[e * H + h];
        w = std::exp(w - peak[h]) * inv;
      }
    }
  }
}

// Backward, first pass over rows [begin, end). With g = grad_out[i], per head and edge:
// d beta_e = g_h . z_j,h, d alpha_e = d beta_e * keep_e * scale,
// ds_e = alpha_e (d alpha_e - sum_e' alpha_e' d alpha_e') * leaky'(.), d a_dst[i] = sum_e ds_e.
// Writes each edge's [beta_e | ds_e] (2H values; self-loops in self_edges), read by the column
// pass in one access.
template <typename scalar_t>
void backward_rows(const Attention<scalar_t>& a, const scalar_t* alpha, const scalar_t* alpha_self,
                   const scalar_t* grad_out, scalar_t* edges, scalar_t* self_edges,
                   scalar_t* grad_a_dst, int64_t begin, int64_t end) {
  const int64_t H = a.H, C = a.C;
  std::vector<scalar_t> total(H), d_alpha, slope;  // the last two: this row's, (deg + 1) * H
  for (int64_t i = begin; i < end; ++i) {
    const int64_t first = a.indptr[i], stop = a.indptr[i + 1];
    const int64_t n = stop - first + 1;  // position 0: the self-loop, then the edges
    d_alpha.resize(n * H);
    slope.resize(n * H);
    const scalar_t* g = grad_out + i * H * C;
    const uint64_t dst_mix = a.dst_mix(i);
    // (alpha, [beta | ds]) of the edge at position pos, from column j
    auto alpha_of = [&](int64_t pos) {
      return pos == 0 ? alpha_self + i * H : alpha + (first + pos - 1) * H;
    };
    auto edge_of = [&](int64_t pos) {
      return pos == 0 ? self_edges + i * 2 * H : edges + (first + pos - 1) * 2 * H;
    };
    std::fill(total.begin(), total.end(), scalar_t(0));
    for (int64_t pos = 0; pos < n; ++pos) {
      const int64_t j = pos == 0 ? i : a.indices[first + pos - 1];
      const scalar_t* al = alpha_of(pos);
      scalar_t* beta = edge_of(pos);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t keep = a.dropout(dst_mix, j, h);
        const scalar_t d = dot(g + h * C, a.src + j * a.W + h * C, C) * keep;
        d_alpha[pos * H + h] = d;
        slope[pos * H + h] = a.leaky_grad(i, j, h);
        beta[h] = al[h] * keep;
        total[h] += al[h] * d;
      }
    }
    scalar_t* gd = grad_a_dst + i * H;
    std::fill(gd, gd + H, scalar_t(0));
    for (int64_t pos = 0; pos < n; ++pos) {
      const scalar_t* al = alpha_of(pos);
      scalar_t* ds = edge_of(pos) + H;
      for (int64_t h = 0; h < H; ++h) {
        ds[h] = al[h] * (d_alpha[pos * H + h] - total[h]) * slope[pos * H + h];
        gd[h] += ds[h];
      }
    }
  }
}

// Backward, second pass over source columns [begin, end) of the transposed pattern:
// d z_j = sum_i beta_ij g_i and d s_j = sum_i ds_ij, self-loop included for j < n_rows.
template <typename scalar_t>
void backward_columns(const Attention<scalar_t>& a, const int64_t* t_indptr, const int64_t* t_rows,
                      const int64_t* t_edges, int64_t n_rows, const scalar_t* grad_out,
                      const scalar_t* edges, const scalar_t* self_edges, scalar_t* grad_src,
                      int64_t begin, int64_t end) {
  const int64_t H = a.H, C = a.C;
  for (int64_t j = begin; j < end; ++j) {
    scalar_t* gz = grad_src + j * a.W;
    scalar_t* gs = gz + H * C;
    std::fill(gz, gz + a.W, scalar_t(0));
    auto add = [&](int64_t i, const scalar_t* edge) {
      const scalar_t* g = grad_out + i * H * C;
      for (int64_t h = 0; h < H; ++h) {
        axpy(gz + h * C, edge[h], g + h * C, C);
        gs[h] += edge[H + h];
      }
    };
    if (j < n_rows) add(j, self_edges + j * 2 * H);
    for (int64_t k = t_indptr[j]; k < t_indptr[j + 1]; ++k) {
      add(t_rows[k], edges + t_edges[k] * 2 * H);
    }
  }
}

void check_index(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  t.device() == like.device(),
              "gat_attention: ", name, " must be a contiguous 1-D int64 tensor on src's device");
}

}  // namespace

void check_gat_inputs(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& src,
                      const at::Tensor& a_dst, int64_t heads, const at::Tensor& row_ids,
                      const at::Tensor& col_ids) {
  check_index(indptr, src, "indptr");
  check_index(indices, src, "indices");
  check_index(row_ids, src, "row_ids");
  check_index(col_ids, src, "col_ids");
  const int64_t n_rows = indptr.numel() - 1;
  TORCH_CHECK(n_rows >= 0, "gat_attention: indptr needs n_rows + 1 entries");
  TORCH_CHECK(heads >= 1 && src.dim() == 2 && src.is_contiguous() &&
                  src.size(1) % heads == 0 && src.size(1) / heads >= 2,
              "gat_attention: src must be a contiguous (n_cols, H * (C + 1)) tensor, C >= 1");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble,
              "gat_attention: src must be float32 or float64");
  TORCH_CHECK(src.size(0) >= n_rows && col_ids.numel() == src.size(0),
              "gat_attention: src needs a row per column (at least n_rows) and col_ids one id "
              "per column");
  TORCH_CHECK(a_dst.dim() == 2 && a_dst.size(0) == n_rows && a_dst.size(1) == heads &&
                  a_dst.is_contiguous() && a_dst.scalar_type() == src.scalar_type() &&
                  a_dst.device() == src.device(),
              "gat_attention: a_dst must be a contiguous (n_rows, H) tensor of src's dtype");
  TORCH_CHECK(row_ids.numel() == n_rows, "gat_attention: row_ids needs one id per row");
}

void check_gat_backward_inputs(const at::Tensor& indptr, const at::Tensor& indices,
                               const at::Tensor& t_indptr, const at::Tensor& t_rows,
                               const at::Tensor& t_edges, const at::Tensor& src, int64_t heads,
                               const at::Tensor& alpha, const at::Tensor& alpha_self,
                               const at::Tensor& grad_out) {
  check_index(t_indptr, src, "t_indptr");
  check_index(t_rows, src, "t_rows");
  check_index(t_edges, src, "t_edges");
  const int64_t n_rows = indptr.numel() - 1, nnz = indices.numel();
  const int64_t C = src.size(1) / heads - 1;
  TORCH_CHECK(t_indptr.numel() == src.size(0) + 1 && t_rows.numel() == nnz &&
                  t_edges.numel() == nnz,
              "gat_attention_backward: the transposed pattern must have n_cols + 1 pointers "
              "and one row and edge id per entry");
  for (const auto* t : {&alpha, &alpha_self, &grad_out}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == src.scalar_type() &&
                    t->device() == src.device(),
                "gat_attention_backward: alpha, alpha_self and grad_out must be contiguous, "
                "of src's dtype and on its device");
  }
  TORCH_CHECK(alpha.numel() == nnz * heads && alpha_self.numel() == n_rows * heads &&
                  grad_out.numel() == n_rows * heads * C,
              "gat_attention_backward: alpha (nnz, H), alpha_self (n_rows, H) and grad_out "
              "(n_rows, H*C) expected");
}

namespace {

void check_cpu_indptr(const at::Tensor& indptr, const at::Tensor& indices) {
  TORCH_CHECK(indptr.data_ptr<int64_t>()[indptr.numel() - 1] == indices.numel(),
              "gat_attention: indptr[-1] must equal the number of indices");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gat_attention_cpu(
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& src,
    const at::Tensor& a_dst, int64_t heads, double slope, int64_t key, const at::Tensor& row_ids,
    const at::Tensor& col_ids, int64_t threshold, double scale) {
  check_gat_inputs(indptr, indices, src, a_dst, heads, row_ids, col_ids);
  check_cpu_indptr(indptr, indices);
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t C = src.size(1) / heads - 1;
  auto out = at::empty({n_rows, heads * C}, src.options());
  auto alpha = at::empty({indices.numel(), heads}, src.options());
  auto alpha_self = at::empty({n_rows, heads}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "bns_pipe::gat_attention", [&] {
    const auto a = attention_args<scalar_t>(indptr, indices, src, a_dst, heads, slope, key,
                                            row_ids, col_ids, threshold, scale);
    const int64_t* ptr = indptr.data_ptr<int64_t>();
    for_balanced_row_ranges(ptr, n_rows, parts_for(a, ptr[n_rows] + n_rows),
                            [&](int64_t b, int64_t f) {
                              run_best([&] {
                                forward_rows(a, out.data_ptr<scalar_t>(),
                                             alpha.data_ptr<scalar_t>(),
                                             alpha_self.data_ptr<scalar_t>(), b, f);
                              });
                            });
  });
  return {out, alpha, alpha_self};
}

std::tuple<at::Tensor, at::Tensor> gat_attention_backward_cpu(
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& t_indptr,
    const at::Tensor& t_rows, const at::Tensor& t_edges, const at::Tensor& src,
    const at::Tensor& a_dst, const at::Tensor& alpha, const at::Tensor& alpha_self,
    const at::Tensor& grad_out, int64_t heads, double slope, int64_t key,
    const at::Tensor& row_ids, const at::Tensor& col_ids, int64_t threshold, double scale) {
  check_gat_inputs(indptr, indices, src, a_dst, heads, row_ids, col_ids);
  check_gat_backward_inputs(indptr, indices, t_indptr, t_rows, t_edges, src, heads, alpha,
                            alpha_self, grad_out);
  check_cpu_indptr(indptr, indices);
  const int64_t n_rows = indptr.numel() - 1, n_cols = src.size(0), nnz = indices.numel();
  auto grad_src = at::empty_like(src);
  auto grad_a_dst = at::empty_like(a_dst);
  auto edges = at::empty({nnz, 2 * heads}, src.options());
  auto self_edges = at::empty({n_rows, 2 * heads}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "bns_pipe::gat_attention_backward", [&] {
    const auto a = attention_args<scalar_t>(indptr, indices, src, a_dst, heads, slope, key,
                                            row_ids, col_ids, threshold, scale);
    const auto* al = alpha.data_ptr<scalar_t>();
    const auto* al_self = alpha_self.data_ptr<scalar_t>();
    const auto* g = grad_out.data_ptr<scalar_t>();
    auto* e = edges.data_ptr<scalar_t>();
    auto* e_self = self_edges.data_ptr<scalar_t>();
    const int64_t* ptr = indptr.data_ptr<int64_t>();
    for_balanced_row_ranges(ptr, n_rows, parts_for(a, nnz + n_rows), [&](int64_t b, int64_t f) {
      run_best([&] {
        backward_rows(a, al, al_self, g, e, e_self, grad_a_dst.data_ptr<scalar_t>(), b, f);
      });
    });
    const int64_t* t_ptr = t_indptr.data_ptr<int64_t>();
    const int64_t* rows = t_rows.data_ptr<int64_t>();
    const int64_t* ids = t_edges.data_ptr<int64_t>();
    for_balanced_row_ranges(t_ptr, n_cols, parts_for(a, nnz + n_cols), [&](int64_t b, int64_t f) {
      run_best([&] {
        backward_columns(a, t_ptr, rows, ids, n_rows, g, e, e_self,
                         grad_src.data_ptr<scalar_t>(), b, f);
      });
    });
  });
  return {grad_src, grad_a_dst};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("gat_attention(Tensor indptr, Tensor indices, Tensor src, Tensor a_dst, int heads, "
        "float slope, int key, Tensor row_ids, Tensor col_ids, int threshold, float scale) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("gat_attention_backward(Tensor indptr, Tensor indices, Tensor t_indptr, Tensor t_rows, "
        "Tensor t_edges, Tensor src, Tensor a_dst, Tensor alpha, Tensor alpha_self, "
        "Tensor grad_out, int heads, float slope, int key, Tensor row_ids, Tensor col_ids, "
        "int threshold, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bns_pipe, CPU, m) {
  m.impl("gat_attention", &gat_attention_cpu);
  m.impl("gat_attention_backward", &gat_attention_backward_cpu);
}

}  // namespace bns_pipe
