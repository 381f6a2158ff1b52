"""The GNN: a stack of graph convolutions with normalisation, activation and keyed dropout."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from bns_pipe.graph import LocalGraph
from bns_pipe.nn.conv import CONVS
from bns_pipe.nn.dropout import keyed_dropout, keyed_dropout_csr
from bns_pipe.nn.epilogue import Epilogue, plain
from bns_pipe.nn.norm import make_norm
from bns_pipe.random import stream_key
from bns_pipe.sparse import CSR


class GNN(nn.Module):
    """``layers`` convolutions ``in_dim → hidden → … → out_dim``; between them norm, then
    ReLU (ELU for GAT).

    Dropout precedes every convolution; its mask is keyed by (seed, epoch, layer, global node
    id, feature), so a graph split over any number of ranks sees the same masks as one process.
    A hidden layer's bias, activation and the next layer's dropout run as one
    :class:`~bns_pipe.nn.epilogue.Epilogue` (after the norm, when there is one).
    With ``precomputed`` input (``--use-pp``) the first layer's aggregation is given, and
    dropout applies to the aggregated features instead of the raw ones. GAT (``conv="gat"``)
    splits ``hidden`` over ``heads`` concatenated heads, has one head at the output, and drops
    attention coefficients with the same p, keyed by (seed, epoch, layer, 2) and global ids.
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
        heads: int = 1,
    ) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"unknown model {conv!r}; choose from {sorted(CONVS)}")
        if layers < 1:
            raise ValueError(f"a model needs at least one layer, got {layers}")
        conv_class, self.aggregation = CONVS[conv]
        self.attention = conv == "gat"
        if self.attention:
            if hidden % heads and layers > 1:
                raise ValueError(f"--hidden {hidden} does not split evenly over {heads} heads")
            hidden_layer = {"heads": heads, "concat": True, "dropout": dropout}
            output_layer = {"heads": 1, "concat": False, "dropout": dropout}
            in_dims = [in_dim] + [hidden] * (layers - 1)
            self.convs = nn.ModuleList(
                conv_class(a, hidden // heads, **hidden_layer) for a in in_dims[:-1]
            )
            self.convs.append(conv_class(in_dims[-1], out_dim, **output_layer))
        else:
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
        x = self._drop(x, stream_key(self.seed, epoch, 0), graph)
        for layer, conv in enumerate(self.convs):
            aggregated = None
            if layer == 0 and precomputed is not None:
                aggregated = self._drop(precomputed, stream_key(self.seed, epoch, layer, 1), graph)
            hidden = layer < len(self.norms)
            finish = self._epilogue(graph, epoch, layer + 1) if hidden else plain
            normed = hidden and not isinstance(self.norms[layer], nn.Identity)
            options = {"epilogue": plain if normed else finish}
            if self.attention:
                dropping = self.training and self.dropout > 0
                key = stream_key(self.seed, epoch, layer, 2) if dropping else None
                x = conv(graph, x, layer, attention_key=key, **options)
            else:
                x = conv(graph, x, layer, aggregated, **options)
            if normed:
                x = finish(self.norms[layer](x))
        return x

    def _epilogue(self, graph: LocalGraph, epoch: int, next_layer: int) -> Epilogue:
        """A hidden layer's activation, then the dropout that precedes ``next_layer``."""
        key = stream_key(self.seed, epoch, next_layer)
        activation = "elu" if self.attention else "relu"
        return Epilogue(activation, self.dropout, key, graph.global_ids, self.training)

    def _drop(self, x: torch.Tensor | CSR, key: int, graph: LocalGraph) -> torch.Tensor | CSR:
        if not self.training or self.dropout == 0:
            return x
        if isinstance(x, CSR):
            return keyed_dropout_csr(x, self.dropout, key, graph.global_ids)
        return keyed_dropout(x, self.dropout, key, graph.global_ids, training=True)

    def precompute(self, graph: LocalGraph, x: torch.Tensor) -> torch.Tensor:
        """The first layer's neighbour aggregation of the raw features, computed once."""
        if self.aggregation is None:
            raise ValueError("attention layers have no precomputable aggregation (--use-pp)")
        with torch.no_grad():
            return graph.aggregate(x, self.aggregation, layer=0)
