"""Deep k-Means weight sharing: ``--hook kmeans:k=K[,lam=λ,every=E,hard_at=H]``.

Each conv weight W is pulled towards K shared values during training and shares them
exactly at the end (Wu et al., ICML 2018, for scalar weights):

- soft phase: the loss gains λ/2 [tr(WᵀW) - tr(FᵀWᵀWF)] per layer, with F the normalised
  cluster-indicator matrix of W's values (refreshed every E epochs by 1-D k-means,
  :func:`~bns_pipe.compress.codecs.kmeans_1d`): that is λ/2 Σ (w - c(w))², c(w) the mean of
  w's cluster, whose gradient λ (w - c(w)) pulls every weight to its centre. (The paper
  relaxes F to W's top singular vectors to cluster vectors; for scalars the exact 1-D
  clustering is cheap, and the relaxation would be degenerate: WᵀW has rank 1.)
- hard phase, from epoch ⌊H · epochs⌋: the layer computes with C[nearest(W)], the nearest of
  the K centres (refreshed every epoch), and its gradient passes straight through to W.

The weights are replicated, so every rank clusters the same values and adds the same λ/K
share of the regulariser to its loss. Checkpoints hold the shared weights under plain names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bns_pipe.compress.codecs import index_bits, kmeans_1d, nearest
from bns_pipe.hooks.base import EpochContext, LayerHook
from bns_pipe.hooks.weights import conv_weights

__all__ = ["KMeansHook"]


class _Shared(nn.Module):
    """The parametrization: W itself (soft phase) or C[nearest(W)] with a straight-through
    gradient (hard phase)."""

    def __init__(self) -> None:
        super().__init__()
        self.hard = False
        self.centres: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if not self.hard or self.centres is None:
            return weight
        centres = self.centres.to(weight.dtype)
        shared = centres[nearest(weight.detach(), centres)]
        return shared + (weight - weight.detach())  # exactly the centres; gradient 1


class KMeansHook(LayerHook):
    name = "kmeans"

    def __init__(self, k: str = "16", lam: str = "1e-4", every: str = "5", hard_at: str = "0.75"):
        self.k, self.lam, self.every, self.hard_at = int(k), float(lam), int(every), float(hard_at)
        if self.k < 2:
            raise ValueError(f"k must be at least 2 centres, got {self.k}")
        if self.lam < 0 or self.every < 1 or not 0 <= self.hard_at <= 1:
            raise ValueError("lam must be >= 0, every >= 1 and hard_at in [0, 1]")
        self.layers: list[tuple[nn.Module, _Shared]] = []
        self.assignments: list[tuple[Tensor, Tensor]] = []  # per layer: (centres, index)

    def on_model(self, model: nn.Module) -> None:
        for _, module in conv_weights(model):
            shared = _Shared()
            parametrize.register_parametrization(module, "weight", shared)
            self.layers.append((module, shared))

    def on_epoch(self, context: EpochContext) -> None:
        if not context.training:
            return
        hard = context.epoch >= math.floor(self.hard_at * context.epochs)
        if hard or not self.assignments or context.epoch % self.every == 0:
            starts = [c for c, _ in self.assignments] or [None] * len(self.layers)
            self.assignments = [
                kmeans_1d(self._latent(module), self.k, init)
                for (module, _), init in zip(self.layers, starts, strict=True)
            ]
        for (_, shared), (centres, _) in zip(self.layers, self.assignments, strict=True):
            shared.hard, shared.centres = hard, centres

    @staticmethod
    def _latent(module: nn.Module) -> Tensor:
        return module.parametrizations.weight.original

    def loss_term(self) -> Tensor | None:
        """λ/2 Σ (w - c(w))² over the layers in the soft phase."""
        terms = []
        for (module, shared), (centres, index) in zip(self.layers, self.assignments, strict=True):
            if not shared.hard and self.lam > 0:
                weight = self._latent(module).flatten()
                means = torch.zeros_like(centres).index_add_(0, index, weight.detach().double())
                means = means / torch.bincount(index, minlength=self.k).clamp(min=1)
                terms.append((weight - means[index].to(weight.dtype)).pow(2).sum())
        return self.lam / 2 * sum(terms) if terms else None

    def report(self) -> dict:
        """The centres a layer uses (its distinct weights, at most k) and the storage ratio
        of k centres plus ceil(log2 k)-bit indices against float32."""
        bits = index_bits(self.k)
        dense = stored = 0
        clusters = []
        for module, _ in self.layers:
            n = module.weight.numel()
            clusters.append(int(torch.unique(module.weight.detach()).numel()))
            dense, stored = dense + 4 * n, stored + 4 * self.k + math.ceil(n * bits / 8)
        return {"clusters": clusters, "ratio": dense / stored if stored else 1.0}
