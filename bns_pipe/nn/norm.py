"""Normalisation layers; :class:`DistBatchNorm` takes its batch statistics over all ranks.

Each rank holds the rows x_i (n_i, C) of one partition. In training, DistBatchNorm normalises
with the statistics of all N = sum_i n_i rows::

    mean = sum_rows x / N,   var = sum_rows x^2 / N - mean^2   (biased),
    x_hat = (x - mean) / sqrt(var + eps),   y = weight * x_hat + bias

from one all-reduce of [sum x, sum x^2, n] per step, and the backward is exact for the
concatenated rows::

    dx = weight / sqrt(var + eps) * (dy - sum_rows dy / N - x_hat * sum_rows(dy * x_hat) / N)

with the two sums over all ranks' rows (one more all-reduce). The weight and bias gradients are
the local sums ``sum(dy * x_hat)`` and ``sum(dy)``; summing them over ranks, as data-parallel
gradient averaging does up to a constant, gives the gradients of the single-process layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function

__all__ = ["NORMS", "DistBatchNorm", "make_norm"]

NORMS = ("none", "layer", "batch")


class _DistBatchNormFn(Function):
    """y = weight * (x - mean) * invstd + bias with the cross-rank exact backward."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        x_hat = (x - mean) * invstd
        return x_hat if weight is None else torch.addcmul(bias, x_hat, weight)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        x_hat = (x - mean) * invstd
        local = torch.stack([dy.sum(0), (dy * x_hat).sum(0)])  # (2, C): d bias, d weight
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        sum_dy, sum_dy_xhat = total / ctx.count
        gain = invstd if weight is None else invstd * weight
        dx = (dy - sum_dy - x_hat * sum_dy_xhat) * gain
        if weight is None:
            return dx, None, None, None, None, None, None
        return dx, local[1], local[0], None, None, None, None


class DistBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the rows of every rank in ``group`` (default: the world); x (n_i, C).

    Training normalises with the mean and biased variance of all ranks' rows, and updates
    ``running_mean`` / ``running_var`` (unbiased) identically on every rank; evaluation uses the
    running statistics. Without an initialised process group, or in a group of one, it is
    ``nn.BatchNorm1d``, with the same parameter and buffer names. Every rank of the group must
    run the forward and the backward of each step (both communicate).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.group = group

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self._distributed():
            return super().forward(x)
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (n, {self.num_features}), got {tuple(x.shape)}")
        mean, var, count = self._global_stats(x)
        if count <= 1:
            raise ValueError(f"expected more than 1 row over all ranks in training, got {count}")
        self._update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + self.eps)
        return _DistBatchNormFn.apply(
            x, self.weight, self.bias, mean.to(x.dtype), invstd.to(x.dtype), count, self.group
        )

    def _global_stats(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """Mean and biased variance (C,) float64 of all ranks' rows, and their count N.

        Each rank contributes ``[n * m, n * (v + m^2), n]`` from its own (stable) mean m and
        variance v, summed in float64 by one all-reduce.
        """
        n, c = x.shape
        stats = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        if n > 0:
            var, mean = torch.var_mean(x.detach(), dim=0, correction=0)
            mean, var = mean.double(), var.double()
            stats[:c] = n * mean
            stats[c : 2 * c] = n * (var + mean.square())
        stats[2 * c] = n
        dist.all_reduce(stats, group=self.group)
        count = int(stats[2 * c].item())
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean.square()).clamp_min_(0.0)
        return mean, var, count

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """running = (1 - m) * running + m * batch stat, with the unbiased variance."""
        self.num_batches_tracked.add_(1)
        m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.copy_((1.0 - m) * self.running_mean + m * mean)
        self.running_var.copy_((1.0 - m) * self.running_var + m * unbiased)


def make_norm(kind: str, dim: int) -> nn.Module:
    """The normalisation layer named ``kind`` ("none", "layer", "batch") for ``dim`` features."""
    if kind == "none":
        return nn.Identity()
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return DistBatchNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; choose from {list(NORMS)}")
