"""Dropout whose mask is keyed by global node id, so it does not depend on the partitioning.

For x (R, C) whose row r is global node ``row_ids[r]``, element (r, c) is kept iff
``uniform(key, row_ids[r] * C + c) >= p`` (:mod:`bns_pipe.random`), and then scaled by
``1 / (1 - p)``::

    y[r, c] = x[r, c] * s   if kept,   0 otherwise,      s = 1 / (1 - p) rounded to x.dtype

The mask is a function of (key, global row, column) only, so a graph split over any number of
ranks, in any row order, gets exactly the dropout of the single-process model. ``y = D x`` with
``D`` diagonal, so the backward is the same map applied to the incoming gradient; the mask is
recomputed there instead of stored. Sparse input features (a CSR) drop their stored entries
with the same mask (:func:`keyed_dropout_csr`): dropout maps zeros to zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from bns_pipe import _ext
from bns_pipe.random import check_probability, has_ext_kernel, keep_mask, threshold, to_int64
from bns_pipe.sparse import CSR

__all__ = ["KeyedDropout", "dropout_scale", "keyed_dropout", "keyed_dropout_csr"]

# Elements per row chunk of the pure-PyTorch path, bounding its int64 temporaries.
_CHUNK = 1 << 20


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)``; 0 for p = 1, where nothing is kept."""
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _dropout_torch(x: Tensor, key: int, row_ids: Tensor, p: float) -> Tensor:
    """The pure-PyTorch keyed dropout, over row chunks; bit-identical to the C++ op."""
    n_rows, n_cols = x.shape
    s = torch.tensor(dropout_scale(p), dtype=x.dtype)
    cols = torch.arange(n_cols, device=x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    step = max(1, _CHUNK // max(1, n_cols))
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        dropped = keep_mask(key, row_ids[rows, None] * n_cols + cols, p)
        torch.mul(x[rows], s, out=out[rows]).masked_fill_(dropped, 0)
    return out


def _dropout(x: Tensor, key: int, row_ids: Tensor, p: float) -> Tensor:
    if has_ext_kernel("keyed_dropout_rows", x.device):
        return _ext.ops().keyed_dropout_rows(
            x, to_int64(key), row_ids, threshold(p), dropout_scale(p)
        )
    return _dropout_torch(x, key, row_ids, p)


class _KeyedDropoutFn(Function):
    """``y = D x``, D = diag(mask * s); backward ``dx = D dy`` with the mask recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor, key: int, row_ids: Tensor, p: float) -> Tensor:
        ctx.save_for_backward(row_ids)
        ctx.key, ctx.p = key, p
        return _dropout(x, key, row_ids, p)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (row_ids,) = ctx.saved_tensors
        return _KeyedDropoutFn.apply(grad, ctx.key, row_ids, ctx.p), None, None, None


def keyed_dropout(x: Tensor, p: float, key: int, row_ids: Tensor, training: bool = True) -> Tensor:
    """Dropout of x (R, C) with the mask keyed by ``key`` and global row ids (R,) int64.

    The identity when ``training`` is False or p = 0.
    """
    check_probability(p)
    if not training or p == 0.0:
        return x
    if x.dim() != 2 or row_ids.shape != (x.shape[0],) or row_ids.dtype != torch.int64:
        raise ValueError(
            f"keyed_dropout expects x (R, C) and int64 row_ids (R,), got x {tuple(x.shape)} "
            f"and row_ids {tuple(row_ids.shape)} {row_ids.dtype}"
        )
    return _KeyedDropoutFn.apply(x, key, row_ids, p)


def keyed_dropout_csr(x: CSR, p: float, key: int, row_ids: Tensor) -> CSR:
    """:func:`keyed_dropout` of a constant sparse x (R, C): its stored entries take the mask
    the dense x would, so the result equals the dense dropout, stored sparse and compact (the
    dropped entries leave the structure, so the products over it skip them: half the work
    at p = 0.5).

    x's cached transpose (built once) drops the same entries, element for element, so the
    weight gradient ``xᵀ G`` needs no transpose built per epoch.
    """
    check_probability(p)
    if p == 0.0:
        return x
    if x.values is None:
        raise ValueError("keyed_dropout_csr needs stored values (features), not a pattern")
    # entry (r, c) of x has the counter row_ids[r]·C + c; x's column c is row c of xᵀ
    scaled_ids = row_ids * x.n_cols
    columns = torch.arange(x.n_cols, device=row_ids.device)
    out = _drop_entries(x, scaled_ids, columns, key, p)
    out.set_transpose(_drop_entries(x.transpose(), columns, scaled_ids, key, p))
    return out


def _drop_entries(x: CSR, row_base: Tensor, col_base: Tensor, key: int, p: float) -> CSR:
    """x's kept entries, scaled as :func:`keyed_dropout` scales them, in a CSR of their own;
    entry (r, c) has the mask counter ``row_base[r] + col_base[c]`` (int64)."""
    if has_ext_kernel("keyed_dropout_csr", x.device):  # two passes, the same bits
        scale, t = dropout_scale(p), threshold(p)
        parts = _ext.ops().keyed_dropout_csr(
            x.indptr, x.indices, x.values, to_int64(key), row_base, col_base, t, scale
        )
        return CSR(*parts, x.n_cols)
    rows = x.row_ids()
    kept = ~keep_mask(key, row_base[rows] + col_base[x.indices], p)
    counts = torch.bincount(rows[kept], minlength=x.n_rows)
    indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    values = x.values[kept] * torch.tensor(dropout_scale(p), dtype=x.values.dtype)
    return CSR(indptr, x.indices[kept], values, x.n_cols)


class KeyedDropout(nn.Module):
    """:func:`keyed_dropout` with a fixed p; ``forward(x, key, row_ids)``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        check_probability(p)
        self.p = p

    def forward(self, x: Tensor, key: int, row_ids: Tensor) -> Tensor:
        return keyed_dropout(x, self.p, key, row_ids, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
