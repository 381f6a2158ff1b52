// CUDA kernels of gat_attention and its backward (schemas, math and CPU kernels in
// csrc/gat.cpp), summing in the CPU kernels' order, so the results agree to rounding.
//
// forward: one block per destination row (grid-stride), threads over its H*C output channels;
//   each thread runs the row's online softmax for its channel's head (the C threads of a head
//   compute the same logits) and one thread per head records the logits, then the alphas.
// backward, rows: one thread per (row, head): the softmax's backward, each edge's
//   [beta | dL/ds] and d a_dst.
// backward, columns: one block per source column over the transposed pattern, threads over
//   its W = H*(C+1) gradient channels: d z = sum beta * g, d s = sum dL/ds. Every output
//   element is written by one thread: no atomics, deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gat.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace bns_pipe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// Threads for a block over `channels`: a multiple of 32, at most 1024.
unsigned int threads_for(int64_t channels) {
  return static_cast<unsigned int>(std::clamp<int64_t>((channels + 31) / 32 * 32, 32, 1024));
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::clamp<int64_t>(n, 1, kMaxBlocks));
}

template <typename scalar_t>
__global__ void forward_kernel(const Attention<scalar_t> a, int64_t n_rows,
                               scalar_t* __restrict__ out, scalar_t* __restrict__ alpha,
                               scalar_t* __restrict__ alpha_self) {
  const int64_t H = a.H, C = a.C;
  for (int64_t i = blockIdx.x; i < n_rows; i += gridDim.x) {
    const int64_t first = a.indptr[i], stop = a.indptr[i + 1];
    const uint64_t dst_mix = a.dst_mix(i);
    for (int64_t ch = threadIdx.x; ch < H * C; ch += blockDim.x) {
      const int64_t h = ch / C;
      const bool records = ch % C == 0;
      scalar_t peak = a.logit(i, i, h), total = 1;
      scalar_t y = a.dropout(dst_mix, i, h) * a.src[i * a.W + ch];
      for (int64_t e = first; e < stop; ++e) {
        const int64_t j = a.indices[e];
        const scalar_t l = a.logit(i, j, h);
        if (records) alpha[e * H + h] = l;
        if (l > peak) {
          const scalar_t r = exp_of(peak - l);
          total *= r;
          y *= r;
          peak = l;
        }
        const scalar_t w = exp_of(l - peak);
        total += w;
        y += w * a.dropout(dst_mix, j, h) * a.src[j * a.W + ch];
      }
      const scalar_t inv = scalar_t(1) / total;
      out[i * H * C + ch] = y * inv;
      if (records) {
        alpha_self[i * H + h] = exp_of(a.logit(i, i, h) - peak) * inv;
        for (int64_t e = first; e < stop; ++e) {
          alpha[e * H + h] = exp_of(alpha[e * H + h] - peak) * inv;
        }
      }
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  scalar_t sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * y[k];
  return sum;
}

// edges (nnz, 2H) and self_edges (n_rows, 2H) receive [beta | dL/ds]; the dL/ds half holds
// d alpha until the row's total is known.
template <typename scalar_t>
__global__ void backward_rows_kernel(const Attention<scalar_t> a, int64_t n_rows,
                                     const scalar_t* __restrict__ alpha,
                                     const scalar_t* __restrict__ alpha_self,
                                     const scalar_t* __restrict__ grad_out,
                                     scalar_t* __restrict__ edges,
                                     scalar_t* __restrict__ self_edges,
                                     scalar_t* __restrict__ grad_a_dst) {
  const int64_t H = a.H, C = a.C;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_rows * H;
       t += stride) {
    const int64_t i = t / H, h = t % H;
    const int64_t first = a.indptr[i], stop = a.indptr[i + 1];
    const scalar_t* g = grad_out + i * H * C + h * C;
    const uint64_t dst_mix = a.dst_mix(i);
    scalar_t* self = self_edges + i * 2 * H;
    scalar_t keep = a.dropout(dst_mix, i, h);
    self[h] = alpha_self[i * H + h] * keep;
    self[H + h] = dot(g, a.src + i * a.W + h * C, C) * keep;
    scalar_t total = alpha_self[i * H + h] * self[H + h];
    for (int64_t e = first; e < stop; ++e) {
      const int64_t j = a.indices[e];
      keep = a.dropout(dst_mix, j, h);
      scalar_t* edge = edges + e * 2 * H;
      edge[h] = alpha[e * H + h] * keep;
      edge[H + h] = dot(g, a.src + j * a.W + h * C, C) * keep;
      total += alpha[e * H + h] * edge[H + h];
    }
    self[H + h] = alpha_self[i * H + h] * (self[H + h] - total) * a.leaky_grad(i, i, h);
    scalar_t grad = self[H + h];
    for (int64_t e = first; e < stop; ++e) {
      scalar_t* ds = edges + e * 2 * H + H + h;
      *ds = alpha[e * H + h] * (*ds - total) * a.leaky_grad(i, a.indices[e], h);
      grad += *ds;
    }
    grad_a_dst[i * H + h] = grad;
  }
}

template <typename scalar_t>
__global__ void backward_columns_kernel(const Attention<scalar_t> a, int64_t n_rows,
                                        int64_t n_cols, const int64_t* __restrict__ t_indptr,
                                        const int64_t* __restrict__ t_rows,
                                        const int64_t* __restrict__ t_edges,
                                        const scalar_t* __restrict__ grad_out,
                                        const scalar_t* __restrict__ edges,
                                        const scalar_t* __restrict__ self_edges,
                                        scalar_t* __restrict__ grad_src) {
  const int64_t H = a.H, C = a.C;
  for (int64_t j = blockIdx.x; j < n_cols; j += gridDim.x) {
    for (int64_t ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
      const bool feature = ch < H * C;
      const int64_t h = feature ? ch / C : ch - H * C;
      // d z: beta (slot h) times the destination's gradient; d s: dL/ds (slot H + h)
      auto term = [&](int64_t i, const scalar_t* edge) {
        return feature ? edge[h] * grad_out[i * H * C + ch] : edge[H + h];
      };
      scalar_t acc = 0;
      if (j < n_rows) acc += term(j, self_edges + j * 2 * H);
      for (int64_t k = t_indptr[j]; k < t_indptr[j + 1]; ++k) {
        acc += term(t_rows[k], edges + t_edges[k] * 2 * H);
      }
      grad_src[j * a.W + ch] = acc;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gat_attention_cuda(
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& src,
    const at::Tensor& a_dst, int64_t heads, double slope, int64_t key, const at::Tensor& row_ids,
    const at::Tensor& col_ids, int64_t threshold, double scale) {
  check_gat_inputs(indptr, indices, src, a_dst, heads, row_ids, col_ids);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t C = src.size(1) / heads - 1;
  auto out = at::empty({n_rows, heads * C}, src.options());
  auto alpha = at::empty({indices.numel(), heads}, src.options());
  auto alpha_self = at::empty({n_rows, heads}, src.options());
  if (n_rows == 0) return {out, alpha, alpha_self};
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "gat_attention_cuda", [&] {
    const auto a = attention_args<scalar_t>(indptr, indices, src, a_dst, heads, slope, key,
                                            row_ids, col_ids, threshold, scale);
    forward_kernel<scalar_t><<<blocks_for(n_rows), threads_for(heads * C), 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
        a, n_rows, out.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        alpha_self.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, alpha, alpha_self};
}

std::tuple<at::Tensor, at::Tensor> gat_attention_backward_cuda(
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& t_indptr,
    const at::Tensor& t_rows, const at::Tensor& t_edges, const at::Tensor& src,
    const at::Tensor& a_dst, const at::Tensor& alpha, const at::Tensor& alpha_self,
    const at::Tensor& grad_out, int64_t heads, double slope, int64_t key,
    const at::Tensor& row_ids, const at::Tensor& col_ids, int64_t threshold, double scale) {
  check_gat_inputs(indptr, indices, src, a_dst, heads, row_ids, col_ids);
  check_gat_backward_inputs(indptr, indices, t_indptr, t_rows, t_edges, src, heads, alpha,
                            alpha_self, grad_out);
  const c10::cuda::CUDAGuard guard(src.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_rows = indptr.numel() - 1, n_cols = src.size(0), nnz = indices.numel();
  auto grad_src = at::zeros_like(src);
  auto grad_a_dst = at::zeros_like(a_dst);
  auto edges = at::empty({nnz, 2 * heads}, src.options());
  auto self_edges = at::empty({n_rows, 2 * heads}, src.options());
  if (n_rows == 0) return {grad_src, grad_a_dst};
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "gat_attention_backward_cuda", [&] {
    const auto a = attention_args<scalar_t>(indptr, indices, src, a_dst, heads, slope, key,
                                            row_ids, col_ids, threshold, scale);
    const int64_t pairs = n_rows * heads;
    const auto row_blocks = static_cast<unsigned int>(
        std::clamp<int64_t>((pairs + kThreads - 1) / kThreads, 1, kMaxBlocks));
    backward_rows_kernel<scalar_t><<<row_blocks, kThreads, 0, stream>>>(
        a, n_rows, alpha.data_ptr<scalar_t>(), alpha_self.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), edges.data_ptr<scalar_t>(),
        self_edges.data_ptr<scalar_t>(), grad_a_dst.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_columns_kernel<scalar_t><<<blocks_for(n_cols), threads_for(a.W), 0, stream>>>(
        a, n_rows, n_cols, t_indptr.data_ptr<int64_t>(), t_rows.data_ptr<int64_t>(),
        t_edges.data_ptr<int64_t>(), grad_out.data_ptr<scalar_t>(), edges.data_ptr<scalar_t>(),
        self_edges.data_ptr<scalar_t>(), grad_src.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_src, grad_a_dst};
}

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_IMPL(bns_pipe, CUDA, m) {
  m.impl("gat_attention", &bns_pipe::gat_attention_cuda);
  m.impl("gat_attention_backward", &bns_pipe::gat_attention_backward_cuda);
}
