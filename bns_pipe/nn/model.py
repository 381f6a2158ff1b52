"""The GNN: a stack of graph convolutions with normalisation, ReLU and keyed dropout."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from bns_pipe.graph import LocalGraph
from bns_pipe.nn.conv import CONVS
from bns_pipe.nn.dropout import keyed_dropout, keyed_dropout_csr
from bns_pipe.nn.norm import make_norm
from bns_pipe.random import stream_key
from bns_pipe.sparse import CSR


class GNN(nn.Module):
    """``layers`` convolutions ``in_dim → hidden → … → out_dim``; between them norm, ReLU.

    Dropout precedes every convolution; its mask is keyed by (seed, epoch, layer, global node
    id, feature), so a graph split over any number of ranks sees the same masks as one process.
    With ``precomputed`` input (``--use-pp``) the first layer's aggregation is given, and
    dropout applies to the aggregated features instead of the raw ones.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        layers: int = 2,
        conv: str = "gcn",
        norm: str = "none",
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"unknown model {conv!r}; choose from {sorted(CONVS)}")
        if layers < 1:
            raise ValueError(f"a model needs at least one layer, got {layers}")
        conv_class, self.aggregation = CONVS[conv]
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.convs = nn.ModuleList(conv_class(a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(make_norm(norm, hidden) for _ in range(layers - 1))
        self.dropout = dropout
        self.seed = seed

    def reset_parameters(self) -> None:
        for module in [*self.convs, *self.norms]:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        graph: LocalGraph,
        x: torch.Tensor | CSR,
        epoch: int = 0,
        precomputed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (n_inner, in_dim), dense or CSR (:mod:`bns_pipe.nn.features`) → logits
        (n_inner, out_dim)."""
        for layer, conv in enumerate(self.convs):
            key = stream_key(self.seed, epoch, layer)
            x = self._drop(x, key, graph)
            aggregated = None
            if layer == 0 and precomputed is not None:
                aggregated = self._drop(precomputed, stream_key(self.seed, epoch, layer, 1), graph)
            x = conv(graph, x, layer, aggregated)
            if layer < len(self.norms):
                x = torch.relu(self.norms[layer](x))
        return x

    def _drop(self, x: torch.Tensor | CSR, key: int, graph: LocalGraph) -> torch.Tensor | CSR:
        if not self.training or self.dropout == 0:
            return x
        if isinstance(x, CSR):
            return keyed_dropout_csr(x, self.dropout, key, graph.global_ids)
        return keyed_dropout(x, self.dropout, key, graph.global_ids, training=True)

    def precompute(self, graph: LocalGraph, x: torch.Tensor) -> torch.Tensor:
        """The first layer's neighbour aggregation of the raw features, computed once."""
        with torch.no_grad():
            return graph.aggregate(x, self.aggregation, layer=0)
