"""Halo-message quantization: ``--hook quant:bits=8|4|2[,fwd_bits=B,bwd_bits=B]``, or
``--hook quant:bits=adaptive,budget=B`` (2, 4 or 8 bits a row, chosen by the variance the row
adds to the aggregation, within B average bits: :mod:`bns_pipe.hooks.bit_allocation`).

Every halo row that travels in training (features forward, feature gradients backward) is
sent as b-bit codes with a per-row grid, unbiased by stochastic rounding. For a row x of F
values and L = 2^b - 1::

    lo   = min(x) rounded down to bfloat16
    step = (max(x) - lo) / L rounded up to bfloat16            (0: every value equals lo)
    code = clamp(floor((x - lo) / step + u), 0, L),   u = uniform(key, global row id · F + column)
    x̂    = lo + code · step                                    E[x̂] = x,  |x̂ - x| < step

``key = stream_key(seed, QUANT_STREAM, epoch, layer, direction)`` (:mod:`bns_pipe.random`),
so a run is reproducible and every receiver of a row gets the same codes. Rounding lo down and
step up keeps every value on the grid (the clamp only absorbs float rounding), so no value
spills into a neighbour's bits, and a row that is constant at a bfloat16 value (zeros, say)
travels exactly. The payload keeps the row count: per row ``ceil(F·b/8)`` bytes of codes (8/b
per byte, column c in byte ``c // (8/b)`` at bit ``(c mod 8/b)·b``) and then lo and step as two
bfloat16, ``(rows, ceil(F·b/8) + 4)`` uint8. Evaluation sends full precision.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bns_pipe import _ext
from bns_pipe.hooks.base import BytePayload, EpochContext, LayerHook, Message
from bns_pipe.hooks.bit_allocation import BITS, allocate, forward_weights, message_bytes
from bns_pipe.random import has_ext_kernel, stream_key, to_int64, uniform

if TYPE_CHECKING:
    from bns_pipe.partition import Partition

__all__ = ["QUANT_STREAM", "QuantHook", "dequantize", "quantize"]

QUANT_STREAM = int.from_bytes(b"bns-quan", "little")
DIRECTIONS = {"forward": 0, "backward": 1}


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return bits


def row_bytes(width: int, bits: int) -> int:
    """Payload bytes of one row of ``width`` values at ``bits``: codes, then lo and step."""
    return math.ceil(width * bits / 8) + 4


def quantize(rows: Tensor, bits: int, key: int, row_ids: Tensor) -> Tensor:
    """The payload of ``rows`` (m, F) float: (m, ceil(F·bits/8) + 4) uint8 (module docstring);
    ``row_ids`` (m,) int64 are the rows' global ids, keying the rounding draws. The C++ op
    (``torch.ops.bns_pipe.quantize_rows``) and the PyTorch ops give the same bytes."""
    _check_bits(bits)
    m, width = rows.shape
    if m == 0:
        return torch.empty(0, row_bytes(width, bits), dtype=torch.uint8, device=rows.device)
    x = rows.float().contiguous()
    if has_ext_kernel("quantize_rows", x.device):
        return _ext.ops().quantize_rows(x, bits, to_int64(key), row_ids.contiguous())
    return _quantize_torch(x, bits, key, row_ids)


def _quantize_torch(x: Tensor, bits: int, key: int, row_ids: Tensor) -> Tensor:
    """:func:`quantize` by PyTorch ops, for float32 x (m, F), m > 0."""
    width = x.shape[1]
    levels = (1 << bits) - 1
    lo = _bf16_toward(x.amin(1), float("-inf"))
    step = _bf16_toward((x.amax(1) - lo.float()) / levels, float("inf"))
    columns = torch.arange(width, device=x.device)
    u = uniform(key, row_ids[:, None] * width + columns)
    scaled = (x - lo.float()[:, None]) / torch.where(step > 0, step, 1).float()[:, None]
    codes = (scaled + u).floor_().clamp_(0, levels).to(torch.uint8)
    meta = torch.stack([lo, step], 1).view(torch.uint8)  # (m, 4): two bfloat16
    return torch.cat([_pack(codes, bits), meta], 1)


def dequantize(payload: Tensor, bits: int, width: int, dtype: torch.dtype) -> Tensor:
    """Rows (m, ``width``) of ``dtype`` from a :func:`quantize` payload: lo + code · step."""
    if has_ext_kernel("dequantize_rows", payload.device):
        return _ext.ops().dequantize_rows(payload, bits, width).to(dtype)
    meta = payload[:, -4:].reshape(-1).clone().view(torch.bfloat16).float().view(-1, 2)
    codes = _unpack(payload[:, :-4], bits, width).float()
    return (meta[:, :1] + codes * meta[:, 1:]).to(dtype)


def _bf16_toward(values: Tensor, direction: float) -> Tensor:
    """``values`` (float32) as bfloat16, rounded toward ``direction`` (±inf)."""
    rounded = values.to(torch.bfloat16)
    off = rounded.float() > values if direction < 0 else rounded.float() < values
    toward = torch.full_like(rounded, direction)
    return torch.where(off, torch.nextafter(rounded, toward), rounded)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """(m, F) codes < 2^bits → (m, ceil(F·bits/8)) uint8, 8/bits codes per byte."""
    per_byte = 8 // bits
    m, width = codes.shape
    padded = torch.zeros(m, math.ceil(width / per_byte) * per_byte, dtype=torch.int32)
    padded = padded.to(codes.device)
    padded[:, :width] = codes
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (padded.view(m, -1, per_byte) << shifts).sum(2).to(torch.uint8)


def _unpack(packed: Tensor, bits: int, width: int) -> Tensor:
    """The inverse of :func:`_pack`: (m, bytes) uint8 → (m, ``width``) codes (uint8)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.size(0), packed.size(1) * per_byte)[:, :width]


