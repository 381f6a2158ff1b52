"""GAT attention: the edge softmax and the aggregation it weights, fused.

Row i of the pattern (a destination node) lists its in-neighbours j (columns); every row also
has a self-loop from column i, so the columns start with the rows' own nodes. A source row is
``src[j] = [z_j | s_j]`` with z_j (H·C) the transformed features and s_j (H) the source
attention logits; ``a_dst`` (n_rows, H) holds the destination logits. Per head h::

    l_ij     = LeakyReLU(s_j[h] + a_dst[i, h], slope)
    α_ij     = exp(l_ij) / Σ_{k ∈ N(i) ∪ {i}} exp(l_ik)              (softmax per row)
    β_ij     = α_ij · keep_ij / (1 - p)                               (attention dropout)
    out[i,h] = Σ_{j ∈ N(i) ∪ {i}} β_ij z_j[h]                        (n_rows, H·C)

The dropout mask is keyed by global ids, as feature dropout is (:mod:`bns_pipe.nn.dropout`)::

    keep_ij = uniform(key, (mix(global dst) ^ global src) · H + h) >= p    (mod 2^64)

so a graph split over any number of ranks drops the same attention coefficients. The C++ op
(``torch.ops.bns_pipe.gat_attention`` and its backward) runs when the extension serves the
device; the pure-PyTorch fallback is plain autograd over an edge list (more memory: one
(E, H, C) temporary); both agree to float rounding.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from bns_pipe import _ext
from bns_pipe.nn.dropout import dropout_scale
from bns_pipe.random import (
    check_probability,
    has_ext_kernel,
    keep_mask,
    mix_tensor,
    threshold,
    to_int64,
)
from bns_pipe.sparse import CSR

__all__ = ["gat_attention"]

NEGATIVE_SLOPE = 0.2  # PyG GATConv's default LeakyReLU slope


def gat_attention(
    pattern: CSR,
    src: Tensor,
    a_dst: Tensor,
    heads: int,
    p: float = 0.0,
    key: int = 0,
    row_ids: Tensor | None = None,
    col_ids: Tensor | None = None,
) -> Tensor:
    """``out`` (n_rows, H·C) from ``src`` (n_cols, H·(C+1)) and ``a_dst`` (n_rows, H).

    ``pattern``: (n_rows, n_cols) in-edges without self-loops, n_cols >= n_rows. Attention
    dropout with probability ``p`` needs ``key`` and the global ids of the rows (n_rows,) and
    columns (n_cols,), int64; without dropout they default to positions.
    """
    check_probability(p)
    n_rows, n_cols = pattern.shape
    if src.dim() != 2 or src.shape[0] != n_cols or src.shape[1] % heads or src.shape[1] < 2 * heads:
        raise ValueError(f"gat_attention: src must be ({n_cols}, H * (C + 1)), got {src.shape}")
    if a_dst.shape != (n_rows, heads) or n_cols < n_rows:
        raise ValueError(
            f"gat_attention: a_dst must be ({n_rows}, {heads}) and the pattern have at least as "
            f"many columns as rows, got a_dst {tuple(a_dst.shape)}, pattern {pattern.shape}"
        )
    positions = torch.arange(n_cols, device=src.device)
    row_ids = positions[:n_rows] if row_ids is None else row_ids
    col_ids = positions if col_ids is None else col_ids
    args = (heads, p, key, row_ids, col_ids)
    if src.dtype in (torch.float32, torch.float64) and has_ext_kernel("gat_attention", src.device):
        return _GatAttention.apply(pattern, src, a_dst, *args)
    return _gat_attention_torch(pattern, src, a_dst, *args)


def _dropout_args(p: float) -> tuple[int, float]:
    """(threshold, scale) of the ops; threshold 0 switches dropout off."""
    return (0, 1.0) if p == 0.0 else (threshold(p), dropout_scale(p))


class _GatAttention(Function):
    """The C++ op; backward by its backward op over the pattern and its transpose."""

    @staticmethod
    def forward(ctx, pattern, src, a_dst, heads, p, key, row_ids, col_ids):
        src, a_dst = src.contiguous(), a_dst.contiguous()
        common = (heads, NEGATIVE_SLOPE, to_int64(key), row_ids, col_ids, *_dropout_args(p))
        out, alpha, alpha_self = _ext.ops().gat_attention(
            pattern.indptr, pattern.indices, src, a_dst, *common
        )
        ctx.save_for_backward(src, a_dst, alpha, alpha_self)
        ctx.pattern, ctx.common = pattern, common
        return out

    @staticmethod
    def backward(ctx, grad_out):
        src, a_dst, alpha, alpha_self = ctx.saved_tensors
        pattern = ctx.pattern
        grad_src, grad_a_dst = _ext.ops().gat_attention_backward(
            pattern.indptr,
            pattern.indices,
            *_transposed(pattern),
            src,
            a_dst,
            alpha,
            alpha_self,
            grad_out.contiguous(),
            *ctx.common,
        )
        return None, grad_src, grad_a_dst, None, None, None, None, None


# pattern → (t_indptr, t_rows, t_edges), built on a pattern's first backward, kept while it lives.
_TRANSPOSED: WeakKeyDictionary[CSR, tuple[Tensor, Tensor, Tensor]] = WeakKeyDictionary()


def _transposed(pattern: CSR) -> tuple[Tensor, Tensor, Tensor]:
    """The pattern by columns: pointers (n_cols + 1,), each entry's row and edge id (nnz,)."""
    if pattern not in _TRANSPOSED:
        edges = torch.argsort(pattern.indices, stable=True)
        counts = torch.bincount(pattern.indices, minlength=pattern.n_cols)
        indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        _TRANSPOSED[pattern] = (indptr, pattern.row_ids()[edges], edges)
    return _TRANSPOSED[pattern]


def _gat_attention_torch(
    pattern: CSR, src: Tensor, a_dst: Tensor, heads: int, p: float, key: int, row_ids, col_ids
) -> Tensor:
    """The pure-PyTorch fallback: the same math over an edge list with self-loops, by autograd."""
    n_rows = pattern.n_rows
    loops = torch.arange(n_rows, device=src.device)
    rows = torch.cat([pattern.row_ids(), loops])
    cols = torch.cat([pattern.indices, loops])
    width = src.shape[1] // heads - 1
    z = src[:, : heads * width].view(-1, heads, width)
    logits = F.leaky_relu(src[cols, heads * width :] + a_dst[rows], NEGATIVE_SLOPE)  # (E, H)
    peak = torch.full_like(a_dst, float("-inf"))
    peak = peak.scatter_reduce(0, rows[:, None].expand_as(logits), logits.detach(), "amax")
    weights = (logits - peak[rows]).exp()
    alpha = weights / torch.zeros_like(a_dst).index_add(0, rows, weights)[rows]
    if p > 0:
        head = torch.arange(heads, device=src.device)
        counters = (mix_tensor(row_ids[rows]) ^ col_ids[cols])[:, None] * heads + head
        scale = torch.tensor(dropout_scale(p), dtype=alpha.dtype)
        alpha = (alpha * scale).masked_fill(keep_mask(key, counters, p), 0)
    out = torch.zeros(n_rows, heads, width, dtype=src.dtype, device=src.device)
    return out.index_add(0, rows, alpha[..., None] * z[cols]).view(n_rows, heads * width)
