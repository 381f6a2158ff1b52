"""Boundary-node sampling (BNS-GCN, MLSys'22): each epoch, each boundary node travels with
probability p; one sample serves every layer of the epoch.

For the ordered pair (owner j → receiver i) in epoch t, position q of j's send list to i is kept
iff ::

    keep(q) = keep_mask(stream_key(seed, SAMPLING_STREAM, t, j, i), q, p)

(:mod:`bns_pipe.random`). The owner evaluates it over its send list, the receiver over its
halo group from j (the same nodes in the same order), so both agree without exchanging indices.
The receiver restricts its halo block to the kept columns and scales it by ``1/p``::

    Â_halo = A_halo[:, kept] / p,    E[Â_halo · X_halo[kept]] = A_halo · X_halo,

so the halo aggregation stays unbiased; gradients return through ``Â_haloᵀ`` to the kept rows
only. p = 1 keeps every node (the exact, unsampled layer), p = 0 none.

The ops :func:`filter_halo_block`, :func:`pack_rows` and :func:`scatter_add_rows` run the C++/CUDA
ops of ``csrc/bns_ops.cpp`` when the extension is loaded with a kernel for the device, else
pure PyTorch; both give bit-identical results (on CUDA, repeated indices of
:func:`scatter_add_rows` are summed in an unspecified order, as by ``index_add_``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bns_pipe import _ext
from bns_pipe.random import has_ext_kernel, keep_mask, stream_key
from bns_pipe.sparse import CSR

__all__ = [
    "SAMPLING_STREAM",
    "BoundarySampler",
    "EpochSample",
    "filter_columns",
    "filter_halo_block",
    "full_sample",
    "pack_rows",
    "scatter_add_rows",
    "send_keep",
]

# Tags BNS keys, so that they differ from the dropout keys (seed, epoch, layer[, 1]).
SAMPLING_STREAM = int.from_bytes(b"bns-samp", "little")

_FLOATS = (torch.float32, torch.float64)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"BNS keep probability p must be in [0, 1], got {p}")


def send_keep(
    seed: int,
    epoch: int,
    owner: int,
    receiver: int,
    n: int,
    p: float,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which of the ``n`` boundary nodes ``owner`` sends ``receiver`` travel in ``epoch``.

    Returns a bool mask ``(n,)``: position q of the owner's send list to the receiver, equally
    position q of the receiver's halo group from the owner. Both sides call this function.
    """
    _check_p(p)
    key = stream_key(seed, SAMPLING_STREAM, epoch, owner, receiver)
    return keep_mask(key, torch.arange(n, device=device), p)


