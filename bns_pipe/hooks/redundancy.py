"""Redundancy-free aggregation (HAG, Jia et al., KDD 2020) within islands, exact.

A plain aggregation sums, for every destination i, its neighbours' rows: deg_i - 1 additions.
When several destinations share a pair of sources {u, v}, the sum u + v can be computed once
as an *aggregation node* and used by all of them. Greedy (HAG's): in each group of
destinations (an island), take the pair shared by the most covers, make it a node (or reuse
the node an earlier group made for the same pair), put it in place of u and v in every cover
holding both, and repeat while a pair is shared by at least two covers and fewer than
``capacity`` nodes exist. Aggregation nodes may combine earlier ones (a hierarchy). Every
cover's leaves stay exactly the destination's neighbour set.

For A = diag(r) · S · diag(c) (S the 0/1 pattern; GCN: S with its self-loops, r = c =
(d + 1)^-1/2, so that the sum x_i + x_j that both ends of an edge need is shared; mean: r =
1/d, c = 1) the product is exact up to float summation order:

    z = c ⊙ x;  T = [z; aggregates, level by level];  A x = r ⊙ (C T)

with C the 0/1 cover matrix (n, n + m); the transpose runs Cᵀ, then the levels in reverse,
each aggregate's gradient added to its two inputs. Additions: m + Σ_i (|cover_i| - 1).
:class:`RedundancyFreeOperator` folds r and c into the aggregates' and the cover's weights.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from bns_pipe import _ext
from bns_pipe.sparse import CSR, spmm

__all__ = ["Hierarchy", "RedundancyFreeOperator", "is_symmetric", "merge_shared_pairs"]


@dataclass
class Hierarchy:
    """n nodes, m aggregation nodes: ``pairs`` (m, 2) their inputs (ids < n + own index),
    ``levels`` the aggregates' indices grouped so that each level's inputs come before it,
    and the covers as a 0/1 CSR (n, n + m)."""

    n: int
    pairs: Tensor
    levels: list[Tensor]
    cover: CSR

    def additions(self) -> int:
        """Additions of one aggregation with this structure."""
        sizes = self.cover.indptr.diff()
        return int(self.pairs.shape[0] + (sizes - 1).clamp(min=0).sum())


def is_symmetric(indptr: Tensor, indices: Tensor) -> bool:
    """Whether a square 0/1 pattern (each row's columns ascending) equals its transpose."""
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), indptr.diff())
    return torch.equal(torch.sort(indices * n + rows).values, rows * n + indices)


def plain_additions(indptr: Tensor) -> int:
    """Additions of the plain aggregation: Σ (deg_i - 1) over rows with neighbours."""
    return int((indptr.diff() - 1).clamp(min=0).sum())


def merge_shared_pairs(
    indptr: Tensor, indices: Tensor, groups: list[list[int]], capacity: int
) -> Hierarchy:
    """The greedy hierarchy of the module docstring for the 0/1 matrix (indptr, indices)
    (n, n): pairs are counted within each group of ``groups`` (rows in no group keep their
    neighbour lists), the most shared one across all groups merged first (ties: the smallest
    (group, u, v)), at most ``capacity`` aggregation nodes (a pair merged in one group is
    reused in the others). The C++ op (``csrc/hag_build.cpp``) and the fallback below make
    the same hierarchy."""
    if _ext.available():
        sizes = torch.tensor([len(group) for group in groups], dtype=torch.int64)
        group_ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        rows = torch.tensor([row for group in groups for row in group], dtype=torch.int64)
        built = _ext.ops().merge_shared_pairs(indptr, indices, group_ptr, rows, capacity)
    else:
        built = _merge(indptr, indices, groups, capacity)
    pairs, level, cover_ptr, cover_indices = built
    n = indptr.numel() - 1
    cover = CSR(cover_ptr, cover_indices, None, n + pairs.shape[0])
    top = int(level.max()) if level.numel() else 0
    levels = [(level == lv).nonzero().flatten() for lv in range(1, top + 1)]
    return Hierarchy(n, pairs, levels, cover)


