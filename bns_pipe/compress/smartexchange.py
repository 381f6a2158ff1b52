"""SmartExchange weights (Zhao et al., 2020): W ≈ Ce · B with a small basis B and a sparse
coefficient matrix Ce whose entries are 0 or ±2^k.

W (out, in) is read row-major in blocks of ``basis`` values: X (m, b), m = floor(out·in / b);
the tail of out·in mod b values (fewer than b) is stored as it is, in float32. The
decomposition of X alternates, ``iterations`` times:

    Ce = X B⁺ → the ``sparsity`` fraction of smallest |Ce| set to 0 → the rest rounded to the
    nearest ±2^k with k in [k_max - 2^E + 1, k_max] (smaller ones to 0)
    B  = argmin ‖X - Ce B‖ (least squares)

and keeps the pair with the smallest error ‖X - Ce B‖_F (the errors are returned per
iteration). B starts at the identity, or at a given basis: the one ``--hook smartexchange``
trained with (its saved state), with which a trained weight Ce·B decomposes back exactly.

A file stores B (b, b) float32, k_max, and for Ce a bit mask of its nonzeros, then per
nonzero its sign bit and k_max - k in E bits: about 1 + (1 - sparsity)(1 + E) bits a weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bns_pipe.compress.codecs import Codec, pack_bits, unpack_bits

__all__ = ["SmartExchangeCodec", "decompose", "power_of_two"]


def power_of_two(c: Tensor, exp_bits: int) -> tuple[Tensor, int]:
    """The nonzeros of ``c`` rounded to the nearest ±2^k (nearest in value: 2^k up to
    1.5·2^k), k within 2^``exp_bits`` steps below the largest; returns (rounded, k_max)."""
    magnitude = c.abs()
    nonzero = magnitude > 0
    if not nonzero.any():
        return torch.zeros_like(c), 0
    k = torch.floor(torch.log2(torch.where(nonzero, magnitude, 1.0)))
    k = k + (magnitude > 1.5 * torch.exp2(k)).to(k.dtype)
    k_max = int(k[nonzero].max())
    kept = nonzero & (k >= k_max - (1 << exp_bits) + 1)
    return torch.where(kept, torch.sign(c) * torch.exp2(k), 0.0), k_max


def decompose(
    x: Tensor, sparsity: float, exp_bits: int, iterations: int, basis: Tensor | None = None
) -> tuple[Tensor, Tensor, int, list[float]]:
    """(Ce, B, k_max, errors) for X (m, b) float64, B starting at ``basis`` (b, b) or the
    identity (module docstring)."""
    b = x.shape[1]
    basis = torch.eye(b, dtype=torch.float64) if basis is None else basis.double()
    if x.numel() == 0:  # a weight smaller than one block: all of it is the tail
        return x.clone(), basis, 0, [0.0]
    best, errors = None, []
    for _ in range(iterations):
        coefficients = x @ torch.linalg.pinv(basis)
        if sparsity > 0:
            cut = torch.quantile(coefficients.abs().flatten(), sparsity)
            coefficients = torch.where(coefficients.abs() > cut, coefficients, 0.0)
        coefficients, k_max = power_of_two(coefficients, exp_bits)
        basis = torch.linalg.lstsq(coefficients, x).solution
        error = float(torch.linalg.norm(x - coefficients @ basis))
        errors.append(error)
        if best is None or error < best[0]:
            best = (error, coefficients, basis, k_max)
    _, coefficients, basis, k_max = best
    return coefficients, basis, k_max, errors


class SmartExchangeCodec(Codec):
    name = "smartexchange"

    def __init__(
        self, basis: str = "3", sparsity: str = "0.2", exp_bits: str = "4", iterations: str = "40"
    ) -> None:
        self.basis, self.sparsity = int(basis), float(sparsity)
        self.exp_bits, self.iterations = int(exp_bits), int(iterations)
        if self.basis < 1 or not 0 <= self.sparsity < 1:
            raise ValueError("smartexchange needs basis >= 1 and sparsity in [0, 1)")
        if not 1 <= self.exp_bits <= 8 or self.iterations < 1:
            raise ValueError("smartexchange needs exp_bits in [1, 8] and iterations >= 1")

    def blocks(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """X (m, b) float64, W's values row-major in whole blocks, and the tail (the rest)."""
        flat = weight.detach().double().flatten()
        whole = flat.numel() // self.basis * self.basis
        return flat[:whole].view(-1, self.basis), flat[whole:]

    def encode(self, weight: Tensor, basis: Tensor | None = None) -> dict[str, Tensor]:
        """The fields of W's decomposition, B starting at ``basis`` or the identity."""
        return self.encode_from(weight, self.iterations, basis)

    def encode_from(
        self, weight: Tensor, iterations: int, basis: Tensor | None = None
    ) -> dict[str, Tensor]:
        """:meth:`encode` after ``iterations`` alternations from ``basis``."""
        x, tail = self.blocks(weight)
        coefficients, basis, k_max, _ = decompose(
            x, self.sparsity, self.exp_bits, iterations, basis
        )
        return {**self.fields(coefficients, basis, k_max), "tail": tail.float()}

    def hint(self, hook_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """The basis ``--hook smartexchange`` trained ``<prefix>.weight`` with, if its
        shape fits."""
        basis = hook_state.get(f"{prefix}.parametrizations.weight.0.basis")
        fits = basis is not None and tuple(basis.shape) == (self.basis, self.basis)
        return {"basis": basis} if fits else {}

    def fields(self, coefficients: Tensor, basis: Tensor, k_max: int) -> dict[str, Tensor]:
        """What a file stores of Ce (m, b) and B (b, b) (beside W's tail): B, k_max, the bit
        mask of Ce's nonzeros, their signs and exponents k_max - k."""
        flat = coefficients.flatten()
        nonzero = flat != 0
        k = torch.log2(flat[nonzero].abs()).round().long()
        return {
            "basis": basis.float(),
            "k_max": torch.tensor([k_max], dtype=torch.int16),
            "mask": pack_bits(nonzero.long(), 1),
            "signs": pack_bits((flat[nonzero] < 0).long(), 1),
            "exponents": pack_bits(k_max - k, self.exp_bits),
        }

    def decode(self, fields: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        m = n // self.basis
        nonzero = unpack_bits(fields["mask"], 1, m * self.basis).bool()
        count = int(nonzero.sum())
        signs = 1 - 2 * unpack_bits(fields["signs"], 1, count)
        k = int(fields["k_max"][0]) - unpack_bits(fields["exponents"], self.exp_bits, count)
        flat = torch.zeros(m * self.basis, dtype=torch.float64)
        flat[nonzero] = signs.double() * torch.exp2(k.double())
        weight = flat.view(m, self.basis) @ fields["basis"].double()
        return torch.cat([weight.flatten().float(), fields["tail"]]).view(shape)
