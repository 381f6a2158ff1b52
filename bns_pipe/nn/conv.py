"""Graph convolutions over a :class:`~bns_pipe.graph.LocalGraph` (one rank's rows).

Every layer follows PyG's defaults exactly (same parameter names, same math), so PyG's
``GCNConv``, ``SAGEConv`` and ``GATConv`` are oracles for them. GCN and SAGE apply the linear
map on whichever side of the aggregation is narrower, which is exact (aggregation is linear)
and shrinks both the sparse product and the halo rows that travel (SAGE's two maps of a
dense input then share one GEMM); GAT always transforms
first (attention needs the transformed rows). Sparse input features (a
:class:`~bns_pipe.sparse.CSR`, see :mod:`bns_pipe.nn.features`) take the weight-first path
with a sparse ``X Wᵀ``.

Each layer ends by handing its output before the bias, the bias and any second term to
``epilogue`` (default :func:`~bns_pipe.nn.epilogue.plain`, their sum); the model passes an
:class:`~bns_pipe.nn.epilogue.Epilogue` that also applies the activation and the next layer's
dropout in the same pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bns_pipe.graph import LocalGraph
from bns_pipe.nn.attention import gat_attention
from bns_pipe.nn.epilogue import plain
from bns_pipe.sparse import CSR, spmm

# epilogue(h, bias=None, residual=None) -> the layer's output
Finish = Callable[..., torch.Tensor]


def _times_weight_t(x: torch.Tensor | CSR, weight: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ``: x (n, in) dense, or CSR; W (out, in) → (n, out)."""
    return spmm(x, weight.t()) if isinstance(x, CSR) else x @ weight.t()


def _times_both_t(
    x: torch.Tensor | CSR, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W₁ᵀ, x W₂ᵀ)`` for W₁, W₂ (out, in). Dense x: one GEMM with ``[W₁; W₂]`` (n, 2·out),
    split (two narrow GEMMs, e.g. SAGE's output layer, cost up to twice one of both widths);
    a CSR x: two products (one twice as wide is no faster there)."""
    if isinstance(x, CSR):
        return _times_weight_t(x, first), _times_weight_t(x, second)
    both = x @ torch.cat([first, second]).t()
    return both[:, : first.shape[0]], both[:, first.shape[0] :]


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
        epilogue: Finish = plain,
    ) -> torch.Tensor:
        if aggregated is not None:
            return epilogue(self.lin(aggregated), self.bias)
        if self.lin.out_features < self.lin.in_features:
            h = graph.aggregate(_times_weight_t(x, self.lin.weight), "gcn", layer)
            return epilogue(h, self.bias)
        return epilogue(self.lin(graph.aggregate(x, "gcn", layer)), self.bias)


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
        epilogue: Finish = plain,
    ) -> torch.Tensor:
        lin_l, lin_r = self.lin_l, self.lin_r
        if aggregated is not None:
            return epilogue(lin_l(aggregated), None, _times_weight_t(x, lin_r.weight))
        if lin_l.out_features >= lin_l.in_features:  # aggregate first, at the input's width
            root = _times_weight_t(x, lin_r.weight)
            return epilogue(lin_l(graph.aggregate(x, "mean", layer)), None, root)
        z, root = _times_both_t(x, lin_l.weight, lin_r.weight)
        return epilogue(graph.aggregate(z, "mean", layer), lin_l.bias, root)


class GATConv(nn.Module):
    r"""PyG's ``GATConv`` (self-loops, LeakyReLU 0.2, attention dropout, no edge features).

    ``z = x Wᵀ`` as H heads of C channels; ``s = ⟨z, att_src⟩``, ``d = ⟨z, att_dst⟩`` per head;
    ``x'_i = ‖_h Σ_{j ∈ N(i) ∪ {i}} softmax_j(LeakyReLU(s_j + d_i)) z_j,h + b`` with the heads
    concatenated (``concat``) or averaged. The halo rows travel transformed, as ``[z | s]``
    (H·(C+1) wide), so the attention of a halo edge needs nothing else from its owner; under
    BNS the softmax runs over the kept neighbours (no 1/p factor).

    Shapes: x (n_inner, in_dim), dense or CSR → (n_inner, H·C) or (n_inner, C).
    """

    def __init__(
        self, in_dim: int, out_dim: int, heads: int = 1, concat: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.heads, self.out_channels, self.concat, self.dropout = heads, out_dim, concat, dropout
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_dim))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_dim))
        self.bias = nn.Parameter(torch.empty(heads * out_dim if concat else out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.lin.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(weight.view(-1, weight.shape[-1]))  # PyG's glorot
        nn.init.zeros_(self.bias)

    def forward(
        self,
        graph: LocalGraph,
        x: torch.Tensor | CSR,
        layer: int,
        aggregated: None = None,
        epilogue: Finish = plain,
        attention_key: int | None = None,
    ) -> torch.Tensor:
        """``attention_key``: the stream key of this layer's attention dropout (None: off)."""
        if aggregated is not None:
            raise ValueError("GATConv has no precomputable aggregation (--use-pp)")
        heads, width = self.heads, self.out_channels
        z = _times_weight_t(x, self.lin.weight)
        per_head = z.view(-1, heads, width)
        a_src = (per_head * self.att_src).sum(-1)
        a_dst = (per_head * self.att_dst).sum(-1)
        src = graph.with_halo(torch.cat([z, a_src], 1), layer)
        pattern, col_ids = graph.attention_pattern()
        p = self.dropout if attention_key is not None else 0.0
        out = gat_attention(
            pattern, src, a_dst, heads, p, attention_key or 0, graph.global_ids, col_ids
        )
        if not self.concat:
            out = out.view(-1, heads, width).mean(1)
        return epilogue(out, self.bias)


CONVS: dict[str, tuple[type[nn.Module], str | None]] = {
    "gcn": (GCNConv, "gcn"),
    "sage": (SAGEConv, "mean"),
    "gat": (GATConv, None),
}