def _merge(
    indptr: Tensor, indices: Tensor, groups: list[list[int]], capacity: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pure-PyTorch greedy: (pairs (m, 2), level (m,), cover indptr, cover indices)."""
    n = indptr.numel() - 1
    ptr, nbr = indptr.tolist(), indices.tolist()
    covers: list[set[int]] = [set(nbr[ptr[i] : ptr[i + 1]]) for i in range(n)]
    holders: dict[tuple[int, int, int], set[int]] = defaultdict(set)  # (group, u, v) → rows
    for g, group in enumerate(groups):
        for dest in group:
            members = sorted(covers[dest])
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    holders[g, members[a], members[b]].add(dest)
    heap = [(-len(rows), key) for key, rows in holders.items() if len(rows) > 1]
    heapq.heapify(heap)
    made: dict[tuple[int, int], int] = {}  # pair → aggregation node id (n + index)
    pairs: list[tuple[int, int]] = []
    level: list[int] = []
    while heap:
        count, key = heapq.heappop(heap)
        shared = holders.get(key, set())
        if len(shared) != -count:  # stale entry: push its current count back
            if len(shared) > 1:
                heapq.heappush(heap, (-len(shared), key))
            continue
        g, u, v = key
        node = made.get((u, v))
        if node is None:
            if len(pairs) >= capacity:
                continue
            node = made[u, v] = n + len(pairs)
            pairs.append((u, v))
            level.append(1 + max(_level(u, level, n), _level(v, level, n)))
        touched = set()
        for dest in shared:
            cover = covers[dest]
            cover -= {u, v}
            for w in cover:
                holders[(g, *sorted((u, w)))].discard(dest)
                holders[(g, *sorted((v, w)))].discard(dest)
                new = (g, *sorted((w, node)))
                holders[new].add(dest)
                touched.add(new)
            cover.add(node)
        del holders[key]
        for new in touched:
            if len(holders[new]) > 1:
                heapq.heappush(heap, (-len(holders[new]), new))
    sizes = torch.tensor([len(cover) for cover in covers], dtype=torch.int64)
    cover_ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    columns = [column for cover in covers for column in sorted(cover)]
    return (
        torch.tensor(pairs, dtype=torch.int64).view(-1, 2),
        torch.tensor(level, dtype=torch.int64),
        cover_ptr,
        torch.tensor(columns, dtype=torch.int64),
    )


def _level(node: int, level: list[int], n: int) -> int:
    return 0 if node < n else level[node - n]


class RedundancyFreeOperator:
    """``A x`` and ``Aᵀ g`` for A = diag(r) S diag(c) through a :class:`Hierarchy`: r, c (n,).

    The scales live in weights, so no pass scales x or the result: an aggregate k of inputs
    u, v is a_k = w_k0 t_u + w_k1 t_v over t = [x; a] (w = c_u for a node, 1 for an
    aggregate), and the cover's entry (i, j) is r_i c_j for a node j, r_i for an aggregate:
    A x = C_w t. The transpose is C_wᵀ g, then the aggregates in reverse, each one's gradient
    added to its inputs times their weights; its first n rows are Aᵀ g. ``symmetric``: A = Aᵀ
    (GCN's on an undirected block: S = Sᵀ, r = c), so the transpose is the product itself."""

    def __init__(
        self,
        hierarchy: Hierarchy,
        row_scale: Tensor,
        col_scale: Tensor,
        self_loops: bool,
        symmetric: bool = False,
    ) -> None:
        device = row_scale.device
        self.self_loops, self.symmetric = self_loops, symmetric
        self.n = n = hierarchy.n

        def weight_of(ids: Tensor) -> Tensor:  # c_j for a node j, 1 for an aggregate
            node = ids < n
            return torch.where(node, col_scale[ids.clamp(max=max(n - 1, 0))], 1.0)

        self.inputs = hierarchy.pairs.to(device)
        self.weights = weight_of(self.inputs).contiguous()
        self.levels = [lv.to(device) for lv in hierarchy.levels]
        cover = hierarchy.cover.to(device)
        self.cover = cover.with_values(row_scale[cover.row_ids()] * weight_of(cover.indices))

    def __call__(self, x: Tensor) -> Tensor:
        weights, cover = self.weights.to(x.dtype), self.cover
        if _native(x):
            values = cover.values.to(x.dtype)
            return _ext.ops().hag_product(
                x.contiguous(), self.inputs, weights, cover.indptr, cover.indices, values
            )
        table = torch.cat([x, x.new_empty(self.inputs.shape[0], x.shape[1])])
        for members in self.levels:
            (u, v), w = self.inputs[members].T, weights[members]
            table[self.n + members] = w[:, :1] * table[u] + w[:, 1:] * table[v]
        return spmm(cover, table)

    def transposed(self, g: Tensor) -> Tensor:
        if self.symmetric:
            return self(g)
        table = spmm(self.cover.transpose(), g)
        weights = self.weights.to(g.dtype)
        if _native(table):
            _ext.ops().hag_pairs_backward_(table, self.inputs, weights, self.n)
        else:
            for members in reversed(self.levels):
                grad = table[self.n + members]
                (u, v), w = self.inputs[members].T, weights[members]
                table.index_add_(0, u, w[:, :1] * grad)
                table.index_add_(0, v, w[:, 1:] * grad)
        return table[: self.n]


def _native(rows: Tensor) -> bool:
    """The C++ ops run the product and the aggregates' backward (``csrc/hag.cpp``; a CPU
    kernel only, float32 and float64)."""
    return (
        rows.device.type == "cpu"
        and rows.dtype in (torch.float32, torch.float64)
        and _ext.available()
    )
