"""Redundancy-free aggregation (HAG, Jia et al., KDD 2020) within islands, exact.

A plain aggregation sums, for every destination i, its neighbours' rows: deg_i - 1 additions.
When several destinations share a pair of sources {u, v}, the sum u + v can be computed once
as an *aggregation node* and used by all of them. Greedy (HAG's), in each group of at most 64
destinations (an island or a 64-row piece of one) on its own: take the pair shared by the most
covers, make it a node, put it in place of u and v in every cover holding both, and repeat
while a pair is shared by at least two covers. Then, by (count descending, group, step), a
merge whose inputs exist reuses the node of its pair if one was made, else becomes a new node
while fewer than ``capacity`` exist, else is not made. Then each node, in id order, takes
the place of its pair in every cover holding both, in any row: a node made for one island
serves all the rows that share its pair. This is HAG's greedy with the pair counting kept
inside groups: O(Σ_groups Σ_rows d²) with small tables, in parallel.
Aggregation nodes may combine earlier ones (a hierarchy). Every cover's leaves stay exactly
the destination's neighbour set.

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
import itertools
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


GROUP_ROWS = 64  # rows of one pair-counting group: its holder sets are 64-bit masks


def merge_shared_pairs(
    indptr: Tensor,
    indices: Tensor,
    group_ptr: Tensor,
    group_rows: Tensor,
    capacity: int,
    min_share: int = 2,
) -> Hierarchy:
    """The greedy hierarchy of the module docstring for the 0/1 matrix (indptr, indices)
    (n, n): group g holds the distinct rows ``group_rows[group_ptr[g]:group_ptr[g + 1]]``
    (cut here into pieces of at most 64 rows; rows in no group keep their neighbour lists);
    ties go to the smallest (u, v); at most ``capacity`` aggregation nodes, each of a pair
    shared by at least ``min_share`` (>= 2) rows of its group. The C++ op
    (``csrc/hag_build.cpp``) and the fallback below make the same hierarchy."""
    if min_share < 2:
        raise ValueError(f"min_share must be at least 2 rows, got {min_share}")
    group_ptr = _pieces(group_ptr)
    if _ext.available():
        built = _ext.ops().merge_shared_pairs(
            indptr, indices, group_ptr, group_rows, capacity, min_share
        )
    else:
        built = _merge(indptr, indices, group_ptr, group_rows, capacity, min_share)
    pairs, level, cover_ptr, cover_indices = built
    n = indptr.numel() - 1
    cover = CSR(cover_ptr, cover_indices, None, n + pairs.shape[0])
    top = int(level.max()) if level.numel() else 0
    levels = [(level == lv).nonzero().flatten() for lv in range(1, top + 1)]
    return Hierarchy(n, pairs, levels, cover)


def _pieces(group_ptr: Tensor) -> Tensor:
    """``group_ptr`` with every group cut into consecutive pieces of at most 64 rows."""
    if group_ptr.numel() < 2:
        return torch.zeros(1, dtype=torch.int64)
    pieces = (group_ptr.diff() + GROUP_ROWS - 1) // GROUP_ROWS  # per group; 0 if empty
    first = torch.repeat_interleave(group_ptr[:-1], pieces)
    group_start = torch.repeat_interleave(pieces.cumsum(0) - pieces, pieces)
    step = torch.arange(first.numel()) - group_start  # the piece's index in its group
    return torch.cat([first + GROUP_ROWS * step, group_ptr[-1:]])


@dataclass
class _Merge:
    u: int  # a node id < n, or n + this group's step
    v: int
    count: int


def _group_merges(covers: list[list[int]], n: int, limit: int, min_share: int) -> list[_Merge]:
    """The greedy of one group (its rows' covers, changed in place)."""
    holders: dict[tuple[int, int], int] = defaultdict(int)
    for r, cover in enumerate(covers):
        for a in range(len(cover)):
            for b in range(a + 1, len(cover)):
                holders[cover[a], cover[b]] |= 1 << r
    heap = [(-m.bit_count(), key) for key, m in holders.items() if m.bit_count() >= min_share]
    heapq.heapify(heap)
    merges: list[_Merge] = []
    while heap and len(merges) < limit:
        count, key = heapq.heappop(heap)
        mask = holders.get(key, 0)
        if mask.bit_count() != -count:  # stale: push its current count back
            if mask.bit_count() >= min_share:
                heapq.heappush(heap, (-mask.bit_count(), key))
            continue
        (u, v), node = key, n + len(merges)
        merges.append(_Merge(u, v, -count))
        holders[key] = 0
        touched = set()
        for r in range(mask.bit_length()):
            if not mask >> r & 1:
                continue
            cover = covers[r]
            cover.remove(u)
            cover.remove(v)
            for w in cover:
                holders[min(u, w), max(u, w)] &= ~(1 << r)
                holders[min(v, w), max(v, w)] &= ~(1 << r)
                holders[w, node] |= 1 << r
                touched.add(w)
            cover.append(node)
        for w in sorted(touched):
            if holders[w, node].bit_count() >= min_share:
                heapq.heappush(heap, (-holders[w, node].bit_count(), (w, node)))
    return merges


def _merge(
    indptr: Tensor,
    indices: Tensor,
    group_ptr: Tensor,
    group_rows: Tensor,
    capacity: int,
    min_share: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pure-PyTorch greedy: (pairs (m, 2), level (m,), cover indptr, cover indices)."""
    n = indptr.numel() - 1
    ptr, nbr, rows = indptr.tolist(), indices.tolist(), group_rows.tolist()
    leaves = [sorted(set(nbr[ptr[i] : ptr[i + 1]])) for i in range(n)]
    bounds = group_ptr.tolist()
    merges = [
        _group_merges([list(leaves[i]) for i in rows[a:b]], n, capacity, min_share)
        for a, b in itertools.pairwise(bounds)
    ]
    ranked = sorted((-m.count, g, j) for g, group in enumerate(merges) for j, m in enumerate(group))
    ids: list[list[int]] = [[] for _ in merges]  # group, step → node id, -1: not made
    pairs: list[tuple[int, int]] = []
    level: list[int] = []

    def global_id(g: int, ref: int) -> int:
        return ref if ref < n else ids[g][ref - n]

    made: dict[tuple[int, int], int] = {}  # (u, v) → aggregation node id
    for _, g, j in ranked:  # a group's earlier steps are decided
        u, v = sorted((global_id(g, merges[g][j].u), global_id(g, merges[g][j].v)))
        node = -1
        if u >= 0 and (u, v) in made:
            node = made[u, v]
        elif u >= 0 and len(pairs) < capacity:
            node = made[u, v] = n + len(pairs)
            pairs.append((u, v))
            level.append(1 + max(_level(u, level, n), _level(v, level, n)))
        ids[g].append(node)
    covers = [list(cover) for cover in leaves]
    holders: list[list[int]] = [[] for _ in range(n)]  # a superset of x's rows, x < n
    for row, cover in enumerate(leaves):
        for x in cover:
            holders[x].append(row)
    for node, (u, v) in enumerate(pairs, start=n):  # each takes its pair's place in all rows
        holders.append([])
        for row in min(holders[u], holders[v], key=len):
            if u in covers[row] and v in covers[row]:
                covers[row].remove(u)
                covers[row].remove(v)
                covers[row].append(node)
                holders[node].append(row)
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
