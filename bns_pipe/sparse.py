"""Sparse matrices in CSR form and the SpMM ``Y = acc + A·X`` that GCN layers run on them.

:func:`spmm` runs the C++/CUDA op ``torch.ops.bns_pipe.spmm`` when the extension is loaded and
has a kernel for the device, else torch's own sparse CSR matmul; both give the same result to
float rounding. Its backward is ``Aᵀ·G`` with ``Aᵀ`` built once per matrix and cached.
"""

from __future__ import annotations

import warnings
import weakref
from functools import cache

import torch
from torch import Tensor

from bns_pipe import _ext

__all__ = ["CSR", "spmm"]


class CSR:
    """A sparse ``(n_rows, n_cols)`` matrix in compressed-sparse-row form.

    Row ``i`` holds the entries ``indptr[i]:indptr[i + 1]`` of ``indices`` (column ids, int64)
    and ``values`` (float; ``None`` means all ones). ``indptr`` is int64 of shape
    ``(n_rows + 1,)`` with ``indptr[0] == 0`` and ``indptr[-1] == nnz``.
    """

    __slots__ = ("__weakref__", "_transpose", "indices", "indptr", "n_cols", "values")

    def __init__(self, indptr: Tensor, indices: Tensor, values: Tensor | None, n_cols: int):
        if indptr.dtype != torch.int64 or indices.dtype != torch.int64:
            raise TypeError("CSR: indptr and indices must be int64")
        if indptr.dim() != 1 or indptr.numel() == 0 or indices.dim() != 1:
            raise ValueError("CSR: indptr must be 1-D with n_rows + 1 entries, indices 1-D")
        if values is not None and values.shape != indices.shape:
            raise ValueError("CSR: values must have one entry per index")
        self.indptr = indptr
        self.indices = indices
        self.values = values
        self.n_cols = int(n_cols)
        self._transpose: CSR | weakref.ref[CSR] | None = None

    @classmethod
    def from_coo(
        cls,
        row: Tensor,
        col: Tensor,
        shape: tuple[int, int],
        values: Tensor | None = None,
    ) -> CSR:
        """The matrix with entries ``A[row[k], col[k]] = values[k]`` (duplicates are kept)."""
        n_rows, n_cols = shape
        perm = torch.argsort(row, stable=True)
        counts = torch.bincount(row, minlength=n_rows)
        indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(indptr, col[perm], None if values is None else values[perm], n_cols)

    @classmethod
    def from_dense(cls, dense: Tensor) -> CSR:
        """The nonzero entries of a 2-D dense tensor."""
        row, col = dense.nonzero(as_tuple=True)
        return cls.from_coo(row, col, tuple(dense.shape), dense[row, col])

    @property
    def n_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def __repr__(self) -> str:
        kind = "ones" if self.values is None else str(self.values.dtype)
        return f"CSR(shape={self.shape}, nnz={self.nnz}, values={kind}, device={self.device})"

    def row_ids(self) -> Tensor:
        """The row of every stored entry, ``(nnz,)`` int64."""
        rows = torch.arange(self.n_rows, device=self.device)
        return torch.repeat_interleave(rows, self.indptr.diff(), output_size=self.nnz)

    def transpose(self) -> CSR:
        """``Aᵀ`` as a CSR ``(n_cols, n_rows)``, built on the first call and cached both ways.

        A stable sort of the column ids keeps each column's rows ascending.
        """
        cached = self._cached_transpose()
        if cached is None:
            perm = torch.argsort(self.indices, stable=True)
            counts = torch.bincount(self.indices, minlength=self.n_cols)
            indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            values = None if self.values is None else self.values[perm]
            cached = CSR(indptr, self.row_ids()[perm], values, self.n_rows)
            self.set_transpose(cached)
        return cached

    def set_transpose(self, t: CSR) -> None:
        """Record ``t`` as this matrix's transpose (and this as ``t``'s), e.g. when both were
        derived together; :meth:`transpose` then returns it without building one. This
        matrix holds ``t``; ``t`` refers back weakly, so the pair is no reference cycle: a
        pair made each epoch (dropout, BNS) is freed when dropped, not at the next garbage
        collection (a cycle kept every epoch's pair alive until then: RSS grew by 8 MB an
        epoch on Coauthor CS)."""
        self._transpose, t._transpose = t, weakref.ref(self)

    def _cached_transpose(self) -> CSR | None:
        link = self._transpose
        return link() if isinstance(link, weakref.ref) else link

    def column_block(self, start: int, stop: int) -> CSR:
        """Columns ``[start, stop)`` as an ``(n_rows, stop - start)`` CSR, ids shifted by -start.

        Splits a local graph into its inner block and its halo block.
        """
        keep = (self.indices >= start) & (self.indices < stop)
        kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.cumsum(0)])
        values = None if self.values is None else self.values[keep]
        return CSR(kept_before[self.indptr], self.indices[keep] - start, values, stop - start)

    def with_values(self, values: Tensor | None) -> CSR:
        """The same sparsity pattern with new ``values`` (``(nnz,)``, or ``None`` for ones)."""
        return CSR(self.indptr, self.indices, values, self.n_cols)

    def plus_diagonal(self, diagonal: Tensor) -> CSR:
        """``A + diag(diagonal)`` for a square A with values (each row's columns stay
        ascending; an existing diagonal entry gets a second, added one)."""
        n = self.n_rows
        if self.n_cols != n or self.values is None or diagonal.shape != (n,):
            raise ValueError("plus_diagonal needs a square CSR with values and an (n,) diagonal")
        ids = torch.arange(n, device=self.device)
        rows, cols = torch.cat([self.row_ids(), ids]), torch.cat([self.indices, ids])
        values = torch.cat([self.values, diagonal.to(self.values)])
        order = torch.argsort(rows * n + cols, stable=True)
        return CSR.from_coo(rows[order], cols[order], (n, n), values[order])

    def scale(self, row: Tensor | None = None, col: Tensor | None = None) -> CSR:
        """``diag(row) · A · diag(col)``, e.g. ``D^-1/2 A D^-1/2`` with ``row = col = deg^-1/2``."""
        if row is None and col is None:
            return self
        values = self.values
        if values is None:
            dtype = (row if row is not None else col).dtype
            values = torch.ones(self.nnz, dtype=dtype, device=self.device)
        if row is not None:
            values = values * row[self.row_ids()]
        if col is not None:
            values = values * col[self.indices]
        return self.with_values(values)

    def to(self, device: torch.device | str) -> CSR:
        """A copy on ``device``; a cached transpose moves along."""
        out = self._moved(device)
        cached = self._cached_transpose()
        if cached is not None:
            out.set_transpose(cached._moved(device))
        return out

    def _moved(self, device: torch.device | str) -> CSR:
        values = None if self.values is None else self.values.to(device)
        return CSR(self.indptr.to(device), self.indices.to(device), values, self.n_cols)


