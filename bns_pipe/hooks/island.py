"""Islandization: ``--hook island[:hub_degree=auto,max_island=64,redundancy=auto,
capacity=auto,min_share=4]`` (I-GCN, Geng et al., MICRO 2021, in software).

At load, each rank splits its inner block (the graph among its own nodes) into *hubs* and
*islands* and renumbers its inner nodes island-major, so that the rows a layer aggregates
together, and the neighbours they share, sit together in memory:

- round r: the unclassified nodes of inner-block degree >= T_r become hubs (T_0 =
  ``hub_degree``, auto: max(4, ⌈4 · mean degree⌉)); for each new hub in id order, a
  breadth-first search from each of its unclassified neighbours, over unclassified nodes,
  grows an island of at most ``max_island`` nodes (hubs stop the search; those it touches
  are the island's hubs); T_{r+1} = T_r / 2, while T_r >= max(2, ⌈mean degree⌉) (the
  first round always runs);
- the nodes no hub reached form islands the same way from the lowest unclassified id.

The new order is hub by hub: each hub, then the islands grown from it, each in search order
(hubs spread between islands, not all in one block: a hub-first order is slow on CPUs). The
renumbering is local: the inner rows and columns of the CSR, the features, labels, masks,
degrees and global ids move with their nodes; ``send_ids`` keep their order with new values,
so the halo order and every peer are unchanged. Dropout is keyed by global id, so training
computes the same (to float summation order). Islands and order are deterministic.

Redundancy (``redundancy=auto|on|off``, ``capacity=auto|N``): the inner aggregation of the
kind the model uses runs through :mod:`bns_pipe.hooks.redundancy`, the neighbour pairs shared
by the rows of an island summed once (at most ``capacity`` aggregation nodes, auto:
n_inner / 16: each costs a row written and read back, and on CPUs only the most shared
pairs pay; ``min_share``, default 4: only pairs shared by at least that many rows of an
island: a node of c rows writes one row and reads two to save c reads, so it pays from
c = 4; neighbours held by fewer rows leave each island's search at once). Hub rows keep
their neighbour lists: their pair counts grow with the square of a hub's degree, and they
are a few percent of the additions pruned. ``auto`` keeps the graph's own product where
that removes under 2% of the additions or where a timed product on the first input is not
faster (the report says so). The halo block keeps its path, so BNS and the pipeline work
unchanged. Built on the first product.

Report: ``islands``, ``hubs`` (this rank's), ``pruned_fraction`` = 1 - additions performed /
additions of the plain inner aggregation (GCN's with its self-loop term; 0 where redundancy
is off), ``redundancy`` (what is in use, and why) and ``preprocess_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor, nn

from bns_pipe import _ext
from bns_pipe.hooks.base import InnerOperator, LayerHook
from bns_pipe.hooks.redundancy import (
    RedundancyFreeOperator,
    is_symmetric,
    merge_shared_pairs,
    plain_additions,
)
from bns_pipe.partition import Partition

__all__ = ["IslandHook", "Islands", "find_islands", "renumber"]

AUTO_PRUNED = 0.02  # redundancy=auto keeps the structure when it removes this many additions
AUTO_CAPACITY = 16  # capacity=auto: n_inner / 16 aggregation nodes


@dataclasses.dataclass
class Islands:
    """The classification of n nodes: ``hubs`` (h,) their ids; the islands, island by island
    in search order, as ``island_nodes`` (n - h,) split at ``island_ptr`` (k + 1,); and
    ``order`` (n,): new position → old id, hub by hub with their islands."""

    hubs: Tensor
    island_ptr: Tensor
    island_nodes: Tensor
    order: Tensor

    @property
    def num_islands(self) -> int:
        return self.island_ptr.numel() - 1

    def islands(self) -> list[list[int]]:
        """Each island's node ids, in search order."""
        sizes = self.island_ptr.diff().tolist()
        return [part.tolist() for part in torch.split(self.island_nodes, sizes)]


def find_islands(
    indptr: Tensor, indices: Tensor, hub_degree: int | None, max_island: int
) -> Islands:
    """Hubs and islands of the symmetric graph (indptr, indices) on n = len(indptr) - 1
    nodes (module docstring); ``hub_degree`` None: auto. The C++ op (``csrc/islands.cpp``)
    and the fallback below take the same steps."""
    n = indptr.numel() - 1
    mean = float(indptr.diff().double().mean()) if n else 0.0
    threshold = hub_degree or max(4, math.ceil(4 * mean))
    floor = max(2, math.ceil(mean))
    if _ext.available():
        found = _ext.ops().find_islands(indptr, indices, threshold, floor, max_island)
    else:
        found = _search(indptr, indices, threshold, floor, max_island)
    return Islands(*found)


