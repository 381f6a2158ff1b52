"""Input features as the first layer reads them: optionally row-normalised, dense or sparse.

Bag-of-words features (Cora, CiteSeer, Coauthor, Amazon) are 0.5–2 % nonzero. Stored as a
:class:`~bns_pipe.sparse.CSR`, the first layer's ``X Wᵀ`` is a sparse product, 50–100x fewer
operations than the dense GEMM for thousands of input columns, and its weight gradient
``Xᵀ G`` likewise. The result equals the dense path to float rounding; dropout keeps the same
mask and removes the dropped entries (:func:`~bns_pipe.nn.dropout.keyed_dropout_csr`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bns_pipe.errors import ConfigError
from bns_pipe.sparse import CSR

__all__ = ["SPARSE_MAX_DENSITY", "prepare_features", "row_normalize", "wants_sparse"]

# ``--sparse-features auto`` stores x as CSR at or below this fraction of nonzeros.
SPARSE_MAX_DENSITY = 0.1


def row_normalize(x: Tensor) -> Tensor:
    """``x_i / Σ_j x_ij`` per row (Kipf & Welling's preprocessing); zero rows stay zero.

    x (n, F), non-negative (counts or indicators) → (n, F) with rows summing to 1 or 0.
    """
    if (x < 0).any():
        raise ConfigError("--normalize-features expects non-negative features (counts)")
    total = x.sum(1, keepdim=True)
    return x / torch.where(total == 0, torch.ones_like(total), total)


def wants_sparse(mode: str, density: float, in_dim: int, first_out: int, use_pp: bool) -> bool:
    """Whether the first layer reads x as CSR under ``--sparse-features`` ``mode``.

    The sparse path needs the first layer to apply its weight before aggregating (output
    narrower than input) and raw features (``--use-pp`` aggregates them into a dense matrix).
    ``auto`` takes it when the graph-wide density is at most :data:`SPARSE_MAX_DENSITY`.
    """
    possible = in_dim > first_out and not use_pp
    if mode == "on" and not possible:
        raise ConfigError(
            "--sparse-features on needs a first layer narrower than its input "
            f"({first_out} >= {in_dim} here) and no --use-pp"
        )
    return mode == "on" or (mode == "auto" and possible and density <= SPARSE_MAX_DENSITY)


def prepare_features(x: Tensor, normalize: bool, sparse: bool) -> Tensor | CSR:
    """x (n, F) → row-normalised if asked; a CSR (with its transpose built) if ``sparse``."""
    if normalize:
        x = row_normalize(x)
    if not sparse:
        return x
    csr = CSR.from_dense(x)
    csr.transpose()  # built once here; dropout derives each epoch's transpose from it
    return csr
