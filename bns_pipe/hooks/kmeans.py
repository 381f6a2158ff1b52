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
- evaluations score the shared form in both phases (in the soft phase the current W
  clustered from the last centres), so model selection (best validation epoch) ranges over
  the whole run and the best model always shares K values.

The weights are replicated, so every rank clusters the same values and adds the same λ/K
share of the regulariser to its loss. Checkpoints hold the shared weights under plain names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bns_pipe.compress.codecs import KMeansCodec, index_bits, kmeans_1d
from bns_pipe.hooks.base import EpochContext
from bns_pipe.hooks.projection import ProjectionHook, latent

__all__ = ["KMeansHook"]


class KMeansHook(ProjectionHook):
    name = "kmeans"

    def __init__(self, k: str = "16", lam: str = "1e-4", every: str = "5", hard_at: str = "0.75"):
        super().__init__(KMeansCodec(k), every)
        self.k, self.lam, self.hard_at = int(k), float(lam), float(hard_at)
        if self.lam < 0 or not 0 <= self.hard_at <= 1:
            raise ValueError("lam must be >= 0 and hard_at in [0, 1]")
        self.assignments: list[tuple[Tensor, Tensor]] = []  # per layer: (centres, index)
        self.hard = False
        self.will_share = self.hard_at < 1
        self.evaluated_shared = False

    def on_epoch(self, context: EpochContext) -> None:
        if not context.training:
            self._share_for_evaluation()
            return
        sharing_from = math.floor(self.hard_at * context.epochs)
        self.hard, self.will_share = context.epoch >= sharing_from, sharing_from < context.epochs
        if self.hard or not self.assignments or context.epoch % self.every == 0:
            starts = [c for c, _ in self.assignments] or [None] * len(self.layers)
            self.assignments = [
                kmeans_1d(latent(module), self.k, init)
                for (module, _), init in zip(self.layers, starts, strict=True)
            ]
        for (module, projected), (centres, index) in zip(
            self.layers, self.assignments, strict=True
        ):
            weight = latent(module)
            shared = centres[index].view(weight.shape).to(weight) if self.hard else None
            projected.projected = shared

    def _share_for_evaluation(self) -> None:
        """In the soft phase an evaluation scores the weights as the run would share them
        now: C[nearest(W)] of a clustering of the current W (from the last centres); the
        next training step computes with W again."""
        if self.hard or not self.will_share or not self.assignments:
            return
        for (module, projected), (centres, _) in zip(self.layers, self.assignments, strict=True):
            weight = latent(module)
            now, index = kmeans_1d(weight, self.k, centres)
            projected.projected = now[index].view(weight.shape).to(weight)
        self.evaluated_shared = True

    def deployed(self) -> bool:
        """Whether evaluations score shared weights: in the hard phase, and in the soft
        phase once it has clustered (a run that never shares deploys W)."""
        return self.hard or not self.will_share or self.evaluated_shared

    def loss_term(self) -> Tensor | None:
        """λ/2 Σ (w - c(w))² over the layers in the soft phase."""
        if self.hard or self.lam == 0 or not self.assignments:
            return None
        terms = []
        for (module, _), (centres, index) in zip(self.layers, self.assignments, strict=True):
            weight = latent(module).flatten()
            means = torch.zeros_like(centres).index_add_(0, index, weight.detach().double())
            means = means / torch.bincount(index, minlength=self.k).clamp(min=1)
            terms.append((weight - means[index].to(weight.dtype)).pow(2).sum())
        return self.lam / 2 * sum(terms)

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
