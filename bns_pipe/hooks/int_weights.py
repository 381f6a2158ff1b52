"""Integer weights in training (quantization-aware): ``--hook int:bits=B[,every=1]``.

Every conv weight computes as its B-bit symmetric integers per output row times the row's
scale, s = max|W_row| / (2^(B-1) - 1) (one bit: ±mean|W_row|), the ``int`` codec of
:mod:`bns_pipe.compress.codecs`, with a straight-through gradient to the latent W
(:mod:`bns_pipe.hooks.projection`). A checkpoint's weights are then exactly what
``bns-pipe compress --method int:bits=B`` stores. Report: ``bits_per_layer`` (one width per
conv layer), ``ratio`` (float32 bytes / stored bytes, scales included) and ``refresh_s``.
"""

from __future__ import annotations

from bns_pipe.compress.codecs import IntCodec
from bns_pipe.hooks.projection import ProjectionHook

__all__ = ["IntHook"]


class IntHook(ProjectionHook):
    name = "int"
    codec: IntCodec

    def __init__(self, bits: str = "8", every: str = "1") -> None:
        super().__init__(IntCodec(bits), every)

    def report(self) -> dict:
        convs = {name.rsplit(".", 1)[0] for name in self.layer_names}  # SAGE: 2 maps a conv
        return {"bits_per_layer": [self.codec.bits] * len(convs), **super().report()}
