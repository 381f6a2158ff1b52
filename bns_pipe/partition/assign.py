"""Node-to-part assignment: METIS (multi-constraint, via pymetis) or uniform random."""

from __future__ import annotations

import numpy as np
import torch

from bns_pipe.errors import PartitionError

METHODS = ("metis", "random")
BALANCE_CONSTRAINTS = ("nodes", "train", "edges")
# METIS's objectives: the edge cut, or the total communication volume (k-way mode only: its
# recursive bisection rejects the volume objective)
OBJECTIVES = {"cut": 0, "vol": 1}


def parse_balance(balance: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate a comma list (or sequence) of balance constraints, keeping the canonical order."""
    names = [b.strip() for b in balance.split(",")] if isinstance(balance, str) else list(balance)
    unknown = sorted(set(names) - set(BALANCE_CONSTRAINTS))
    if unknown or not names:
        raise PartitionError(
            f"unknown balance constraint(s) {unknown or names}; "
            f"choose from {', '.join(BALANCE_CONSTRAINTS)}"
        )
    return tuple(b for b in BALANCE_CONSTRAINTS if b in names)


def assign_parts(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    num_parts: int,
    method: str,
    *,
    train_mask: torch.Tensor,
    balance: tuple[str, ...] = BALANCE_CONSTRAINTS,
    seed: int = 0,
    objective: str = "cut",
) -> torch.Tensor:
    """Assign each of the N nodes of a symmetric CSR graph to one of ``num_parts`` parts.

    Returns an int64 tensor (N,) with values in ``[0, num_parts)``. METIS minimises the edge
    cut (``objective="cut"``) or the communication volume (``"vol"``: the number of (node,
    other part) pairs, i.e. the halo total) while balancing every constraint in ``balance``
    (node count, training nodes, degree).
    """
    n = indptr.numel() - 1
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; choose from {METHODS}")
    if objective not in OBJECTIVES:
        raise PartitionError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    if objective != "cut" and method != "metis":
        raise PartitionError(f"--partition-obj {objective} applies to METIS, not {method}")
    if num_parts == 1:
        return torch.zeros(n, dtype=torch.long)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        # A random permutation dealt round-robin: part sizes differ by at most one.
        return torch.randperm(n, generator=gen).remainder_(num_parts)
    return _metis(indptr, indices, num_parts, train_mask, balance, seed, objective)


def _metis(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    num_parts: int,
    train_mask: torch.Tensor,
    balance: tuple[str, ...],
    seed: int,
    objective: str,
) -> torch.Tensor:
    import pymetis

    dtype = pymetis.zero_copy_dtype()
    columns = {
        "nodes": torch.ones(indptr.numel() - 1, dtype=torch.long),
        "train": train_mask.long(),
        "edges": indptr.diff(),
    }
    weights = torch.stack([columns[b] for b in balance], dim=1)  # (N, ncon), row-major
    # the cut objective is METIS's default: its options stay as they always were
    chosen = {} if objective == "cut" else {"objtype": OBJECTIVES[objective]}
    options = pymetis.Options(seed=int(seed), **chosen)
    try:
        _, membership = pymetis.part_graph(
            num_parts,
            adjacency=pymetis.CSRAdjacency(
                indptr.numpy().astype(dtype, copy=False), indices.numpy().astype(dtype, copy=False)
            ),
            vweights=weights.numpy().astype(dtype).reshape(-1),
            recursive=None if objective == "cut" else False,
            options=options,
        )
    except Exception as exc:  # METIS reports failures as generic errors
        raise PartitionError(f"METIS failed to partition into {num_parts} parts: {exc}") from exc
    return torch.from_numpy(np.asarray(membership, dtype=np.int64))