def _search(
    indptr: Tensor, indices: Tensor, threshold: int, floor: int, max_island: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pure-PyTorch search: (hubs, island_ptr, island_nodes, order)."""
    n = indptr.numel() - 1
    ptr, nbr = indptr.tolist(), indices.tolist()
    degree = indptr.diff()
    unclassified = [True] * n
    hubs: list[int] = []
    island_ptr, members, order = [0], [], []

    def grow(start: int) -> None:
        """One island from ``start`` by breadth-first search over unclassified nodes (hubs
        are classified); the island is the search's queue."""
        begin = len(members)
        members.append(start)
        unclassified[start] = False
        head = begin
        while head < len(members) and len(members) - begin < max_island:
            node = members[head]
            head += 1
            for j in nbr[ptr[node] : ptr[node + 1]]:
                if unclassified[j]:
                    unclassified[j] = False
                    members.append(j)
                    if len(members) - begin == max_island:
                        break
        island_ptr.append(len(members))
        order.extend(members[begin:])

    first = True
    while first or threshold >= floor:  # a hub_degree below the floor still gets its round
        first = False
        fresh = [i for i in (degree >= threshold).nonzero().flatten().tolist() if unclassified[i]]
        for hub in fresh:
            unclassified[hub] = False
        for hub in fresh:
            hubs.append(hub)
            order.append(hub)
            for j in nbr[ptr[hub] : ptr[hub + 1]]:
                if unclassified[j]:
                    grow(j)
        threshold //= 2
    for node in range(n):
        if unclassified[node]:
            grow(node)
    return tuple(torch.tensor(v, dtype=torch.int64) for v in (hubs, island_ptr, members, order))


def renumber(part: Partition, order: Tensor) -> Partition:
    """``part`` with its inner nodes in ``order`` (new position → old local id); halo nodes,
    peers and the order of every send list stay."""
    n, n_local = part.n_inner, part.n_inner + part.n_halo
    new_id = torch.arange(n_local)  # halo ids stay
    new_id[order] = torch.arange(n)
    rows = new_id[torch.repeat_interleave(torch.arange(n), part.indptr.diff())]
    columns = new_id[part.indices]
    columns = columns[torch.argsort(rows * n_local + columns)]  # by new row, ascending columns
    counts = torch.bincount(rows, minlength=n)
    keys = ("inner_global_ids", "x", "y", "train_mask", "val_mask", "test_mask")
    inner = {key: getattr(part, key)[order] for key in keys}
    degrees = {
        key: torch.cat([getattr(part, key)[order], getattr(part, key)[n:]])
        for key in ("in_degree", "out_degree")
    }
    return dataclasses.replace(
        part,
        indptr=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        indices=columns,
        send_ids=[new_id[ids] for ids in part.send_ids],
        **inner,
        **degrees,
    )


class IslandHook(LayerHook):
    name = "island"

    def __init__(
        self,
        hub_degree: str = "auto",
        max_island: str = "64",
        redundancy: str = "auto",
        capacity: str = "auto",
        min_share: str = "4",
    ) -> None:
        self.hub_degree = None if hub_degree == "auto" else int(hub_degree)
        self.max_island = int(max_island)
        self.capacity = None if capacity == "auto" else int(capacity)
        self.min_share = int(min_share)
        self.redundancy = redundancy
        if self.hub_degree is not None and self.hub_degree < 1:
            raise ValueError(f"hub_degree must be auto or at least 1, got {self.hub_degree}")
        if self.max_island < 1:
            raise ValueError(f"max_island must be at least 1 node, got {self.max_island}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"capacity must be auto or at least 0, got {self.capacity}")
        if self.min_share < 2:
            raise ValueError(f"min_share must be at least 2 rows, got {self.min_share}")
        if redundancy not in ("auto", "on", "off"):
            raise ValueError(f"redundancy must be auto, on or off, got {redundancy!r}")
        self.found: Islands | None = None
        self.part: Partition | None = None
        self.pruned: dict[str, float] = {}  # per aggregation kind in use
        self.states: dict[str, str] = {}  # per kind: "on" or why not
        self.attention = False
        self.preprocess_s, self.rank = 0.0, 0

    def on_graph(self, part: Partition) -> Partition:
        start = time.perf_counter()
        indptr, indices = inner_pattern(part)
        self.found = find_islands(indptr, indices, self.hub_degree, self.max_island)
        self.part = renumber(part, self.found.order)
        self.rank = part.rank
        self.preprocess_s = time.perf_counter() - start
        return self.part

    def inner_operator(self, kind: str, default: InnerOperator) -> InnerOperator | None:
        return None if self.redundancy == "off" else _Deferred(self, kind, default)

    def operator(
        self, kind: str, default: InnerOperator, x: Tensor
    ) -> RedundancyFreeOperator | None:
        """The redundancy-free product of ``kind`` over the renumbered inner block (pairs
        counted within islands), or None where ``redundancy=auto`` finds that it prunes under
        2% of the additions (then it is not built) or runs slower than the ``default``
        product on ``x``."""
        start = time.perf_counter()
        part, loops = self.part, kind == "gcn"
        indptr, indices = inner_pattern(part, loops)
        found, position = self.found, torch.empty_like(self.found.order)
        position[found.order] = torch.arange(part.n_inner)
        capacity = part.n_inner // AUTO_CAPACITY if self.capacity is None else self.capacity
        groups = found.island_ptr, position[found.island_nodes]  # hub rows keep their lists
        hierarchy = merge_shared_pairs(indptr, indices, *groups, capacity, self.min_share)
        plain = plain_additions(indptr)
        pruned = 1 - hierarchy.additions() / plain if plain else 0.0
        self.pruned[kind], self.states[kind] = pruned, "on"
        built = None
        if self.redundancy == "auto" and pruned < AUTO_PRUNED:
            self.states[kind] = f"off: prunes {pruned:.0%} of the additions"
        else:
            degree = part.in_degree[: part.n_inner].to(x.device, torch.float64)
            if loops:
                row = col = (degree + 1).rsqrt()
            else:  # mean: 1 / d_i, 0 for a row without neighbours
                row = torch.where(degree > 0, 1 / degree.clamp(min=1), 0.0)
                col = torch.ones_like(degree)
            symmetric = loops and is_symmetric(indptr, indices)  # then Aᵀ g = A g
            built = RedundancyFreeOperator(
                hierarchy, row.to(x.dtype), col.to(x.dtype), loops, symmetric
            )
        if built is not None and self.redundancy == "auto":
            plain_s = _seconds(lambda: default(x))
            built_s = _seconds(lambda: built(x))
            if built_s >= plain_s:
                self.states[kind] = (
                    f"off: {built_s * 1e3:.3g} ms a product against {plain_s * 1e3:.3g} ms plain"
                )
        self.preprocess_s += time.perf_counter() - start
        if self.states[kind] != "on":
            self.pruned[kind] = 0.0
            return None
        return built

    def on_model(self, model: nn.Module) -> None:
        self.attention = bool(getattr(model, "attention", False))

    def _redundancy_state(self) -> str:
        if self.attention:
            return "off: attention learns its edge weights, islands reorder only"
        if self.redundancy == "off":
            return "off"
        return "; ".join(f"{kind} {state}" for kind, state in self.states.items()) or "unused"

    def report(self) -> dict:
        found = self.found
        pruned = list(self.pruned.values())
        return {
            "islands": found.num_islands if found else 0,
            "hubs": found.hubs.numel() if found else 0,
            "pruned_fraction": 0.0 if self.attention or not pruned else sum(pruned) / len(pruned),
            "redundancy": self._redundancy_state(),
            "preprocess_s": self.preprocess_s,
            "rank": self.rank,  # islands and hubs are this rank's
        }


def _seconds(product, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls of ``product`` (after one untimed)."""
    product()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


class _Deferred:
    """The inner operator of one kind, built on its first product (a model uses one kind:
    GCN's or the mean's), falling back to the graph's default where the structure does not
    pay."""

    def __init__(self, hook: IslandHook, kind: str, default: InnerOperator) -> None:
        self.hook, self.kind, self.default = hook, kind, default
        self.built: RedundancyFreeOperator | None = None
        self.ready = False

    def _operator(self, x: Tensor) -> RedundancyFreeOperator | None:
        if not self.ready:
            self.built = self.hook.operator(self.kind, self.default, x)
            self.ready = True
        return self.built

    @property
    def self_loops(self) -> bool:
        return bool(getattr(self.built or self.default, "self_loops", False))

    def __call__(self, x: Tensor) -> Tensor:
        return (self._operator(x) or self.default)(x)

    def transposed(self, g: Tensor) -> Tensor:
        return (self._operator(g) or self.default).transposed(g)


def inner_pattern(part: Partition, self_loops: bool = False) -> tuple[Tensor, Tensor]:
    """The 0/1 inner block of ``part`` (indptr, indices), with the diagonal if asked,
    each row's columns ascending."""
    n = part.n_inner
    rows = torch.repeat_interleave(torch.arange(n), part.indptr.diff())
    inner = part.indices < n
    rows, columns = rows[inner], part.indices[inner]
    if self_loops:
        rows, columns = torch.cat([rows, torch.arange(n)]), torch.cat([columns, torch.arange(n)])
    order = torch.argsort(rows * n + columns)
    counts = torch.bincount(rows, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), columns[order]
