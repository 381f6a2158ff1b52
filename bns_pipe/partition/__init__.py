"""Partition a graph once into per-rank subgraphs (inner nodes + halo) and load them back.

``partition(data, K, out)`` assigns nodes with METIS or at random, cuts the graph into the
per-rank arrays of :mod:`bns_pipe.partition.build` and writes them with a hashed manifest;
``load_partition(out, rank)`` returns one rank's :class:`Partition`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bns_pipe.errors import PartitionError
from bns_pipe.partition.assign import (
    BALANCE_CONSTRAINTS,
    METHODS,
    OBJECTIVES,
    assign_parts,
    parse_balance,
)
from bns_pipe.partition.build import build_parts, global_in_csr
from bns_pipe.partition.store import (
    MANIFEST,
    Partition,
    format_table,
    load_partition,
    manifest_hash,
    read_manifest,
    verify_partition,
    write_partition,
)

if TYPE_CHECKING:
    from torch_geometric.data import Data

__all__ = [
    "BALANCE_CONSTRAINTS",
    "METHODS",
    "OBJECTIVES",
    "Partition",
    "format_table",
    "load_partition",
    "manifest_hash",
    "partition",
    "read_manifest",
    "verify_partition",
]

_IDENTITY_KEYS = ("dataset", "num_parts", "method", "seed", "balance", "objective")
# what a manifest written before a key existed holds
_IDENTITY_DEFAULTS = {"objective": "cut"}


def partition(
    data: Data,
    num_parts: int,
    out: str | os.PathLike,
    *,
    method: str = "metis",
    balance: str | tuple[str, ...] = BALANCE_CONSTRAINTS,
    seed: int = 0,
    objective: str = "cut",
    dataset: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Partition ``data`` (a validated undirected PyG graph) into ``num_parts`` parts in ``out``.

    ``dataset`` ({"name", "options"}) identifies the graph in the manifest. An ``out`` that
    already holds the same partition is reused; one holding another partition, or other files,
    is an error (``overwrite`` replaces another partition, never foreign files).
    Returns the manifest.
    """
    out = Path(out)
    n = data.num_nodes
    if not isinstance(num_parts, int) or not 1 <= num_parts <= n:
        raise PartitionError(f"--parts must be an integer in [1, {n}] (nodes), got {num_parts}")
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; choose from {METHODS}")
    if objective not in OBJECTIVES:
        raise PartitionError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    identity = {
        "dataset": dataset or {"name": "custom", "options": {}},
        "num_parts": num_parts,
        "method": method,
        "seed": seed,
        "balance": list(parse_balance(balance)),
        "objective": objective,
    }
    existing = _existing_partition(out, identity, overwrite)
    if existing is not None:
        _log(verbose, f"{out} already holds this partition; reusing it")
        return existing

    start = time.perf_counter()
    indptr, indices = global_in_csr(data.edge_index, n)
    assignment = assign_parts(
        indptr,
        indices,
        num_parts,
        method,
        train_mask=data.train_mask,
        balance=tuple(identity["balance"]),
        seed=seed,
        objective=objective,
    )
    del indptr, indices
    _log(
        verbose,
        f"assigned {n:,} nodes to {num_parts} parts by {method} "
        f"in {time.perf_counter() - start:.1f}s",
    )

    stats: list[dict] = []

    def parts():
        for k, arrays in enumerate(build_parts(data, assignment, num_parts)):
            stats.append(
                {
                    "inner": arrays["inner_global_ids"].numel(),
                    "halo": arrays["halo_global_ids"].numel(),
                    "edges": arrays["indices"].numel(),
                    "train": int(arrays["train_mask"].sum()),
                }
            )
            _log(
                verbose,
                f"  part {k + 1}/{num_parts}: {stats[-1]['inner']:,} inner, "
                f"{stats[-1]['halo']:,} halo",
            )
            yield arrays

    src, dst = data.edge_index
    edge_cut = int((assignment[src] != assignment[dst]).sum()) // 2

    def describe() -> dict:
        return {
            **identity,
            "num_nodes": n,
            "num_edges": data.edge_index.size(1) // 2,
            "num_features": data.x.size(1),
            "num_classes": int(data.num_classes),
            "multilabel": bool(data.multilabel),
            "edge_cut": edge_cut,
            "halo_total": sum(p["halo"] for p in stats),
            "parts": stats,
        }

    manifest = write_partition(out, parts(), describe, overwrite=overwrite)
    _log(verbose, f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return manifest


def _existing_partition(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The manifest of an identical partition at ``out``, None if ``out`` is free to write."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PartitionError(f"{out} exists and is not a directory")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise PartitionError(f"{out} is not empty and holds no partition; choose another --out")
        return None
    manifest = read_manifest(out)
    held = {key: manifest.get(key, _IDENTITY_DEFAULTS.get(key)) for key in _IDENTITY_KEYS}
    if all(held[key] == identity[key] for key in _IDENTITY_KEYS):
        return verify_partition(out)
    if overwrite:
        return None
    raise PartitionError(
        f"{out} holds another partition ({held}); choose another --out or pass --overwrite"
    )


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)
