"""One rank's graph for message passing: normalised inner and halo blocks plus the exchange.

For inner node i the layers need ``sum_j a_ij h_j`` over its in-neighbours j, inner or halo:

- ``"gcn"``: ``a_ij = 1 / sqrt((d_i + 1)(d_j + 1))`` plus the self-loop term ``h_i / (d_i + 1)``
  (PyG ``GCNConv``'s symmetric normalisation with self-loops), d the *global* in-degree;
- ``"mean"``: ``a_ij = 1 / d_i`` (PyG ``SAGEConv``'s mean aggregation; 0 without neighbours).

The local CSR is split by columns into an inner block (n_inner, n_inner) and a halo block
(n_inner, n_halo). :func:`aggregate` starts the halo exchange, multiplies the inner block
while it is in flight, then adds the halo block; backward mirrors it.
"""

from __future__ import annotations

import torch

from bns_pipe.comm.halo import HaloExchange
from bns_pipe.partition import Partition
from bns_pipe.sparse import CSR, spmm

AGGREGATIONS = ("gcn", "mean")


class LocalGraph:
    """Normalised blocks of one partition and the halo exchange that feeds them.

    ``global_ids`` (n_inner,) are the inner nodes' global ids (they key dropout masks).
    """

    def __init__(
        self,
        part: Partition,
        exchange: HaloExchange | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_inner, self.n_halo = part.n_inner, part.n_halo
        self.global_ids = part.inner_global_ids.to(device)
        self.exchange = exchange
        degree = part.in_degree.to(torch.float64)
        rows = torch.repeat_interleave(torch.arange(self.n_inner), part.indptr.diff())
        inv_sqrt = (degree + 1).rsqrt()
        values = {
            "gcn": inv_sqrt[rows] * inv_sqrt[part.indices],
            "mean": 1.0 / degree[rows],
        }
        n_local = self.n_inner + self.n_halo
        self.blocks: dict[str, tuple[CSR, CSR]] = {}
        for kind, vals in values.items():
            full = CSR(part.indptr, part.indices, vals.to(dtype), n_local)
            self.blocks[kind] = (
                full.column_block(0, self.n_inner).to(device),
                full.column_block(self.n_inner, n_local).to(device),
            )
        self.self_weight = (1.0 / (degree[: self.n_inner] + 1)).to(device, dtype).unsqueeze(1)

    def aggregate(self, x: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
        """``A x`` for inner rows: x (n_inner, F) → (n_inner, F), halo rows fetched from peers."""
        inner, halo = self.blocks[kind]
        if self.exchange is None:
            out = spmm(inner, x)
        else:
            out = _DistributedSpmm.apply(x, inner, halo, self.exchange, layer)
        if kind == "gcn":
            out = out + self.self_weight * x
        return out


class _DistributedSpmm(torch.autograd.Function):
    """``A_inner x + A_halo x_halo`` with the halo exchange overlapping the inner product."""

    @staticmethod
    def forward(ctx, x, inner: CSR, halo: CSR, exchange: HaloExchange, layer: int):
        transfer = exchange.start_forward(x.detach(), layer)
        out = spmm(inner, x.detach())
        x_halo = exchange.wait(transfer)
        if x_halo.numel():
            out = spmm(halo, x_halo, out)
        ctx.blocks, ctx.exchange, ctx.layer = (inner, halo), exchange, layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inner, halo = ctx.blocks
        grad_out = grad_out.contiguous()
        transfer = ctx.exchange.start_backward(spmm(halo.transpose(), grad_out), ctx.layer)
        grad_x = spmm(inner.transpose(), grad_out)
        returned = ctx.exchange.wait(transfer)
        grad_x.index_add_(0, ctx.exchange.send_index, returned)
        return grad_x, None, None, None, None
