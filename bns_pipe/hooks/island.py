"""Islandization: ``--hook island[:hub_degree=auto,max_island=64]`` (I-GCN, Geng et al.,
MICRO 2021, in software).

At load, each rank splits its inner block (the graph among its own nodes) into *hubs* and
*islands* and renumbers its inner nodes island-major, so that the rows a layer aggregates
together, and the neighbours they share, sit together in memory:

- round r: the unclassified nodes of inner-block degree >= T_r become hubs (T_0 =
  ``hub_degree``, auto: max(4, ⌈4 · mean degree⌉)); for each new hub in id order, a
  breadth-first search from each of its unclassified neighbours, over unclassified nodes,
  grows an island of at most ``max_island`` nodes (hubs stop the search; those it touches
  are the island's hubs); T_{r+1} = T_r / 2, while T_r >= max(2, ⌈mean degree⌉);
- the nodes no hub reached form islands the same way from the lowest unclassified id.

The new order is hub by hub: each hub, then the islands grown from it, each in search order
(hubs spread between islands, not all in one block: a hub-first order is slow on CPUs). The
renumbering is local: the inner rows and columns of the CSR, the features, labels, masks,
degrees and global ids move with their nodes; ``send_ids`` keep their order with new values,
so the halo order and every peer are unchanged. Dropout is keyed by global id, so training
computes the same (to float summation order). Deterministic: no randomness involved.

Report: ``islands``, ``hubs``, ``pruned_fraction`` (aggregation additions removed; 0 here:
this hook reorders only) and ``preprocess_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque

import torch
from torch import Tensor

from bns_pipe.hooks.base import LayerHook
from bns_pipe.partition import Partition

__all__ = ["IslandHook", "Islands", "find_islands", "renumber"]


@dataclasses.dataclass
class Islands:
    """The classification of n nodes: ``hubs`` (ids), ``islands`` (lists of ids, search
    order) and ``order`` (n,): new position → old id, hub by hub with their islands."""

    hubs: list[int]
    islands: list[list[int]]
    order: Tensor


def find_islands(
    indptr: Tensor, indices: Tensor, hub_degree: int | None, max_island: int
) -> Islands:
    """Hubs and islands of the symmetric graph (indptr, indices) on n = len(indptr) - 1
    nodes (module docstring); ``hub_degree`` None: auto."""
    n = indptr.numel() - 1
    ptr, nbr = indptr.tolist(), indices.tolist()
    degree = indptr.diff()
    mean = float(degree.double().mean()) if n else 0.0
    threshold = hub_degree or max(4, math.ceil(4 * mean))
    floor = max(2, math.ceil(mean))
    unclassified = [True] * n
    is_hub = [False] * n
    hubs: list[int] = []
    islands: list[list[int]] = []
    order: list[int] = []

    def grow(start: int) -> None:
        """One island from ``start`` by breadth-first search over unclassified non-hubs."""
        island, queue = [start], deque([start])
        unclassified[start] = False
        while queue and len(island) < max_island:
            node = queue.popleft()
            for j in nbr[ptr[node] : ptr[node + 1]]:
                if unclassified[j] and not is_hub[j]:
                    unclassified[j] = False
                    island.append(j)
                    queue.append(j)
                    if len(island) == max_island:
                        break
        islands.append(island)
        order.extend(island)

    while threshold >= floor:
        new = [i for i in (degree >= threshold).nonzero().flatten().tolist() if unclassified[i]]
        for hub in new:
            is_hub[hub], unclassified[hub] = True, False
        for hub in new:
            hubs.append(hub)
            order.append(hub)
            for j in nbr[ptr[hub] : ptr[hub + 1]]:
                if unclassified[j]:
                    grow(j)
        threshold //= 2
    for node in range(n):
        if unclassified[node]:
            grow(node)
    return Islands(hubs, islands, torch.tensor(order, dtype=torch.int64))


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

    def __init__(self, hub_degree: str = "auto", max_island: str = "64") -> None:
        self.hub_degree = None if hub_degree == "auto" else int(hub_degree)
        self.max_island = int(max_island)
        if self.hub_degree is not None and self.hub_degree < 1:
            raise ValueError(f"hub_degree must be auto or at least 1, got {self.hub_degree}")
        if self.max_island < 1:
            raise ValueError(f"max_island must be at least 1 node, got {self.max_island}")
        self.found: Islands | None = None
        self.preprocess_s, self.rank = 0.0, 0

    def on_graph(self, part: Partition) -> Partition:
        start = time.perf_counter()
        inner = part.indices < part.n_inner
        rows = torch.repeat_interleave(torch.arange(part.n_inner), part.indptr.diff())
        counts = torch.bincount(rows[inner], minlength=part.n_inner)
        indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.found = find_islands(indptr, part.indices[inner], self.hub_degree, self.max_island)
        part = renumber(part, self.found.order)
        self.rank = part.rank
        self.preprocess_s = time.perf_counter() - start
        return part

    def report(self) -> dict:
        found = self.found
        return {
            "islands": len(found.islands) if found else 0,
            "hubs": len(found.hubs) if found else 0,
            "pruned_fraction": 0.0,
            "preprocess_s": self.preprocess_s,
            "rank": self.rank,  # islands and hubs are this rank's
        }
