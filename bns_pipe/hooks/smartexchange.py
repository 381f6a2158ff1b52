"""SmartExchange training: ``--hook smartexchange[:basis=3,sparsity=0.2,exp_bits=4,
iterations=40,refresh=2,every=1]``.

Every conv weight computes as W' = Ce·B (Zhao et al., 2020; SmartDeal, Chen et al., 2021): B
a basis × basis matrix, Ce sparse with entries 0 or ±2^k (the codec of
:mod:`bns_pipe.compress.smartexchange`, its options too), with a straight-through gradient to
the latent W (:mod:`bns_pipe.hooks.projection`). The first decomposition runs ``iterations``
alternations from the identity; each refresh after it starts from the layer's last basis and
runs ``refresh`` alternations (the structure moves with the weights instead of being found
anew). The basis is kept in the parametrization (checkpointed with the hook's state), so
``bns-pipe compress --method smartexchange`` decomposes the trained W' back exactly.

Report: ``sparsity`` (the fraction of Ce's entries that are 0, all layers), ``ratio``
(float32 bytes / stored bytes) and ``refresh_s``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bns_pipe.compress.codecs import unpack_bits
from bns_pipe.compress.smartexchange import SmartExchangeCodec
from bns_pipe.hooks.projection import Projected, ProjectionHook

__all__ = ["SmartExchangeHook"]


class _WithBasis(Projected):
    """The projection and the layer's basis B (float64 holding B's stored float32 values)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("basis", torch.eye(size, dtype=torch.float64))


class SmartExchangeHook(ProjectionHook):
    name = "smartexchange"
    codec: SmartExchangeCodec

    def __init__(
        self,
        basis: str = "3",
        sparsity: str = "0.2",
        exp_bits: str = "4",
        iterations: str = "40",
        refresh: str = "2",
        every: str = "1",
    ) -> None:
        super().__init__(SmartExchangeCodec(basis, sparsity, exp_bits, iterations), every)
        self.refresh = int(refresh)
        if self.refresh < 1:
            raise ValueError(f"refresh must be at least 1 iteration, got {self.refresh}")

    def parametrization(self) -> Projected:
        return _WithBasis(self.codec.basis)

    def encode(self, projected: Projected, weight: Tensor) -> dict[str, Tensor]:
        iterations = self.codec.iterations if projected.projected is None else self.refresh
        fields = self.codec.encode_from(weight, iterations, projected.basis)
        projected.basis.copy_(fields["basis"].double())
        return fields

    def report(self) -> dict:
        total = zeros = 0
        for (module, _), fields in zip(self.layers, self.fields, strict=True):
            cells = module.weight.numel() // self.codec.basis * self.codec.basis
            kept = int(unpack_bits(fields["mask"], 1, cells).sum())
            total, zeros = total + cells, zeros + cells - kept
        return {"sparsity": zeros / total if total else 0.0, **super().report()}
