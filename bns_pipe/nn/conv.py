"""Graph convolutions over a :class:`~bns_pipe.graph.LocalGraph` (one rank's rows).

Both layers follow PyG's defaults exactly (same parameter names, same math), so PyG's
``GCNConv`` and ``SAGEConv`` are oracles for them. The linear map is applied on whichever
side of the aggregation is narrower, which is exact (aggregation is linear) and shrinks both
the sparse product and the halo rows that travel. Sparse input features (a
:class:`~bns_pipe.sparse.CSR`, see :mod:`bns_pipe.nn.features`) take that weight-first path
with a sparse ``X Wᵀ``.
"""

from __future__ import annotations

import torch
from torch import nn

from bns_pipe.graph import LocalGraph
from bns_pipe.sparse import CSR, spmm


def _times_weight_t(x: torch.Tensor | CSR, weight: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ``: x (n, in) dense, or CSR; W (out, in) → (n, out)."""
    return spmm(x, weight.t()) if isinstance(x, CSR) else x @ weight.t()


class GCNConv(nn.Module):
    r"""``X' = D̂^{-1/2} Â D̂^{-1/2} X W^T + b`` with ``Â = A + I`` and global degrees.

    Shapes: x (n_inner, in_dim), dense or CSR → (n_inner, out_dim). ``aggregated``, when
    given, is the precomputed ``D̂^{-1/2} Â D̂^{-1/2} X`` (n_inner, in_dim) and skips the
    aggregation.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.zeros_(self.bias)

    def forward(
        self,
        graph: LocalGraph,
        x: torch.Tensor | CSR,
        layer: int,
        aggregated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if aggregated is not None:
            return self.lin(aggregated) + self.bias
        if self.lin.out_features < self.lin.in_features:
            return graph.aggregate(_times_weight_t(x, self.lin.weight), "gcn", layer) + self.bias
        return self.lin(graph.aggregate(x, "gcn", layer)) + self.bias


class SAGEConv(nn.Module):
    r"""``x'_i = W_l · mean_{j ∈ N(i)} x_j + b + W_r x_i`` (mean over global in-neighbours).

    Shapes: x (n_inner, in_dim), dense or CSR → (n_inner, out_dim). ``aggregated``, when
    given, is the precomputed neighbour mean (n_inner, in_dim).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin_l = nn.Linear(in_dim, out_dim, bias=True)
        self.lin_r = nn.Linear(in_dim, out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin_l.reset_parameters()
        self.lin_r.reset_parameters()

    def forward(
        self,
        graph: LocalGraph,
        x: torch.Tensor | CSR,
        layer: int,
        aggregated: torch.Tensor | None = None,
    ) -> torch.Tensor:
        root = _times_weight_t(x, self.lin_r.weight)
        if aggregated is not None:
            return self.lin_l(aggregated) + root
        if self.lin_l.out_features < self.lin_l.in_features:
            w, b = self.lin_l.weight, self.lin_l.bias
            return graph.aggregate(_times_weight_t(x, w), "mean", layer) + b + root
        return self.lin_l(graph.aggregate(x, "mean", layer)) + root


CONVS: dict[str, tuple[type[nn.Module], str]] = {
    "gcn": (GCNConv, "gcn"),
    "sage": (SAGEConv, "mean"),
}
