"""PipeGCN (ICLR'22): halo features and gradients one epoch stale, their transfers hidden
behind the next epoch's computation.

In epoch t, at layer l:

- forward: the layer aggregates the halo rows the owners sent during epoch t-1 (their
  layer-l inputs of epoch t-1, for the rows of epoch t's boundary sample), and this epoch's
  rows start travelling, for the rows of epoch t+1's sample (known in advance from the
  counter-based stream, so BNS combines with the pipeline);
- backward: this epoch's halo gradients (epoch t's sample) start travelling back to their
  owners, and the owner adds the gradients returned during epoch t-1 into the rows it sent.

Nothing waits for a transfer until the next epoch needs it. The first epoch of each layer
(epoch 0, or a layer not seen yet) warms up with one synchronous exchange, whose rows also
serve as the "previous epoch" of epoch 1 when the plans of both epochs agree. Optional
smoothing keeps, per row of the whole boundary set (halo rows for features, send-list
positions for gradients), ``avg = γ avg + (1 - γ) received`` over the rows received, and uses
the bias-corrected ``avg / (1 - γ^n)``, n the row's number of updates (γ = 0: no smoothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bns_pipe.comm.halo import HaloExchange, Transfer
from bns_pipe.sampling import EpochSample, scatter_add_rows


class Smoother:
    """Bias-corrected exponential moving average over the rows of a fixed set of ``size``."""

    def __init__(self, gamma: float, size: int) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"smoothing factor must be in [0, 1), got {gamma}")
        self.gamma, self.size = gamma, size
        self.avg: Tensor | None = None
        self.count: Tensor | None = None
        self.uniform_count: int | None = 0  # the rows' common count while they share one

    def __call__(self, rows: Tensor, keep: Tensor) -> Tensor:
        """Update the rows at the True positions of ``keep`` (size,) with ``rows`` (m, F);
        return their corrected averages (m, F). γ = 0 returns ``rows`` itself."""
        if self.gamma == 0.0 or self.size == 0:
            return rows
        if self.avg is None:
            self.avg = rows.new_zeros((self.size, *rows.shape[1:]))
            self.count = torch.zeros(self.size, dtype=torch.int64, device=rows.device)
        if rows.size(0) == self.size:  # every row received (no sampling): in place, one pass
            self.avg.lerp_(rows, 1.0 - self.gamma)
            self.count += 1
            if self.uniform_count is not None:  # every row updated as often: one correction
                self.uniform_count += 1
                return self.avg / (1.0 - self.gamma**self.uniform_count)
            avg, count = self.avg, self.count
        else:
            self.uniform_count = None
            index = keep.nonzero().squeeze(1)
            avg = self.avg[index].lerp_(rows, 1.0 - self.gamma)
            self.avg[index] = avg
            self.count[index] += 1
            count = self.count[index]
        correction = 1.0 - torch.pow(self.gamma, count.to(rows.dtype))
        return avg / correction.unsqueeze(1)

    def state(self) -> dict[str, Tensor]:
        return {} if self.avg is None else {"avg": self.avg, "count": self.count}

    def load(self, state: dict[str, Tensor]) -> None:
        self.avg, self.count = state.get("avg"), state.get("count")
        self.uniform_count = 0
        if self.count is not None and self.size:
            first = int(self.count[0])
            self.uniform_count = first if bool((self.count == first).all()) else None


@dataclass
class _Returned:
    """Gradients returned for the rows of one epoch's plan (a transfer until waited for)."""

    rows: Transfer | Tensor
    send_index: Tensor
    send_keep: Tensor


