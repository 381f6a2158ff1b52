"""A counter-based random stream: one fixed hash from (key, counter) to [0, 1).

Every number is a pure function of a 64-bit key and a 64-bit counter, so two processes that
agree on both draw the same value without communicating, in any order and on any device. The
hash is splitmix64's finaliser on unsigned 64-bit integers (all arithmetic modulo 2^64)::

    mix(z):  z = z + 0x9E3779B97F4A7C15
             z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
             z = (z ^ (z >> 27)) * 0x94D049BB133111EB
             return z ^ (z >> 31)

    stream_key(f0, f1, ..., fk) = mix(... mix(mix(f0) ^ f1) ... ^ fk)     (fields mod 2^64)
    bits(key, c)     = mix(key ^ c) >> 40                                   (24 random bits)
    uniform(key, c)  = bits(key, c) * 2^-24                                 (float32, exact)
    keep(key, c, p)  = uniform(key, c) < p  <=>  bits(key, c) < ceil(p * 2^24)

A counter is an int64 tensor element read as its two's-complement uint64 bits. The C++ ops
(``random_uniform``, ``random_keep_mask``; used when built for the tensor's device) and the
pure-PyTorch fallback give bit-identical results; the fallback emulates uint64 with int64
tensors, whose ``+`` and ``*`` wrap modulo 2^64 and whose ``>>`` is made logical by masking
off the copied sign bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bns_pipe import _ext

__all__ = ["keep_mask", "mix", "mix_tensor", "stream_key", "uniform"]

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
BITS = 24


def mix(z: int) -> int:
    """The splitmix64 finaliser on one Python int, read modulo 2^64; returns a uint64 value."""
    z = (z + GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def stream_key(*fields: int) -> int:
    """Fold integer fields (seed, epoch, layer, ranks, ...) into one uint64 key.

    ``key = mix(... mix(mix(f0) ^ f1) ... ^ fk)``; the order of the fields matters.
    """
    if not fields:
        raise TypeError("stream_key needs at least one field")
    key = 0
    for field in fields:
        key = mix(key ^ (field & MASK64))
    return key


def to_int64(value: int) -> int:
    """The int64 whose two's-complement bits are ``value mod 2^64`` (a schema ``int``)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def check_probability(p: float) -> None:
    """Raise ValueError unless p is in [0, 1]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")


def threshold(p: float) -> int:
    """``ceil(p * 2^24)``: the number of 24-bit values below ``p``, for p in [0, 1]."""
    check_probability(p)
    return math.ceil(p * (1 << BITS))


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 ``z`` read as uint64."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def mix_tensor(z: Tensor) -> Tensor:
    """``mix`` of every element of int64 ``z`` (read as uint64), with int64 tensor ops; the
    result's bits are the uint64 value."""
    z = z.add(to_int64(GAMMA))
    z.bitwise_xor_(_shr(z, 30)).mul_(to_int64(MUL1))
    z.bitwise_xor_(_shr(z, 27)).mul_(to_int64(MUL2))
    return z.bitwise_xor_(_shr(z, 31))


def _bits_torch(key: int, counters: Tensor) -> Tensor:
    """``bits(key, c)`` for every counter, as int64 in [0, 2^24), with int64 tensor ops."""
    return _shr(mix_tensor(counters.bitwise_xor(to_int64(key))), 64 - BITS)


def has_ext_kernel(op: str, device: torch.device) -> bool:
    """Whether the C++ op ``torch.ops.bns_pipe.<op>`` is loaded with a kernel for ``device``."""
    return _ext.available() and getattr(_ext.ops(), op).default.has_kernel_for_dispatch_key(
        device.type.upper()
    )


def _check_counters(counters: Tensor) -> None:
    if counters.dtype != torch.int64:
        raise TypeError(f"counters must be int64, got {counters.dtype}")


def uniform(key: int, counters: Tensor) -> Tensor:
    """``uniform(key, c)`` in [0, 1) for every counter: int64 (...) -> float32 (...)."""
    _check_counters(counters)
    if has_ext_kernel("random_uniform", counters.device):
        return _ext.ops().random_uniform(to_int64(key), counters)
    return _bits_torch(key, counters).to(torch.float32).mul_(2.0**-BITS)


def keep_mask(key: int, counters: Tensor, p: float) -> Tensor:
    """``uniform(key, c) < p`` (compared exactly) for every counter: int64 (...) -> bool (...).

    p = 1 keeps every counter, p = 0 none.
    """
    _check_counters(counters)
    t = threshold(p)
    if has_ext_kernel("random_keep_mask", counters.device):
        return _ext.ops().random_keep_mask(to_int64(key), counters, t)
    return _bits_torch(key, counters) < t
