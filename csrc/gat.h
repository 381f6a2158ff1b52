// What the CPU (csrc/gat.cpp, which states the math) and CUDA (csrc/cuda/gat_cuda.cu) kernels
// of gat_attention share: the view of the inputs with the per-edge formulas, and the checks.
#pragma once

#include <ATen/ATen.h>

#include "counter_hash.h"

#include <cstdint>

namespace bns_pipe {

template <typename scalar_t>
struct Attention {
  const int64_t* indptr;
  const int64_t* indices;
  const scalar_t* src;    // (n_cols, W), W = H * (C + 1): [z (H*C) | s (H)]
  const scalar_t* a_dst;  // (n_rows, H)
  const int64_t* row_ids;
  const int64_t* col_ids;
  int64_t H, C, W;
  scalar_t slope;
  uint64_t key;
  int64_t threshold;
  scalar_t scale;

  // l = leaky_relu(s_j[h] + d_i[h]) of the edge (i <- j), and its derivative.
  BNS_PIPE_HOST_DEVICE scalar_t logit(int64_t i, int64_t j, int64_t h) const {
    const scalar_t x = src[j * W + H * C + h] + a_dst[i * H + h];
    return x > 0 ? x : slope * x;
  }
  BNS_PIPE_HOST_DEVICE scalar_t leaky_grad(int64_t i, int64_t j, int64_t h) const {
    return src[j * W + H * C + h] + a_dst[i * H + h] > 0 ? scalar_t(1) : slope;
  }
  // keep * scale of the edge (i <- j), head h; dst_mix = mix(row_ids[i]) (see dst_mix).
  BNS_PIPE_HOST_DEVICE scalar_t dropout(uint64_t dst_mix, int64_t j, int64_t h) const {
    if (threshold == 0) return scalar_t(1);
    const uint64_t counter =
        (dst_mix ^ static_cast<uint64_t>(col_ids[j])) * static_cast<uint64_t>(H) +
        static_cast<uint64_t>(h);
    return bits(key, counter) >= threshold ? scale : scalar_t(0);
  }
  BNS_PIPE_HOST_DEVICE uint64_t dst_mix(int64_t i) const {
    return threshold == 0 ? 0 : mix(static_cast<uint64_t>(row_ids[i]));
  }
};

template <typename scalar_t>
Attention<scalar_t> attention_args(const at::Tensor& indptr, const at::Tensor& indices,
                                   const at::Tensor& src, const at::Tensor& a_dst, int64_t heads,
                                   double slope, int64_t key, const at::Tensor& row_ids,
                                   const at::Tensor& col_ids, int64_t threshold, double scale) {
  return Attention<scalar_t>{indptr.data_ptr<int64_t>(),
                             indices.data_ptr<int64_t>(),
                             src.data_ptr<scalar_t>(),
                             a_dst.data_ptr<scalar_t>(),
                             row_ids.data_ptr<int64_t>(),
                             col_ids.data_ptr<int64_t>(),
                             heads,
                             src.size(1) / heads - 1,
                             src.size(1),
                             static_cast<scalar_t>(slope),
                             static_cast<uint64_t>(key),
                             threshold,
                             static_cast<scalar_t>(scale)};
}

// Shapes, dtypes, devices and contiguity of gat_attention's inputs (not indptr's values,
// which live on the device).
void check_gat_inputs(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& src,
                      const at::Tensor& a_dst, int64_t heads, const at::Tensor& row_ids,
                      const at::Tensor& col_ids);

// The same for the backward's further inputs.
void check_gat_backward_inputs(const at::Tensor& indptr, const at::Tensor& indices,
                               const at::Tensor& t_indptr, const at::Tensor& t_rows,
                               const at::Tensor& t_edges, const at::Tensor& src, int64_t heads,
                               const at::Tensor& alpha, const at::Tensor& alpha_self,
                               const at::Tensor& grad_out);

}  // namespace bns_pipe