class QuantHook(LayerHook):
    """Quantizes training-time halo messages at ``fwd_bits`` / ``bwd_bits`` (both ``bits``
    unless given), or with ``bits=adaptive`` at 2, 4 or 8 bits a row within ``budget`` average
    bits a value (:mod:`bns_pipe.hooks.bit_allocation`; the payload is then a
    :class:`BytePayload`); evaluation messages pass unchanged."""

    name = "quant"

    def __init__(
        self,
        bits: str = "8",
        fwd_bits: str | None = None,
        bwd_bits: str | None = None,
        budget: str | None = None,
    ):
        self.budget = None
        try:
            if bits == "adaptive":
                if fwd_bits or bwd_bits or budget is None:
                    raise ValueError("bits=adaptive takes budget=B, not fwd_bits or bwd_bits")
                self.budget = float(budget)
                if not 2 <= self.budget <= 8:
                    raise ValueError(f"budget must be in [2, 8] bits a value, got {budget}")
                bits = str(max(b for b in BITS if b <= self.budget))  # the uniform reference
            elif budget is not None:
                raise ValueError("budget goes with bits=adaptive")
            uniform_bits = int(bits)
            self.bits = {
                "forward": _check_bits(int(fwd_bits) if fwd_bits else uniform_bits),
                "backward": _check_bits(int(bwd_bits) if bwd_bits else uniform_bits),
            }
        except ValueError as exc:
            usage = "bits=8|4|2[,fwd_bits=…,bwd_bits=…] or bits=adaptive,budget=B"
            raise ValueError(f"quant: {exc} ({usage})") from None
        self.context = EpochContext(0, training=False)
        # (layer, direction) → the (width, dtype) of its rows: the same on every rank
        self.shapes: dict[tuple[int, str], tuple[int, torch.dtype]] = {}
        self.seconds = self.total_seconds = 0.0
        self.epochs = 0
        # adaptive: inner rows' weights by sorted global id; per direction [bits, values]
        # sent and [V/L_b², V/L_ref²] summed over the rows sent (ref: the uniform bits)
        self.inner_ids = self.weights = None
        self.sent = {d: [0.0, 0.0] for d in DIRECTIONS}
        self.variance = [0.0, 0.0]

    def on_graph(self, part: Partition) -> Partition:
        if self.budget is not None:
            owner = torch.repeat_interleave(torch.arange(part.num_parts), part.halo_counts)
            weights = forward_weights(
                part.indptr, part.indices, part.n_inner, owner, part.in_degree, part.num_parts
            )
            order = torch.argsort(part.inner_global_ids)
            self.inner_ids, self.weights = part.inner_global_ids[order], weights[order]
        return part

    def on_epoch(self, context: EpochContext) -> None:
        self.context = context
        self.epochs += context.training

    def on_send(self, message: Message, rows: Tensor) -> Tensor | BytePayload:
        self.shapes[message.layer, message.direction] = (rows.shape[1], rows.dtype)
        if not self.context.training or message.layer < 0:  # evaluation, set-up exchanges
            return rows
        start = time.perf_counter()
        direction = DIRECTIONS[message.direction]
        ctx = self.context
        key = stream_key(ctx.seed, QUANT_STREAM, ctx.epoch, message.layer, direction)
        if self.budget is None:
            payload = quantize(rows, self.bits[message.direction], key, message.global_ids)
        else:
            payload = self._send_adaptive(message, rows, key)
        self._spent(start)
        return payload

    def _send_adaptive(self, message: Message, rows: Tensor, key: int) -> BytePayload:
        """Each row at its width (module docstring of :mod:`~bns_pipe.hooks.bit_allocation`)."""
        width, ids, counts = rows.shape[1], message.global_ids, message.send_rows
        peer = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        spread = (rows.amax(1) - rows.amin(1)).double().cpu() ** 2 * (width / 4)
        if message.direction == "forward" and self.weights is not None:
            spread *= self.weights[torch.searchsorted(self.inner_ids, ids.cpu()), peer]
        bits = allocate(spread, list(counts), width, self.budget)
        self._account(message.direction, bits, spread, width)
        bits, peer = bits.to(rows.device), peer.to(rows.device)
        chunks = []  # per width: its rows' payloads, split by peer
        for b in BITS:
            pick = bits == b
            per_peer = torch.bincount(peer[pick], minlength=len(counts)).tolist()
            chunks.append(quantize(rows[pick], b, key, ids[pick]).split(per_peer))
        tags = torch.bucketize(bits, torch.tensor(BITS, device=bits.device)).to(torch.uint8)
        sizes = [message_bytes(n, width, self.budget) for n in counts]
        pieces = []
        for j, tag in enumerate(tags.split(counts)):
            body = [_pack(tag[None], 2).flatten(), *(c[j].flatten() for c in chunks)]
            used = sum(piece.numel() for piece in body)
            pieces += [*body, rows.new_zeros(sizes[j] - used, dtype=torch.uint8)]
        return BytePayload(
            torch.cat(pieces),
            sizes,
            [message_bytes(n, width, self.budget) for n in message.recv_rows],
        )

    def _account(self, direction: str, bits: Tensor, spread: Tensor, width: int) -> None:
        self.sent[direction][0] += float(bits.sum()) * width
        self.sent[direction][1] += bits.numel() * width
        reference = (1 << self.bits[direction]) - 1
        self.variance[0] += float((spread / ((2.0**bits) - 1) ** 2).sum())
        self.variance[1] += float(spread.sum()) / reference**2

    def on_receive(self, message: Message, payload: Tensor | BytePayload) -> Tensor:
        """Dequantize what was sent quantized (a pipelined transfer may arrive after an
        evaluation, so the payload, not the epoch, tells)."""
        if isinstance(payload, Tensor) and payload.dtype != torch.uint8:
            return payload
        start = time.perf_counter()
        width, dtype = self.shapes[message.layer, message.direction]
        if isinstance(payload, BytePayload):
            rows = self._receive_adaptive(message, payload, width, dtype)
        else:
            rows = dequantize(payload, self.bits[message.direction], width, dtype)
        self._spent(start)
        return rows

    def _receive_adaptive(
        self, message: Message, payload: BytePayload, width: int, dtype: torch.dtype
    ) -> Tensor:
        """Read each peer's tags, then its rows class by class."""
        tags, coded = [], [[] for _ in BITS]
        for n, data in zip(message.recv_rows, payload.data.split(payload.recv_bytes), strict=True):
            offset = math.ceil(n / 4)  # the tags' bytes
            tag = _unpack(data[None, :offset], 2, n).flatten()
            for k, b in enumerate(BITS):
                size = row_bytes(width, b)
                count = int((tag == k).sum())
                coded[k].append(data[offset : offset + count * size].view(count, size))
                offset += count * size
            tags.append(tag)
        tag = torch.cat(tags)
        rows = torch.empty(tag.numel(), width, dtype=dtype, device=payload.data.device)
        for k, b in enumerate(BITS):
            rows[tag == k] = dequantize(torch.cat(coded[k]), b, width, dtype)
        return rows

    def _spent(self, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.total_seconds += elapsed

    def epoch_times(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, 0.0
        return {"quantize_s": seconds}

    def report(self) -> dict:
        """Uniform: the bits. Adaptive: the average bits a value this rank sent (rank 0's in
        the final metrics), and the weighted variance against uniform ``budget`` bits."""
        report = {f"avg_bits_{d}": float(self.bits[d]) for d in DIRECTIONS}
        if self.budget is not None:
            for d, (bits, values) in self.sent.items():
                report[f"avg_bits_{d}"] = bits / values if values else 0.0
            adaptive, uniform = self.variance
            report["budget"] = self.budget
            report["variance_vs_uniform"] = adaptive / uniform if uniform else 1.0
        return {**report, "quantize_s": self.total_seconds / max(self.epochs, 1)}
