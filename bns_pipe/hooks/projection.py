"""Weights held in a compression codec's form during training (the base of ``--hook int``
and ``--hook smartexchange``, and of k-means' hard phase).

Each conv weight W computes as P(W), the codec's reconstruction decode(encode(W))
(:mod:`bns_pipe.compress.codecs`), with a straight-through gradient: ∂L/∂W := ∂L/∂P(W), so
the latent W keeps learning in full precision while every forward uses the compressed
form. P(W) is refreshed from the latent W before the first training step and every
``every`` steps after (``every=1``: each step computes with the projection of the current
weights). Evaluations and checkpoints use the last refresh's P(W), which is exactly in the
codec's form: ``bns-pipe compress`` with the same method stores it losslessly (to float
rounding). The weights are replicated, so every rank projects the same values.
"""

from __future__ import annotations

import time

from torch import Tensor, nn
from torch.nn.utils import parametrize

from bns_pipe.compress.codecs import Codec
from bns_pipe.hooks.base import EpochContext, LayerHook
from bns_pipe.hooks.weights import conv_weights

__all__ = ["Projected", "ProjectionHook"]


class Projected(nn.Module):
    """The parametrization: W until the first refresh, then ``projected`` + (W - W.detach())
    (the projection's values, W's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.projected: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self.projected is None:
            return weight
        return self.projected + (weight - weight.detach())


def latent(module: nn.Module) -> Tensor:
    """The trained tensor behind a parametrized ``weight``."""
    return module.parametrizations.weight.original


class ProjectionHook(LayerHook):
    """A weight hook computing with ``codec``'s reconstruction of each conv weight; a
    subclass names it, parses its options and may keep state per layer
    (:meth:`parametrization`) and start each refresh from it (:meth:`encode`)."""

    def __init__(self, codec: Codec, every: str = "1") -> None:
        self.codec, self.every = codec, int(every)
        if self.every < 1:
            raise ValueError(f"every must be at least 1 step, got {self.every}")
        self.layers: list[tuple[nn.Module, Projected]] = []
        self.layer_names: list[str] = []
        self.fields: list[dict[str, Tensor]] = []  # per layer, the last refresh's
        self.refresh_s = 0.0

    def parametrization(self) -> Projected:
        return Projected()

    def on_model(self, model: nn.Module) -> None:
        for name, module in conv_weights(model):
            projected = self.parametrization()
            parametrize.register_parametrization(module, "weight", projected)
            self.layers.append((module, projected))
            self.layer_names.append(name)

    def on_epoch(self, context: EpochContext) -> None:
        if not context.training or (self.fields and context.epoch % self.every):
            return
        start = time.perf_counter()
        self.fields = []
        for module, projected in self.layers:
            weight = latent(module).detach()
            fields = self.encode(projected, weight.cpu())
            projected.projected = self.codec.decode(fields, tuple(weight.shape)).to(weight)
            self.fields.append(fields)
        self.refresh_s += time.perf_counter() - start

    def encode(self, projected: Projected, weight: Tensor) -> dict[str, Tensor]:
        """The codec's fields for one layer's latent ``weight`` (on the CPU)."""
        return self.codec.encode(weight)

    def ratio(self) -> float:
        """float32 bytes of the weights / bytes of the codec's fields (as a compressed file
        stores them)."""
        dense = sum(4 * module.weight.numel() for module, _ in self.layers)
        stored = sum(t.numel() * t.element_size() for f in self.fields for t in f.values())
        return dense / stored if stored else 1.0

    def report(self) -> dict:
        return {"ratio": self.ratio(), "refresh_s": self.refresh_s}
