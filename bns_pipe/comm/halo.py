"""Halo exchange: each rank sends the boundary rows its peers need, in one all-to-all.

Forward, rank i packs ``x[send_ids[j]]`` for every peer j into one buffer; after
``all_to_all_single`` the received buffer is exactly its halo block (grouped by owner in
rank order). Backward reverses the call: halo gradients go back to their owners, who add
them into the rows they sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bns_pipe.hooks import LayerHook


@dataclass
class Transfer:
    """An all-to-all in flight; ``wait`` returns the received rows."""

    work: dist.Work | None
    received: torch.Tensor
    layer: int
    direction: str


class HaloExchange:
    """The per-rank plan of halo transfers: send lists in, halo counts out.

    ``send_ids``: K tensors of local inner indices (``send_ids[j]`` for peer j);
    ``halo_counts`` (K,): halo rows received from each peer. ``wait_s`` accumulates the
    time spent blocked on transfers (exposed communication).
    """

    def __init__(
        self,
        send_ids: Sequence[torch.Tensor],
        halo_counts: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        hooks: Sequence[LayerHook] = (),
    ) -> None:
        self.full_plan = (
            torch.cat(list(send_ids)),
            [int(s.numel()) for s in send_ids],
            [int(c) for c in halo_counts],
        )
        self.use_plan(*self.full_plan)
        self.group = group
        self.hooks = list(hooks)
        self.wait_s = 0.0

    def use_plan(self, send_index: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        """Exchange only these rows (a boundary sample) until the next call; ``send_index``
        holds the local rows to send, concatenated over peers in rank order."""
        self.send_index, self.send_splits, self.recv_splits = send_index, send_splits, recv_splits
        self.n_halo = sum(recv_splits)

    def to(self, device: torch.device) -> HaloExchange:
        index, send_splits, recv_splits = self.full_plan
        self.full_plan = (index.to(device), send_splits, recv_splits)
        self.use_plan(*self.full_plan)
        return self

    def start_forward(self, x: torch.Tensor, layer: int) -> Transfer:
        """Send this rank's boundary rows of ``x`` (n_inner, F); receive the halo rows."""
        rows = x.index_select(0, self.send_index)
        return self._start(rows, self.n_halo, self.recv_splits, self.send_splits, layer, "forward")

    def start_backward(self, grad_halo: torch.Tensor, layer: int) -> Transfer:
        """Return halo gradients (n_halo, F) to their owners; receive (len(send_index), F)."""
        n_back = self.send_index.numel()
        return self._start(grad_halo, n_back, self.send_splits, self.recv_splits, layer, "backward")

    def wait(self, transfer: Transfer) -> torch.Tensor:
        """Block until ``transfer`` is done and return its rows (decoded by the hooks)."""
        start = time.perf_counter()
        if transfer.work is not None:
            transfer.work.wait()
        self.wait_s += time.perf_counter() - start
        rows = transfer.received
        for hook in reversed(self.hooks):
            rows = hook.on_receive(transfer.layer, transfer.direction, rows)
        return rows

    def _start(
        self,
        rows: torch.Tensor,
        n_out: int,
        out_splits: list[int],
        in_splits: list[int],
        layer: int,
        direction: str,
    ) -> Transfer:
        payload = rows.contiguous()
        for hook in self.hooks:
            payload = hook.on_send(layer, direction, payload)
        received = payload.new_empty((n_out, *payload.shape[1:]))
        if len(out_splits) == 1:  # one rank: nothing travels
            return Transfer(None, received, layer, direction)
        work = dist.all_to_all_single(
            received, payload, out_splits, in_splits, group=self.group, async_op=True
        )
        return Transfer(work, received, layer, direction)
