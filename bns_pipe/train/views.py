"""What a rank trains or evaluates on: a local graph with its exchange, features and labels.

Transductive training uses one view for both. ``--inductive`` trains on the subgraph induced
by the training nodes (:func:`training_subgraph`) and evaluates on the full graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bns_pipe.comm.halo import HaloExchange
from bns_pipe.graph import LocalGraph
from bns_pipe.hooks import LayerHook
from bns_pipe.nn.features import prepare_features, wants_sparse
from bns_pipe.partition import Partition
from bns_pipe.partition.restrict import restrict_partition
from bns_pipe.sparse import CSR
from bns_pipe.train.distributed import DistContext

SPLITS = ("train", "val", "test")


@dataclass
class GraphView:
    """One rank's graph, the exchange feeding its halo, and its inner nodes' data.

    ``x`` holds the input features as the first layer reads them (dense, or CSR).
    """

    graph: LocalGraph
    exchange: HaloExchange
    x: torch.Tensor | CSR
    y: torch.Tensor
    masks: dict[str, torch.Tensor]
    precomputed: torch.Tensor | None = None


def build_view(
    part: Partition,
    ctx: DistContext,
    hooks: Sequence[LayerHook],
    dtype: torch.dtype,
    normalize: bool = False,
    sparse: bool = False,
) -> GraphView:
    """The view of ``part``; features row-normalised and/or stored sparse as asked."""
    ids = (part.inner_global_ids, part.halo_global_ids)
    exchange = HaloExchange(part.send_ids, part.halo_counts, ctx.halo_group, hooks, ids)
    exchange.to(ctx.device)
    graph = LocalGraph(part, exchange if ctx.world_size > 1 else None, dtype, ctx.device, hooks)
    return GraphView(
        graph=graph,
        exchange=exchange,
        x=prepare_features(part.x.to(ctx.device, dtype), normalize, sparse),
        y=part.y.to(ctx.device),
        masks={s: getattr(part, f"{s}_mask").to(ctx.device) for s in SPLITS},
    )


def exchange_column(exchange: HaloExchange, values: torch.Tensor) -> torch.Tensor:
    """Send one value per inner node to the ranks that hold it as halo; (n_halo,) back."""
    column = values.to(torch.float64).unsqueeze(1)
    return exchange.wait(exchange.start_forward(column, layer=-1)).squeeze(1)


def training_subgraph(part: Partition, exchange: HaloExchange) -> Partition:
    """This rank's share of the subgraph induced by the training nodes (two small exchanges).

    Halo nodes are kept when their owner marks them as training nodes; degrees are those of
    the induced graph, counted by each node's owner and sent to the ranks holding it as halo.
    """
    inner_keep = part.train_mask.cpu()
    halo_keep = exchange_column(exchange, inner_keep).cpu() > 0.5
    keep = torch.cat([inner_keep, halo_keep])
    rows = torch.repeat_interleave(torch.arange(part.n_inner), part.indptr.diff())
    degree = torch.bincount(rows[keep[part.indices]], minlength=part.n_inner)
    halo_degree = exchange_column(exchange, degree).cpu().round().long()
    in_degree = torch.cat([degree[inner_keep], halo_degree[halo_keep]])
    return restrict_partition(part, inner_keep, halo_keep, in_degree)


def sparse_input(
    part: Partition, ctx: DistContext, mode: str, first_out: int, use_pp: bool
) -> bool:
    """``--sparse-features`` ``mode``, decided on the graph-wide density of the features (the
    same answer on every rank)."""
    x = part.x
    counts = torch.tensor([float(x.count_nonzero()), float(x.numel())])
    dist.all_reduce(counts, group=ctx.reduce_group)
    nonzero, total = counts.tolist()
    density = nonzero / total if total else 1.0
    return wants_sparse(mode, density, x.size(1), first_out, use_pp)
