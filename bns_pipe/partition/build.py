"""Cut a global graph into per-part arrays: inner nodes, halo, send lists and a local CSR.

Local ids of part k: ``[0, n_inner)`` are its inner nodes, ordered interior-first (nodes no
other part needs), then boundary nodes, each group in global-id order, so the rows that
travel are contiguous and the original ordering's locality is kept. ``[n_inner, n_inner +
n_halo)`` are halo nodes, grouped by owner in rank order; within a group they follow the
owner's send list, which lists the owner's local indices in ascending order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from bns_pipe import _ext

if TYPE_CHECKING:
    from torch_geometric.data import Data


def global_in_csr(edge_index: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of in-edges: row v lists the sources u of every edge u → v. Shapes (N+1,), (E,)."""
    src, dst = edge_index
    order = torch.argsort(dst, stable=True)
    indptr = torch.zeros(num_nodes + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(dst, minlength=num_nodes), 0, out=indptr[1:])
    return indptr, src[order].contiguous()


def local_csr(
    global_indptr: torch.Tensor,
    global_indices: torch.Tensor,
    rows: torch.Tensor,
    local_of: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-edges of the global nodes ``rows``, relabelled by ``local_of`` (N,), sorted per row.

    Returns ``indptr`` (R+1,) and ``indices`` (nnz,). Every in-neighbour must have a local id.
    """
    if _ext.available():
        return _ext.ops().build_local_csr(global_indptr, global_indices, rows, local_of)
    degree = global_indptr[rows + 1] - global_indptr[rows]
    indptr = torch.zeros(rows.numel() + 1, dtype=torch.long)
    torch.cumsum(degree, 0, out=indptr[1:])
    row_of_entry = torch.repeat_interleave(torch.arange(rows.numel()), degree)
    position = global_indptr[rows][row_of_entry] + torch.arange(row_of_entry.numel())
    position -= indptr[row_of_entry]
    columns = local_of[global_indices[position]]
    if columns.numel() and int(columns.min()) < 0:
        raise RuntimeError("local_csr: an in-neighbour has no local id (local_of = -1)")
    width = int(columns.max()) + 1 if columns.numel() else 1
    keys = torch.sort(row_of_entry * width + columns).values
    return indptr, keys - row_of_entry * width


def build_parts(data: Data, assignment: torch.Tensor, num_parts: int) -> Iterator[dict]:
    """Yield, for each part k in order, the dict of tensors stored in its partition file.

    Keys: ``inner_global_ids``, ``halo_global_ids``, ``halo_counts`` (K,), ``indptr``,
    ``indices``, ``send_ids`` (concatenation of the K send lists), ``send_counts`` (K,),
    ``in_degree``, ``out_degree`` (local nodes, global degrees), ``x``, ``y`` and the masks.
    """
    n, k_parts = data.num_nodes, num_parts
    g_indptr, g_indices = global_in_csr(data.edge_index, n)
    in_degree = g_indptr.diff()
    out_degree = torch.bincount(data.edge_index[0], minlength=n)
    part = assignment

    # Halo pairs (receiver part, node u owned by another part) from every cut edge u → v.
    dst = torch.repeat_interleave(torch.arange(n), in_degree)
    cut = part[g_indices] != part[dst]
    pairs = torch.unique(part[dst[cut]] * n + g_indices[cut])
    receiver, node = pairs // n, pairs % n
    del dst, cut, pairs

    # Inner order per part: interior nodes first, then boundary nodes, each by global id.
    boundary = torch.zeros(n, dtype=torch.long)
    boundary[node] = 1
    order = torch.argsort(part * (2 * n) + boundary * n + torch.arange(n))
    sizes = torch.bincount(part, minlength=k_parts)
    starts = torch.cumsum(sizes, 0) - sizes
    local_index = torch.empty(n, dtype=torch.long)
    local_index[order] = torch.arange(n) - starts[part[order]]

    # Halo of each receiver grouped by owner, then by the owner's local index.
    owner = part[node]
    by_halo_order = torch.argsort((receiver * k_parts + owner) * n + local_index[node])
    receiver, owner, node = receiver[by_halo_order], owner[by_halo_order], node[by_halo_order]
    counts = torch.bincount(receiver * k_parts + owner, minlength=k_parts * k_parts)
    offsets = torch.cumsum(counts, 0) - counts  # start of the (receiver, owner) segment
    counts, offsets = counts.view(k_parts, k_parts), offsets.view(k_parts, k_parts)

    local_of = torch.full((n,), -1, dtype=torch.long)
    for k in range(k_parts):
        inner = order[starts[k] : starts[k] + sizes[k]]
        halo_begin = int(offsets[k, 0])
        halo = node[halo_begin : halo_begin + int(counts[k].sum())]
        local_nodes = torch.cat([inner, halo])
        local_of[local_nodes] = torch.arange(local_nodes.numel())
        indptr, indices = local_csr(g_indptr, g_indices, inner, local_of)
        local_of[local_nodes] = -1
        send = [
            local_index[node[int(offsets[j, k]) : int(offsets[j, k] + counts[j, k])]]
            for j in range(k_parts)
        ]
        yield {
            "inner_global_ids": inner,
            "halo_global_ids": halo,
            "halo_counts": counts[k].clone(),
            "indptr": indptr,
            "indices": indices,
            "send_ids": torch.cat(send),
            "send_counts": counts[:, k].clone(),
            "in_degree": in_degree[local_nodes],
            "out_degree": out_degree[local_nodes],
            "x": data.x[inner],
            "y": data.y[inner],
            "train_mask": data.train_mask[inner],
            "val_mask": data.val_mask[inner],
            "test_mask": data.test_mask[inner],
        }
