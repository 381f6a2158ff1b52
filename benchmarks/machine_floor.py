"""The machine floor of one training epoch: what the model's GEMMs, sparse products and
elementwise passes cannot beat on this machine, measured here (``benchmarks/train.py`` and
``benchmarks/floor.py`` set our epochs against it).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from bns_pipe.nn.features import SPARSE_MAX_DENSITY
from bns_pipe.sparse import CSR, spmm

LAYERS, HIDDEN, DROPOUT = 3, 128, 0.5


def timed(step, epochs: int, warmup: int) -> list[float]:
    """Seconds of each of ``epochs`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def gemm_rate(n: int, k: int, m: int, repeats: int = 10) -> float:
    """FLOP/s of an (n, k) @ (k, m) float32 product."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    t = min(timed(lambda: a @ b, repeats, 2))
    return 2 * n * k * m / t


def bandwidth(numel: int = 1 << 26, repeats: int = 10) -> float:
    """Bytes/s of ``c = a + b`` on float32 arrays far larger than cache (3 arrays move)."""
    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    t = min(timed(lambda: torch.add(a, b, out=c), repeats, 2))
    return 3 * numel * 4 / t


def spmm_time(adj: CSR, width: int, repeats: int = 10) -> float:
    """Seconds of one CSR product ``A @ X`` at feature width ``width`` (our fastest path)."""
    x = torch.randn(adj.n_cols, width)
    return min(timed(lambda: spmm(adj, x), repeats, 2))


@dataclasses.dataclass
class Shape:
    """What the floor of one epoch depends on: nodes, widths, the graph's inner CSR and,
    for sparse input features, their CSR (``None``: dense features)."""

    n: int
    in_dim: int
    classes: int
    adj: CSR
    features: CSR | None = None


def graph_shape(data, adj: CSR) -> Shape:
    """The :class:`Shape` of ``data``: its features stored sparse as our trainer would."""
    x, classes = data.x, int(data.y.max()) + 1
    sparse = x.size(1) > HIDDEN and x.count_nonzero() <= SPARSE_MAX_DENSITY * x.numel()
    return Shape(x.size(0), x.size(1), classes, adj, CSR.from_dense(x) if sparse else None)


def floor_epoch_s(shape: Shape, model: str) -> dict:
    """The time one training epoch cannot beat on this machine, and its parts.

    GEMMs: forward ``2·n·in·out`` per weight matrix, backward twice that (input and weight
    gradients; no input gradient for layer 0). Sparse products: one per layer forward, one per
    layer backward but for a first layer that aggregates its input (its weight gradient needs
    no aggregated gradient), at the narrower of each layer's widths (as we compute them);
    with sparse features, layer 0's ``X Wᵀ`` and ``Xᵀ G`` per weight matrix instead of its
    GEMMs. Elementwise: about 12 full passes (read + write) of each layer's output per epoch
    (dropout, bias, self-loop term, ReLU, their backwards and the loss), at the measured
    bandwidth. Adam and the reductions are small at this size and are left out.
    """
    n, adj = shape.n, shape.adj
    dims = [shape.in_dim] + [HIDDEN] * (LAYERS - 1) + [shape.classes]
    weights_per_layer = 2 if model == "sage" else 1
    rate = gemm_rate(n, HIDDEN, HIDDEN)
    gemm_flops, sparse_s, elementwise_bytes = 0.0, 0.0, 0.0
    cache: dict[int, float] = {}
    for layer, (a, b) in enumerate(itertools.pairwise(dims)):
        if layer == 0 and shape.features is not None:
            x = shape.features
            sparse_s += weights_per_layer * (spmm_time(x, b) + spmm_time(x.transpose(), b))
        else:
            gemm_flops += 2 * n * a * b * weights_per_layer * (3 if layer > 0 else 2)
        width = min(a, b) if model == "gcn" else (b if b < a else a)
        if width not in cache:
            cache[width] = spmm_time(adj, width)
        sparse_s += cache[width] * (2 if layer > 0 or b < a else 1)
        elementwise_bytes += 12 * 2 * n * b * 4
    bw = bandwidth()
    parts = {
        "gemm_s": gemm_flops / rate,
        "sparse_s": sparse_s,
        "elementwise_s": elementwise_bytes / bw,
    }
    return {
        **parts,
        "floor_s": sum(parts.values()),
        "gemm_flops_per_s": rate,
        "bandwidth_bytes_per_s": bw,
        "spmm_s_by_width": cache,
    }