class HaloPipeline:
    """The pipelined transport over ``exchange`` (its process group and hooks).

    Call :meth:`start_epoch` before each training epoch's forward pass. Between epochs the
    transfers of the last epoch are in flight; :meth:`drain` completes them (before a
    checkpoint, and at the end of training).
    """

    def __init__(
        self, exchange: HaloExchange, feat_smooth: float = 0.0, grad_smooth: float = 0.0
    ) -> None:
        self.exchange = exchange
        self.feat_smooth, self.grad_smooth = feat_smooth, grad_smooth
        self.plan = self.next_plan = exchange.full_plan
        self.features: dict[int, Transfer | Tensor] = {}  # layer → rows for this epoch
        self.returned: dict[int, _Returned] = {}  # layer → gradients for this epoch
        self.feature_avg: dict[int, Smoother] = {}
        self.gradient_avg: dict[int, Smoother] = {}

    def start_epoch(self, plan: EpochSample | None, next_plan: EpochSample | None) -> None:
        """This epoch aggregates under ``plan`` and sends features for ``next_plan``
        (``None``: every boundary node)."""
        full = self.exchange.full_plan
        self.plan = full if plan is None else plan
        self.next_plan = full if next_plan is None else next_plan

    # -- the transport protocol -----------------------------------------------------------

    def send_features(self, x: Tensor, layer: int) -> Transfer | Tensor:
        """Start sending ``x``'s rows for the next epoch; return what this epoch uses."""
        stale = self.features.get(layer)
        if stale is None:  # warm-up: this epoch's rows, synchronously
            stale = self.exchange.wait(self.exchange.start_forward(x, layer, self.plan))
            # Reused only when no rank samples: every rank must issue the same transfers, and
            # two samples that agree on one rank (say, one without a halo) may not on another.
            if self.plan is self.next_plan:
                self.features[layer] = stale
                return stale
        self.features[layer] = self.exchange.start_forward(x, layer, self.next_plan)
        return stale

    def halo_features(self, sent: Transfer | Tensor, layer: int) -> Tensor:
        rows = sent if isinstance(sent, Tensor) else self.exchange.wait(sent)
        smoother = self._smoother(self.feature_avg, layer, self.feat_smooth, self.plan.halo_keep)
        return smoother(rows, self.plan.halo_keep)

    def send_gradients(self, grad_halo: Tensor, layer: int) -> _Returned:
        """Start returning ``grad_halo``; return the gradients this epoch adds."""
        plan = self.plan
        transfer = self.exchange.start_backward(grad_halo, layer, plan)
        stale = self.returned.get(layer)
        if stale is None:  # warm-up: this epoch's gradients, which also serve the next
            stale = _Returned(self.exchange.wait(transfer), plan.send_index, plan.send_keep)
            self.returned[layer] = stale
        else:
            self.returned[layer] = _Returned(transfer, plan.send_index, plan.send_keep)
        return stale

    def add_returned_gradients(self, sent: _Returned, layer: int, grad_x: Tensor) -> None:
        rows = sent.rows if isinstance(sent.rows, Tensor) else self.exchange.wait(sent.rows)
        smoother = self._smoother(self.gradient_avg, layer, self.grad_smooth, sent.send_keep)
        scatter_add_rows(grad_x, sent.send_index, smoother(rows, sent.send_keep))

    # -- state ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Wait for every transfer in flight (their rows stay for the next epoch)."""
        for layer, sent in self.features.items():
            if isinstance(sent, Transfer):
                self.features[layer] = self.exchange.wait(sent)
        for sent in self.returned.values():
            if isinstance(sent.rows, Transfer):
                sent.rows = self.exchange.wait(sent.rows)

    def state_dict(self) -> dict[str, Tensor]:
        """The buffers the next epoch needs, flat ``name.layer`` keys (drains first)."""
        self.drain()
        state = {f"features.{layer}": rows for layer, rows in self.features.items()}
        for layer, sent in self.returned.items():
            state[f"gradients.{layer}"] = sent.rows
            state[f"gradient_index.{layer}"] = sent.send_index
            state[f"gradient_keep.{layer}"] = sent.send_keep
        smoothers = {"feature_avg": self.feature_avg, "gradient_avg": self.gradient_avg}
        for name, per_layer in smoothers.items():
            for layer, smoother in per_layer.items():
                for key, value in smoother.state().items():
                    state[f"{name}_{key}.{layer}"] = value
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.exchange.full_plan.send_index.device
        by_layer: dict[str, dict[int, Tensor]] = {}
        for key, value in state.items():
            name, layer = key.rsplit(".", 1)
            by_layer.setdefault(name, {})[int(layer)] = value.to(device)
        self.features = dict(by_layer.get("features", {}))
        self.returned = {
            layer: _Returned(
                rows, by_layer["gradient_index"][layer], by_layer["gradient_keep"][layer]
            )
            for layer, rows in by_layer.get("gradients", {}).items()
        }
        for name, gamma, smoothers in (
            ("feature_avg", self.feat_smooth, self.feature_avg),
            ("gradient_avg", self.grad_smooth, self.gradient_avg),
        ):
            smoothers.clear()
            for layer, avg in by_layer.get(f"{name}_avg", {}).items():
                smoother = Smoother(gamma, avg.size(0))
                smoother.load({"avg": avg, "count": by_layer[f"{name}_count"][layer]})
                smoothers[layer] = smoother

    @staticmethod
    def _smoother(smoothers: dict[int, Smoother], layer: int, gamma: float, keep: Tensor):
        if layer not in smoothers:
            smoothers[layer] = Smoother(gamma, keep.numel())
        return smoothers[layer]
