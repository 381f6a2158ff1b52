"""A synthetic node-classification graph: a degree-corrected stochastic block model (DC-SBM).

Node i gets a class ``c_i`` uniform over ``{0..C-1}`` (its community) and a degree propensity
``θ_i ~ Pareto(γ - 1)`` on ``[1, sqrt(N)]`` (power-law degrees, hubs capped). Then
``M = N * avg_degree / 2`` node pairs ``(u, v)`` are drawn:

- ``u`` with probability ``θ_u / Σθ``;
- ``v`` with probability ``θ_v / Σ_{c_w = c_u} θ_w`` inside u's class with probability
  ``HOMOPHILY``, else ``θ_v / Σθ`` over all nodes.

Both directions of every pair are kept; self-loops and repeats are dropped, so the graph has
slightly fewer than ``N * avg_degree`` directed edges. Features are a class centroid plus noise,
``x_i = μ_{c_i} + ε_i`` with ``μ_c ~ N(0, SIGNAL² / F · I)`` and ``ε_i ~ N(0, I)``, so features
alone separate the classes poorly and neighbourhoods (same class with probability well above
``1 / C``) add the signal a GCN uses. The split is a random 10% train / 10% val / 80% test.

Everything is drawn from numpy generators spawned from ``data_seed`` (labels and propensities,
edges, features, split: one stream each), never from global RNG state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from bns_pipe.data.validate import new_data, undirected_edge_index
from bns_pipe.errors import DatasetError

if TYPE_CHECKING:
    from torch_geometric.data import Data

HOMOPHILY = 0.5
DEGREE_EXPONENT = 2.5
SIGNAL = 1.5
TRAIN_FRACTION = VAL_FRACTION = 0.1


def synthetic_graph(
    num_nodes: int = 50_000,
    avg_degree: float = 16.0,
    num_features: int = 64,
    num_classes: int = 8,
    data_seed: int = 0,
) -> Data:
    """The DC-SBM graph of the module docstring: ``x`` (N, F) float32, ``y`` (N,), masks,
    undirected canonical ``edge_index`` (2, ≈ N · avg_degree)."""
    if num_classes < 2 or num_nodes < 10 * num_classes:
        raise DatasetError(
            f"synthetic: need num_classes >= 2 and num_nodes >= 10 * num_classes, "
            f"got num_nodes={num_nodes}, num_classes={num_classes}"
        )
    if avg_degree <= 0 or num_features < 1:
        raise DatasetError(
            f"synthetic: need avg_degree > 0 and num_features >= 1, "
            f"got avg_degree={avg_degree}, num_features={num_features}"
        )
    node_rng, edge_rng, feature_rng, split_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(data_seed).spawn(4)
    )
    y = node_rng.integers(num_classes, size=num_nodes)
    theta = np.minimum(node_rng.pareto(DEGREE_EXPONENT - 1.0, size=num_nodes) + 1.0, num_nodes**0.5)
    edge_index = _dc_sbm_edges(y, theta, num_classes, round(num_nodes * avg_degree / 2), edge_rng)

    centroids = feature_rng.standard_normal((num_classes, num_features), dtype=np.float32)
    centroids *= np.float32(SIGNAL / num_features**0.5)
    x = feature_rng.standard_normal((num_nodes, num_features), dtype=np.float32)
    x += centroids[y]

    order = torch.from_numpy(split_rng.permutation(num_nodes))
    n_train, n_val = int(TRAIN_FRACTION * num_nodes), int(VAL_FRACTION * num_nodes)
    masks = {k: torch.zeros(num_nodes, dtype=torch.bool) for k in ("train", "val", "test")}
    masks["train"][order[:n_train]] = True
    masks["val"][order[n_train : n_train + n_val]] = True
    masks["test"][order[n_train + n_val :]] = True

    data = new_data(
        x=torch.from_numpy(x),
        y=torch.from_numpy(y),
        edge_index=edge_index,
        train_mask=masks["train"],
        val_mask=masks["val"],
        test_mask=masks["test"],
    )
    data.num_classes = num_classes
    data.multilabel = False
    return data


def _dc_sbm_edges(
    y: np.ndarray, theta: np.ndarray, num_classes: int, num_pairs: int, rng: np.random.Generator
) -> torch.Tensor:
    """Canonical undirected ``edge_index`` of ``num_pairs`` DC-SBM draws (see module docstring).

    Nodes are laid out grouped by class (``order``), so the cumulative propensity ``cum`` of
    that layout gives every class a contiguous interval ``[lo_c, hi_c)``; an endpoint is the
    inverse CDF of a uniform draw in ``[0, Σθ)`` or in its class's interval.
    """
    n = y.size
    order = np.argsort(y, kind="stable")
    cum = np.cumsum(theta[order])
    ends = np.cumsum(np.bincount(y, minlength=num_classes))
    starts = np.concatenate([[0], ends[:-1]])
    lo = np.concatenate([[0.0], cum])[starts]
    hi = cum[ends - 1]

    src = _inverse_cdf(cum, rng.random(num_pairs) * cum[-1])
    within = rng.random(num_pairs) < HOMOPHILY
    c = np.where(within, y[order[src]], 0)
    low = np.where(within, lo[c], 0.0)
    dst = _inverse_cdf(cum, low + rng.random(num_pairs) * (np.where(within, hi[c], cum[-1]) - low))
    # A draw that rounds onto its class interval's upper end stays inside the class.
    np.clip(dst, np.where(within, starts[c], 0), np.where(within, ends[c], n) - 1, out=dst)

    return undirected_edge_index(order[src], order[dst], n)


def _inverse_cdf(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cum, u, "right")``: the i with ``cum[i-1] <= u < cum[i]``, for u in
    ``[0, cum[-1])``, fast for unsorted ``u``.

    Binary search of random-order queries is cache-bound (70 s for 3·10^7 queries into 2.4·10^6
    nodes on a 2-core machine). A guide table (Chen & Asau, 1974) instead jumps each query to
    the first candidate of its bucket of width ``cum[-1] / n``, then steps forward; since every
    ``θ >= 1`` spans at least one bucket's share of the mean, a few vectorised steps suffice.
    """
    n = cum.size
    scale = n / cum[-1]
    guide = np.searchsorted(cum, np.arange(n) / scale, side="right")
    u = np.minimum(u, np.nextafter(cum[-1], 0))
    idx = guide[np.minimum((u * scale).astype(np.int64), n - 1)]
    todo = np.flatnonzero(cum[idx] <= u)
    while todo.size:
        idx[todo] += 1
        todo = todo[cum[idx[todo]] <= u[todo]]
    return idx