class _SpMM(torch.autograd.Function):
    """``Y = acc + A·X``; gradients ``dX = Aᵀ·G`` and ``dacc = G`` (A is a constant)."""

    @staticmethod
    def forward(ctx, A: CSR, X: Tensor, acc: Tensor | None) -> Tensor:
        ctx.A = A
        return _spmm_forward(A, X, acc)

    @staticmethod
    def backward(ctx, G: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        dX = spmm(ctx.A.transpose(), G) if ctx.needs_input_grad[1] else None
        return None, dX, G if ctx.needs_input_grad[2] else None


def spmm(A: CSR, X: Tensor, acc: Tensor | None = None) -> Tensor:
    """``Y = acc + A·X``: ``(n_rows, F)`` from ``X`` of shape ``(n_cols, F)``; differentiable.

    ``acc`` (``(n_rows, F)``, optional) is added in the same pass, so a distributed layer gets
    ``A_inner·X_inner + A_halo·X_halo`` as ``spmm(A_halo, X_halo, spmm(A_inner, X_inner))``.
    """
    if X.dim() != 2 or X.shape[0] != A.n_cols:
        raise ValueError(f"spmm: X must be (n_cols={A.n_cols}, F), got {tuple(X.shape)}")
    if acc is not None and acc.shape != (A.n_rows, X.shape[1]):
        raise ValueError(f"spmm: acc must be ({A.n_rows}, {X.shape[1]}), got {tuple(acc.shape)}")
    return _SpMM.apply(A, X, acc)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@cache
def _ext_has_kernel(device_type: str) -> bool:
    """Whether the loaded extension's spmm has a kernel for ``device_type``."""
    key = _DISPATCH_KEYS.get(device_type)
    return (
        key is not None
        and _ext.available()
        and _ext.ops().spmm.default.has_kernel_for_dispatch_key(key)
    )


def _values_like(A: CSR, X: Tensor) -> Tensor | None:
    return None if A.values is None else A.values.to(X.dtype)


def _spmm_forward(A: CSR, X: Tensor, acc: Tensor | None = None) -> Tensor:
    """``acc + A·X`` without autograd, through the extension when it serves the device."""
    if X.dtype in (torch.float32, torch.float64) and _ext_has_kernel(X.device.type):
        return _spmm_ext(A, X, acc)
    return _spmm_torch(A, X, acc)


def _spmm_ext(A: CSR, X: Tensor, acc: Tensor | None = None) -> Tensor:
    """``acc + A·X`` by ``torch.ops.bns_pipe.spmm``."""
    acc = None if acc is None else acc.contiguous()
    return _ext.ops().spmm(A.indptr, A.indices, _values_like(A, X), X.contiguous(), acc)


def _spmm_torch(A: CSR, X: Tensor, acc: Tensor | None = None) -> Tensor:
    """``acc + A·X`` by torch's sparse CSR matmul (the pure-PyTorch fallback).

    On the CPU this is torch's own row-parallel kernel (``reduce="sum"``), not MKL's
    (``M @ X``): neither wins everywhere in ``benchmarks/results/spmm.md``, and this one is
    faster on the GCN case there (100k nodes, F = 128, forward and transpose).
    """
    values = _values_like(A, X)
    if values is None:
        values = torch.ones(A.nnz, dtype=X.dtype, device=X.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        M = torch.sparse_csr_tensor(A.indptr, A.indices, values, A.shape, check_invariants=False)
    if X.device.type == "cpu":
        Y = torch.sparse.mm(M, X, "sum")
        return Y if acc is None else Y.add_(acc)
    return M @ X if acc is None else torch.addmm(acc, M, X)
