"""Weight codecs: what a compressed file stores for one weight matrix W (out, in), and back.

- ``kmeans:k=K``: W's values shared by K centres (1-D k-means, Lloyd from the K quantiles
  (i + 1/2)/K, deterministic); stores the centres (K,) float32 and each value's centre index
  in ceil(log2 K) bits, bit-packed.
- ``smartexchange[:basis=3,sparsity=0.2,exp_bits=4,iterations=40]``: a basis times sparse
  power-of-two coefficients (:mod:`bns_pipe.compress.smartexchange`).
- ``int:bits=B``: symmetric integers per output row, q = round(W / s) with
  s = max|W_row| / (2^(B-1) - 1); stores q + 2^(B-1) - 1 in B bits, bit-packed, and s (out,)
  float32. One bit: the signs, with s = mean|W_row| (binary weights, ±s).

``encode(W) -> {field: tensor}`` and ``decode(fields, shape) -> W`` (float32); the bytes of
the fields are the weight's payload. A weight hook of the same name (:mod:`bns_pipe.hooks`)
trains in the codec's form; its saved state may tell ``encode`` where to start
(:meth:`Codec.hint`), and ``finetune_options`` make the hook hold that form from the first
epoch (``bns-pipe compress --finetune-epochs``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "Codec",
    "IntCodec",
    "KMeansCodec",
    "index_bits",
    "kmeans_1d",
    "nearest",
    "pack_bits",
    "unpack_bits",
]


def kmeans_1d(
    values: Tensor, k: int, init: Tensor | None = None, iterations: int = 100
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the scalars ``values`` into ``k`` centres, in float64: centres
    start at ``init`` (ascending, e.g. the last clustering's) or the k quantiles
    (i + 1/2)/k; returns (centres (k,) ascending, index (n,) int64 of each value's nearest
    centre). With at most k distinct values each is its own centre (the rest repeat the
    largest). The values are sorted once: a cluster is then a run between two cuts (the
    centres' midpoints) and its sum a difference of prefix sums, O(k log n) an iteration."""
    x = values.detach().double().flatten()
    ordered = torch.sort(x).values
    distinct = torch.unique_consecutive(ordered)
    if distinct.numel() <= k:
        padding = distinct[-1:].expand(k - distinct.numel())
        return torch.cat([distinct, padding]), torch.searchsorted(distinct, x)
    if init is not None:
        centres = init.double().clone()
    else:  # the quantiles, interpolated linearly between order statistics
        at = (torch.arange(k, dtype=torch.float64) + 0.5) / k * (x.numel() - 1)
        low = at.floor().long()
        high = (low + 1).clamp(max=x.numel() - 1)
        centres = torch.lerp(ordered[low], ordered[high], at - low)
    prefix = torch.cat([x.new_zeros(1), torch.cumsum(ordered, 0)])
    ends = torch.full((k,), x.numel(), dtype=torch.int64)
    for _ in range(iterations):
        # cluster j holds the values in (mid_{j-1}, mid_j], as nearest() assigns them
        ends[:-1] = torch.searchsorted(ordered, (centres[1:] + centres[:-1]) / 2, right=True)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        counts = ends - starts
        sums = prefix[ends] - prefix[starts]
        updated = torch.sort(torch.where(counts > 0, sums / counts.clamp(min=1), centres))[0]
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres, nearest(x, centres)


def index_bits(k: int) -> int:
    """Bits of an index into k centres."""
    return max(1, math.ceil(math.log2(k)))


def nearest(x: Tensor, centres: Tensor) -> Tensor:
    """Index of the nearest of the ascending ``centres`` for each value of ``x``."""
    return torch.searchsorted((centres[1:] + centres[:-1]) / 2, x)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """(n,) integers in [0, 2^bits) → ceil(n·bits/8) uint8; value i's bit j is stream bit
    i·bits + j, stream bit t is bit t mod 8 of byte t // 8."""
    stream = ((codes.long().flatten()[:, None] >> torch.arange(bits)) & 1).flatten()
    padded = torch.zeros(math.ceil(stream.numel() / 8) * 8, dtype=torch.int64)
    padded[: stream.numel()] = stream
    return (padded.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of :func:`pack_bits`: the first ``n`` values, int64."""
    stream = ((packed.long()[:, None] >> torch.arange(8)) & 1).flatten()[: n * bits]
    return (stream.view(n, bits) << torch.arange(bits)).sum(1)


class Codec:
    """One compression method with its options (``name:key=value,...``)."""

    name = ""
    finetune_options = ""

    def encode(self, weight: Tensor, **hint: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, fields: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def hint(self, hook_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """Keyword arguments for ``encode`` of the weight ``<prefix>.weight`` from a
        checkpoint's ``hook_state`` (the weight hooks' own tensors); none by default."""
        return {}


class KMeansCodec(Codec):
    name = "kmeans"
    finetune_options = "hard_at=0"  # shared centres from the first epoch

    def __init__(self, k: str = "16") -> None:
        self.k = int(k)
        if self.k < 2:
            raise ValueError(f"kmeans needs k >= 2 centres, got {self.k}")
        self.bits = index_bits(self.k)

    def encode(self, weight: Tensor, **hint: Tensor) -> dict[str, Tensor]:
        centres, index = kmeans_1d(weight, self.k)
        return {"centres": centres.float(), "index": pack_bits(index, self.bits)}

    def decode(self, fields: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        index = unpack_bits(fields["index"], self.bits, math.prod(shape))
        return fields["centres"][index].view(shape)


class IntCodec(Codec):
    name = "int"

    def __init__(self, bits: str = "8") -> None:
        self.bits = int(bits)
        if not 1 <= self.bits <= 16:
            raise ValueError(f"int needs bits in [1, 16], got {self.bits}")
        self.top = (1 << (self.bits - 1)) - 1

    def encode(self, weight: Tensor, **hint: Tensor) -> dict[str, Tensor]:
        w = weight.detach().float().flatten(1)
        if self.bits == 1:
            return {"codes": pack_bits((w >= 0).long(), 1), "scale": w.abs().mean(1)}
        scale = w.abs().amax(1) / self.top
        scale = torch.where(scale > 0, scale, 1.0)  # a zero row: codes 0 whatever the scale
        q = torch.round(w / scale[:, None]).clamp_(-self.top, self.top)
        return {"codes": pack_bits(q.long() + self.top, self.bits), "scale": scale}

    def decode(self, fields: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        codes = unpack_bits(fields["codes"], self.bits, math.prod(shape)).view(shape[0], -1)
        q = codes * 2 - 1 if self.bits == 1 else codes - self.top
        return (q.float() * fields["scale"][:, None]).view(shape)