def _use_ext(op: str, device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether ``torch.ops.bns_pipe.<op>`` serves ``device`` and float tensors of ``dtypes``."""
    return all(d in _FLOATS for d in dtypes) and has_ext_kernel(op, device)


def _scaled(values: Tensor, scale: float) -> Tensor:
    """``values * scale`` (in ``values``' dtype), without a pass when scale is 1."""
    return values if scale == 1.0 else values * scale


def _filter(A: CSR, keep: Tensor, scale: float, by: str) -> CSR:
    """``A[:, keep] * scale`` (``by="columns"``, columns renumbered in order) or
    ``A[keep, :] * scale`` (``by="rows"``); entries keep their order within a row.

    Without values (all ones) the result has none at scale 1 and ``scale`` in the default
    dtype otherwise.
    """
    values = A.values
    if values is None and scale != 1.0:
        values = torch.ones(A.nnz, dtype=torch.get_default_dtype(), device=A.device)
    n_cols = int(keep.sum()) if by == "columns" else A.n_cols
    dtypes = () if values is None else (values.dtype,)
    if _use_ext(f"filter_csr_{by}", A.device, *dtypes):
        op = getattr(_ext.ops(), f"filter_csr_{by}")
        indptr, indices, out = op(
            A.indptr.contiguous(), A.indices.contiguous(), values, keep.contiguous(), scale
        )
        return CSR(indptr, indices, None if values is None else out, n_cols)
    if by == "columns":
        entry_keep = keep[A.indices]
        kept_before = torch.cat([A.indptr.new_zeros(1), entry_keep.cumsum(0)])
        indptr = kept_before[A.indptr]
        indices = (keep.cumsum(0) - 1)[A.indices[entry_keep]]
    else:
        lengths = A.indptr.diff()
        entry_keep = torch.repeat_interleave(keep, lengths, output_size=A.nnz)
        indptr = torch.cat([A.indptr.new_zeros(1), lengths[keep].cumsum(0)])
        indices = A.indices[entry_keep]
    return CSR(
        indptr, indices, None if values is None else _scaled(values[entry_keep], scale), n_cols
    )


def filter_columns(A: CSR, keep: Tensor) -> CSR:
    """``A[:, keep]``, kept columns renumbered to ``[0, n_kept)`` in order (bool keep
    (n_cols,)); e.g. a GAT layer's local pattern restricted to the sampled halo."""
    return _filter(A, keep, 1.0, "columns")


def filter_halo_block(halo: CSR, halo_t: CSR, col_keep: Tensor, scale: float) -> tuple[CSR, CSR]:
    """The halo block restricted to the kept halo nodes and scaled, with its transpose.

    ``halo`` is ``A_halo`` (n_inner, n_halo), ``halo_t`` its cached transpose (n_halo,
    n_inner), ``col_keep`` bool (n_halo,). Returns ``(A_halo[:, keep] * scale,
    (A_halo[:, keep] * scale)ᵀ)`` of shapes (n_inner, n_kept) and (n_kept, n_inner): kept
    columns are renumbered to ``[0, n_kept)`` in order, and the transpose is a row filter of
    ``halo_t`` (no re-transposition). Each is the other's cached :meth:`CSR.transpose`, so an
    :func:`~bns_pipe.sparse.spmm` on the result runs its backward on the filtered transpose.
    """
    n_inner, n_halo = halo.shape
    if halo_t.shape != (n_halo, n_inner) or halo_t.nnz != halo.nnz:
        raise ValueError(
            f"filter_halo_block: halo_t must be the ({n_halo}, {n_inner}) transpose of halo "
            f"with {halo.nnz} entries, got {halo_t}"
        )
    if col_keep.dtype != torch.bool or col_keep.shape != (n_halo,):
        raise ValueError(
            f"filter_halo_block: col_keep must be bool of shape ({n_halo},), "
            f"got {col_keep.dtype} {tuple(col_keep.shape)}"
        )
    block = _filter(halo, col_keep, scale, "columns")
    block_t = _filter(halo_t, col_keep, scale, "rows")
    block.set_transpose(block_t)
    return block, block_t


def _check_rows(x: Tensor, index: Tensor, op: str) -> None:
    if x.dim() != 2 or index.dim() != 1:
        raise ValueError(
            f"{op}: expected 2-D rows and a 1-D index, got {tuple(x.shape)} and "
            f"{tuple(index.shape)}"
        )


def pack_rows(x: Tensor, index: Tensor, scale: float = 1.0) -> Tensor:
    """The send buffer ``x[index] * scale``: x (n, F), index (m,) int64 → contiguous (m, F)."""
    _check_rows(x, index, "pack_rows")
    if index.dtype == torch.int64 and _use_ext("pack_rows", x.device, x.dtype):
        return _ext.ops().pack_rows(x, index, scale)
    rows = x.index_select(0, index)
    return rows if scale == 1.0 else rows.mul_(scale)


def scatter_add_rows(out: Tensor, index: Tensor, rows: Tensor, scale: float = 1.0) -> Tensor:
    """``out[index[r]] += rows[r] * scale`` for r = 0, ..., m-1 in place; returns ``out``.

    out (n, F), index (m,) int64, rows (m, F). Repeated indices accumulate (the concatenation
    of send lists over peers repeats a node sent to several peers), in the order of ``index``
    on the CPU, as ``out.index_add_(0, index, rows * scale)``.
    """
    _check_rows(out, index, "scatter_add_rows")
    if rows.shape != (index.numel(), out.shape[1]):
        raise ValueError(
            f"scatter_add_rows: rows must be ({index.numel()}, {out.shape[1]}), "
            f"got {tuple(rows.shape)}"
        )
    if (
        index.dtype == torch.int64
        and rows.dtype == out.dtype
        and out.is_contiguous()
        and _use_ext("scatter_add_rows", out.device, out.dtype)
    ):
        _ext.ops().scatter_add_rows(out, index, rows, scale)
        return out
    return out.index_add_(0, index, _scaled(rows, scale))


@dataclass(frozen=True)
class EpochSample:
    """One rank's boundary sample for one epoch: the plan of its halo transfers.

    ``send_index`` (m,) int64: the kept local inner rows to pack, concatenated over peers in
    rank order; ``send_splits[j]`` of them go to peer j. ``send_keep`` (n_send,) bool: which
    positions of the concatenated send lists survive (``send_index`` is the concatenated
    send lists at these positions). ``recv_splits[j]``: kept halo rows from owner j.
    ``halo_keep`` (n_halo,) bool: which halo columns survive (halo grouped by owner in rank
    order). ``sample_s``: seconds spent sampling. The tensors may be shared between epochs:
    treat them as read-only.
    """

    epoch: int
    send_index: Tensor
    send_splits: list[int]
    send_keep: Tensor
    recv_splits: list[int]
    halo_keep: Tensor
    sample_s: float = 0.0

    @property
    def n_kept_halo(self) -> int:
        return sum(self.recv_splits)

    def to(self, device: torch.device | str) -> EpochSample:
        return dataclasses.replace(
            self,
            send_index=self.send_index.to(device),
            send_keep=self.send_keep.to(device),
            halo_keep=self.halo_keep.to(device),
        )


def full_sample(
    send_ids: Sequence[Tensor], halo_counts: Sequence[int] | Tensor, epoch: int = -1
) -> EpochSample:
    """The plan that keeps every boundary node (p = 1, and evaluation)."""
    send_index = torch.cat(list(send_ids))
    recv_splits = [int(c) for c in halo_counts]
    device = send_index.device
    return EpochSample(
        epoch,
        send_index,
        [int(ids.numel()) for ids in send_ids],
        torch.ones(send_index.numel(), dtype=torch.bool, device=device),
        recv_splits,
        torch.ones(sum(recv_splits), dtype=torch.bool, device=device),
    )


class BoundarySampler:
    """The per-rank BNS sampler: built once, :meth:`sample` once per epoch.

    ``send_ids``: K tensors of local inner indices (``send_ids[j]`` for peer j, in the order
    of j's halo group from this rank); ``halo_counts`` (K,): halo nodes owned by each rank.
    Per epoch the work is 2K mask evaluations over the send lists and halo groups. ``scale``
    is the unbiased weight of a kept node, ``1/p`` (1 when p = 0: nothing is kept).
    """

    def __init__(
        self,
        seed: int,
        rank: int,
        world_size: int,
        send_ids: Sequence[Tensor],
        halo_counts: Sequence[int] | Tensor,
        p: float,
        device: torch.device | str | None = None,
    ) -> None:
        _check_p(p)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if len(send_ids) != world_size or len(halo_counts) != world_size:
            raise ValueError(
                f"need one send list and one halo count per rank ({world_size}), "
                f"got {len(send_ids)} and {len(halo_counts)}"
            )
        if device is None:
            device = send_ids[0].device
        self.seed, self.rank, self.world_size, self.p = seed, rank, world_size, p
        self.device = torch.device(device)
        self.send_ids = [ids.to(self.device) for ids in send_ids]
        self.halo_counts = [int(c) for c in halo_counts]
        self.scale = 1.0 / p if p > 0 else 1.0
        self._full = full_sample(self.send_ids, self.halo_counts)

    def sample(self, epoch: int) -> EpochSample:
        """The kept send rows and halo columns of ``epoch`` (the same on every call)."""
        start = time.perf_counter()
        if self.p == 1.0:  # everything is kept: skip the hashing
            return dataclasses.replace(
                self._full, epoch=epoch, sample_s=time.perf_counter() - start
            )
        args = (self.p, self.device)
        send_masks = [
            send_keep(self.seed, epoch, self.rank, j, ids.numel(), *args)
            for j, ids in enumerate(self.send_ids)
        ]
        halo_masks = [
            send_keep(self.seed, epoch, j, self.rank, count, *args)
            for j, count in enumerate(self.halo_counts)
        ]
        send_keep_all = torch.cat(send_masks)
        counts = torch.stack([m.sum() for m in send_masks + halo_masks]).tolist()
        return EpochSample(
            epoch,
            self._full.send_index[send_keep_all],
            counts[: self.world_size],
            send_keep_all,
            counts[self.world_size :],
            torch.cat(halo_masks),
            time.perf_counter() - start,
        )
