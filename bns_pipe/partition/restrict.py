"""Restrict a rank's partition to a node subset (for example the training nodes)."""

from __future__ import annotations

import dataclasses

import torch

from bns_pipe.partition.store import Partition


def restrict_partition(
    part: Partition, inner_keep: torch.Tensor, halo_keep: torch.Tensor, in_degree: torch.Tensor
) -> Partition:
    """The partition of the subgraph induced by the kept nodes.

    ``inner_keep`` (n_inner,) and ``halo_keep`` (n_halo,) are boolean; every rank must keep
    a halo node exactly when its owner keeps it as inner node, so send lists and halo groups
    stay aligned. ``in_degree`` (kept inner + kept halo,) gives the induced global degrees.
    Kept nodes keep their relative order; CSR entries between kept nodes are kept.
    """
    keep = torch.cat([inner_keep, halo_keep])
    new_id = torch.cumsum(keep.long(), 0) - 1
    rows = torch.repeat_interleave(torch.arange(part.n_inner), part.indptr.diff())
    entry_keep = inner_keep[rows] & keep[part.indices]
    kept_rows = rows[entry_keep]
    n_inner = int(inner_keep.sum())
    indptr = torch.zeros(n_inner + 1, dtype=torch.long)
    counts = torch.bincount(new_id[kept_rows], minlength=n_inner) if n_inner else indptr[:0]
    torch.cumsum(counts, 0, out=indptr[1:])
    halo_owner = torch.repeat_interleave(torch.arange(part.num_parts), part.halo_counts)
    inner_new_id = new_id[: part.n_inner]
    return dataclasses.replace(
        part,
        n_inner=n_inner,
        n_halo=int(halo_keep.sum()),
        inner_global_ids=part.inner_global_ids[inner_keep],
        halo_global_ids=part.halo_global_ids[halo_keep],
        halo_counts=torch.bincount(halo_owner[halo_keep], minlength=part.num_parts),
        indptr=indptr,
        indices=new_id[part.indices[entry_keep]],
        send_ids=[inner_new_id[ids[inner_keep[ids]]] for ids in part.send_ids],
        in_degree=in_degree,
        out_degree=in_degree.clone(),
        x=part.x[inner_keep],
        y=part.y[inner_keep],
        train_mask=part.train_mask[inner_keep],
        val_mask=part.val_mask[inner_keep],
        test_mask=part.test_mask[inner_keep],
    )
