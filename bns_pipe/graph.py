"""One rank's graph for message passing: normalised inner and halo blocks plus the exchange.

For inner node i the layers need ``sum_j a_ij h_j`` over its in-neighbours j, inner or halo:

- ``"gcn"``: ``a_ij = 1 / sqrt((d_i + 1)(d_j + 1))`` plus the self-loop term ``h_i / (d_i + 1)``
  (PyG ``GCNConv``'s symmetric normalisation with self-loops), d the *global* in-degree;
- ``"mean"``: ``a_ij = 1 / d_i`` (PyG ``SAGEConv``'s mean aggregation; 0 without neighbours).

The local CSR is split by columns into an inner block (n_inner, n_inner) and a halo block
(n_inner, n_halo). :func:`aggregate` starts the halo exchange, multiplies the inner block
while it is in flight, then adds the halo block; backward mirrors it. The halo rows come
from a *transport*: the synchronous :class:`~bns_pipe.comm.halo.HaloExchange`, or during
pipelined training the one-epoch-stale :class:`~bns_pipe.comm.pipeline.HaloPipeline`.

Attention layers (GAT) weigh edges by their endpoints, so they take the unweighted local
pattern over the columns ``[inner | halo rows in use]`` (:meth:`attention_pattern`) and fetch
the halo rows of their transformed features themselves (:meth:`with_halo`), through the same
transport; under BNS the pattern keeps the sampled halo columns only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from bns_pipe.comm.halo import HaloExchange
from bns_pipe.comm.pipeline import HaloPipeline
from bns_pipe.hooks import InnerOperator, LayerHook
from bns_pipe.partition import Partition
from bns_pipe.sampling import EpochSample, filter_columns, filter_halo_block
from bns_pipe.sparse import CSR, spmm

AGGREGATIONS = ("gcn", "mean")


class LocalGraph:
    """Normalised blocks of one partition and the halo exchange that feeds them.

    ``global_ids`` (n_inner,) are the inner nodes' global ids (they key dropout masks). A hook
    may replace each inner block by an :class:`~bns_pipe.hooks.InnerOperator` (the first hook
    that offers one wins); the halo block keeps its path.
    """

    def __init__(
        self,
        part: Partition,
        exchange: HaloExchange | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        hooks: Sequence[LayerHook] = (),
    ) -> None:
        self.n_inner, self.n_halo = part.n_inner, part.n_halo
        self.global_ids = part.inner_global_ids.to(device)
        self.halo_global_ids = part.halo_global_ids.to(device)
        self.exchange = exchange
        self.transport: HaloExchange | HaloPipeline | None = exchange
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
        self_weight = 1.0 / (degree[: self.n_inner] + 1)
        self.self_weight = self_weight.to(device, dtype).unsqueeze(1)
        self.inner: dict[str, InnerOperator] = {}
        for kind, (block, _) in self.blocks.items():
            default = CsrOperator(block)
            if kind == "gcn":  # the self-loop term inside the product
                default = CsrOperator(block.plus_diagonal(self_weight.to(device)), True)
            offered = (hook.inner_operator(kind, default) for hook in hooks)
            self.inner[kind] = next((op for op in offered if op is not None), default)
        self.sample: EpochSample | None = None
        self.sampled_blocks: dict[str, CSR] = {}
        self.pattern: tuple[CSR, torch.Tensor] | None = None  # built on first use (GAT)
        self.sampled_pattern: tuple[CSR, torch.Tensor] | None = None
        self.row_scale: torch.Tensor | None = None
        self.norm, self.sample_scale, self.filter_s = "unbiased", 1.0, 0.0

    def use_sample(
        self, sample: EpochSample | None, scale: float = 1.0, norm: str = "unbiased"
    ) -> None:
        """Aggregate over the kept halo columns of ``sample`` (BNS) until the next call.

        ``"unbiased"``: kept halo contributions are scaled by ``scale`` (1/p), normalisation
        keeps global degrees; ``"renorm"``: each row's neighbour sum is scaled by
        ``d_i / d̃_i``, its degree over its sampled degree. ``None`` restores the full graph.
        """
        self.sample, self.sampled_blocks, self.row_scale = sample, {}, None
        self.sampled_pattern = None
        if self.exchange is None:
            return
        self.exchange.use_plan(sample)
        if sample is None:
            return
        self.norm, self.sample_scale = norm, scale
        if norm == "renorm":
            halo = self.blocks["mean"][1]
            kept = torch.zeros(halo.n_rows, dtype=torch.float64, device=halo.indptr.device)
            rows = halo.row_ids()[sample.halo_keep[halo.indices]]
            kept.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
            inner_degree = self.blocks["mean"][0].indptr.diff().to(torch.float64)
            full = inner_degree + halo.indptr.diff()
            sampled = inner_degree + kept
            scale = torch.where(sampled > 0, full / sampled.clamp(min=1), torch.ones_like(full))
            self.row_scale = scale.to(self.self_weight.dtype).unsqueeze(1)

    def use_pipeline(self, pipeline: HaloPipeline | None) -> None:
        """Take halo rows from ``pipeline`` (stale by one epoch) until the next call;
        ``None`` restores the synchronous exchange."""
        self.transport = self.exchange if pipeline is None else pipeline

    def _halo_block(self, kind: str) -> CSR:
        """The halo block in use: full, or filtered to this epoch's sample (built once)."""
        if self.sample is None:
            return self.blocks[kind][1]
        if kind not in self.sampled_blocks:
            start = time.perf_counter()
            halo = self.blocks[kind][1]
            scale = 1.0 if self.norm == "renorm" else self.sample_scale
            self.sampled_blocks[kind] = filter_halo_block(
                halo, halo.transpose(), self.sample.halo_keep, scale
            )[0]
            self.filter_s += time.perf_counter() - start
        return self.sampled_blocks[kind]

    def attention_pattern(self) -> tuple[CSR, torch.Tensor]:
        """The unweighted in-edges (n_inner, n_inner + n_kept_halo) over the columns ``[inner |
        halo rows in use]``, and those columns' global ids (n_inner + n_kept_halo,)."""
        if self.pattern is None:
            # the local CSR again, from its two blocks: rows list their columns in ascending
            # order, inner before halo, so a stable sort by row restores the original order
            inner, halo = self.blocks["gcn"]
            rows = torch.cat([inner.row_ids(), halo.row_ids()])
            cols = torch.cat([inner.indices, halo.indices + self.n_inner])
            shape = (self.n_inner, self.n_inner + self.n_halo)
            columns = torch.cat([self.global_ids, self.halo_global_ids])
            self.pattern = CSR.from_coo(rows, cols, shape), columns
        if self.sample is None:
            return self.pattern
        if self.sampled_pattern is None:
            start = time.perf_counter()
            halo_keep = self.sample.halo_keep
            keep = torch.cat([halo_keep.new_ones(self.n_inner), halo_keep])
            columns = torch.cat([self.global_ids, self.halo_global_ids[halo_keep]])
            self.sampled_pattern = filter_columns(self.pattern[0], keep), columns
            self.filter_s += time.perf_counter() - start
        return self.sampled_pattern

    def with_halo(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``[x | x_halo]``: x (n_inner, F) and below it the halo rows in use (n_kept_halo, F),
        fetched from their owners; differentiable (halo gradients return to the owners)."""
        if self.exchange is None:
            return x
        return _HaloRows.apply(x, self.transport, layer)

    def aggregate(self, x: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
        """``A x`` for inner rows: x (n_inner, F) → (n_inner, F), halo rows fetched from peers."""
        inner = self.inner[kind]
        if self.exchange is None:
            out = _InnerProduct.apply(x, inner)
        else:
            out = _DistributedSpmm.apply(x, inner, self._halo_block(kind), self.transport, layer)
        looped = kind == "gcn" and getattr(inner, "self_loops", False)
        if self.row_scale is not None:
            out = out * self.row_scale
            if looped:  # renorm scales the neighbour sum, not the self-loop term
                out = out + (1 - self.row_scale) * self.self_weight * x
        if kind == "gcn" and not looped:
            out = out + self.self_weight * x
        return out


class CsrOperator:
    """The inner block as an :class:`~bns_pipe.hooks.InnerOperator` (the default); GCN's
    includes its self-loop term (``self_loops``), saving two passes over x each way."""

    def __init__(self, block: CSR, self_loops: bool = False) -> None:
        self.block, self.self_loops = block, self_loops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return spmm(self.block, x)

    def transposed(self, g: torch.Tensor) -> torch.Tensor:
        return spmm(self.block.transpose(), g)


class _InnerProduct(torch.autograd.Function):
    """``A_inner x`` by an operator; backward ``A_innerᵀ g``."""

    @staticmethod
    def forward(ctx, x, inner: InnerOperator):
        ctx.inner = inner
        return inner(x.detach())

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.inner.transposed(grad_out.contiguous()), None


class _DistributedSpmm(torch.autograd.Function):
    """``A_inner x + A_halo x_halo`` with the halo transfer overlapping the inner product."""

    @staticmethod
    def forward(
        ctx, x, inner: InnerOperator, halo: CSR, transport: HaloExchange | HaloPipeline, layer
    ):
        sent = transport.send_features(x.detach(), layer)
        out = inner(x.detach())
        x_halo = transport.halo_features(sent, layer)
        if x_halo.numel():
            out = spmm(halo, x_halo, out)
        ctx.blocks, ctx.transport, ctx.layer = (inner, halo), transport, layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inner, halo = ctx.blocks
        grad_out = grad_out.contiguous()
        sent = ctx.transport.send_gradients(spmm(halo.transpose(), grad_out), ctx.layer)
        grad_x = inner.transposed(grad_out)
        ctx.transport.add_returned_gradients(sent, ctx.layer, grad_x)
        return grad_x, None, None, None, None


class _HaloRows(torch.autograd.Function):
    """``[x | x_halo]``; backward sends the halo rows' gradients to their owners and adds
    the gradients returned for this rank's sent rows."""

    @staticmethod
    def forward(ctx, x, transport: HaloExchange | HaloPipeline, layer):
        sent = transport.send_features(x.detach(), layer)
        ctx.transport, ctx.layer, ctx.n_inner = transport, layer, x.shape[0]
        return torch.cat([x.detach(), transport.halo_features(sent, layer)])

    @staticmethod
    def backward(ctx, grad_out):
        grad_halo = grad_out[ctx.n_inner :].contiguous()
        sent = ctx.transport.send_gradients(grad_halo, ctx.layer)
        grad_x = grad_out[: ctx.n_inner].clone()
        ctx.transport.add_returned_gradients(sent, ctx.layer, grad_x)
        return grad_x, None, None
