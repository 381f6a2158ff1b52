"""Adaptive bit widths for quantized halo messages (``--hook quant:bits=adaptive,budget=B``).

Every row a sender s sends to a receiver r at a (layer, direction) gets 2, 4 or 8 bits, chosen
by the variance it adds to r's aggregation. Stochastic rounding at b bits adds at most
step²/4 = range²/(4 L_b²) to a value (L_b = 2^b - 1), and the row enters the aggregation with
weight w: forward, w_j = Σ_i a_ij² over r's rows i aggregating node j, with the GCN weights
a_ij = 1/√((d_i+1)(d_j+1)) (a proxy for the mean and attention weights; the graph is
undirected, so the owner of j sees these i as its halo neighbours of j owned by r); backward,
w = 1 (returned gradients are added as they are). Row j so adds V_j / L_b², with
V_j = w_j · range_j² · F / 4, and per message (s → r, n rows of F values) the sender solves::

    minimise Σ_j V_j / L_{b_j}²   subject to   Σ_j ceil(F·b_j/8) <= n · ceil(F·B/8)

greedily: every row starts at 2 bits and upgrades (2→4, then 4→8) are taken in order of
variance removed per byte while they fit. The widths use the ranges of the rows being sent,
every epoch; they travel in the message as 2-bit tags, so both sides agree without another
exchange. A message is ``ceil(n/4)`` tag bytes, the rows coded at 2 bits, then at 4, then at
8 (each with its 4 bytes of lo and step, in row order), then zero padding up to
:func:`message_bytes`, a size both sides know from n, F and B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BITS", "allocate", "code_bytes", "forward_weights", "message_bytes"]

BITS = (2, 4, 8)


def code_bytes(width: int, bits: float) -> int:
    """Bytes of the codes of one row of ``width`` values at ``bits`` (a budget: its ceiling)."""
    return math.ceil(width * bits / 8)


def message_bytes(rows: int, width: int, budget: float) -> int:
    """The fixed size of an adaptive message of ``rows`` rows: tags, lo and step, codes."""
    return math.ceil(rows / 4) + rows * (4 + code_bytes(width, budget))


def allocate(variance: Tensor, rows: list[int], width: int, budget: float) -> Tensor:
    """Bits per row: ``variance`` (m,) float64 the V of each row (module docstring), rows
    grouped by message, ``rows[j]`` in message j; returns (m,) int64 in {2, 4, 8} within each
    message's budget. Deterministic: equal ratios go to the earlier row."""
    m = variance.numel()
    sizes = torch.tensor([code_bytes(width, b) for b in BITS], dtype=torch.float64)
    cost = sizes.diff()  # (2,) bytes of the upgrades 2→4 and 4→8
    levels = torch.tensor([(1 << b) - 1 for b in BITS], dtype=torch.float64)
    removed = (1 / levels[:-1] ** 2 - 1 / levels[1:] ** 2) * variance[:, None]  # (m, 2)
    ratio = torch.where(removed > 0, removed / cost, 0).flatten()  # free upgrades: inf
    message = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows) * 2)
    order = torch.argsort(-ratio, stable=True)
    order = order[torch.argsort(message[order], stable=True)]  # by message, best first
    spent = torch.cumsum(cost.repeat(m)[order], 0)
    starts = torch.cumsum(torch.tensor([0, *rows[:-1]]) * 2, 0)  # first step of each message
    before = torch.cat([spent.new_zeros(1), spent])[starts]
    spare = torch.tensor(rows, dtype=torch.float64) * (code_bytes(width, budget) - sizes[0])
    fits = spent - before[message[order]] <= spare[message[order]]
    taken = order[fits & (ratio[order] > 0)]
    upgrades = torch.zeros(m, dtype=torch.int64).index_add_(0, taken // 2, torch.ones_like(taken))
    return torch.tensor(BITS)[upgrades]


def forward_weights(
    indptr: Tensor, indices: Tensor, n_inner: int, owner: Tensor, degree: Tensor, world: int
) -> Tensor:
    """w of every inner row for every peer, (n_inner, world) float64: w[j, r] = Σ over j's
    neighbours i owned by r of 1/((d_i+1)(d_j+1)). ``indptr``/``indices``: the local CSR
    (in-neighbours, halo ids from ``n_inner``), ``owner`` (n_halo,) each halo node's rank,
    ``degree`` (local nodes,) global degrees."""
    rows = torch.repeat_interleave(torch.arange(n_inner), indptr.diff())
    halo = indices >= n_inner
    j, i = rows[halo], indices[halo]
    terms = 1 / ((degree[i] + 1) * (degree[j] + 1)).double()
    weights = torch.zeros(n_inner * world, dtype=torch.float64)
    return weights.index_add_(0, j * world + owner[i - n_inner], terms).view(n_inner, world)
