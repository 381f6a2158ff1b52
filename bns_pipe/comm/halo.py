"""Halo exchange: each rank sends the boundary rows its peers need, in one all-to-all.

Forward, rank i packs ``x[send_ids[j]]`` for every peer j into one buffer; after
``all_to_all_single`` the received buffer is exactly its halo block (grouped by owner in
rank order). Backward reverses the call: halo gradients go back to their owners, who add
them into the rows they sent.

Layers talk to an exchange through four calls (the *transport* protocol, which
:class:`~bns_pipe.comm.pipeline.HaloPipeline` implements too): ``send_features`` then
``halo_features`` in the forward pass, ``send_gradients`` then ``add_returned_gradients`` in
the backward pass; the computation between each pair overlaps the transfer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from bns_pipe.hooks import BytePayload, LayerHook, Message
from bns_pipe.sampling import EpochSample, full_sample, pack_rows, scatter_add_rows


@dataclass
class Transfer:
    """An all-to-all in flight; :meth:`HaloExchange.wait` returns the received rows.

    ``started`` and ``done_at`` (set by the completion callback) are ``perf_counter`` times.
    """

    work: dist.Work | None
    received: torch.Tensor | BytePayload
    message: Message  # what the received rows are, for the hooks' on_receive
    started: float = field(default_factory=time.perf_counter)
    done_at: float | None = None


class HaloExchange:
    """The per-rank plan of halo transfers: send lists in, halo counts out.

    ``send_ids``: K tensors of local inner indices (``send_ids[j]`` for peer j);
    ``halo_counts`` (K,): halo rows received from each peer; ``global_ids``: the global ids
    of the inner and the halo nodes (for the hooks' messages). Time accounting over all
    transfers: ``wait_s`` is the time spent blocked on them (exposed communication),
    ``hidden_s`` the time they were in flight while this rank computed.
    """

    def __init__(
        self,
        send_ids: Sequence[torch.Tensor],
        halo_counts: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        hooks: Sequence[LayerHook] = (),
        global_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.full_plan = full_sample(send_ids, halo_counts)
        self.inner_ids, self.halo_ids = global_ids if global_ids is not None else (None, None)
        self.use_plan(None)
        self.group = group
        self.hooks = list(hooks)
        self.wait_s = self.hidden_s = 0.0

    def use_plan(self, plan: EpochSample | None) -> None:
        """Exchange only the rows of ``plan`` (a boundary sample) until the next call;
        ``None`` restores the full plan."""
        self.plan = self.full_plan if plan is None else plan

    def to(self, device: torch.device) -> HaloExchange:
        self.full_plan = self.full_plan.to(device)
        if self.inner_ids is not None:
            self.inner_ids, self.halo_ids = self.inner_ids.to(device), self.halo_ids.to(device)
        self.use_plan(None)
        return self

    # -- transfers ------------------------------------------------------------------------

    def start_forward(
        self, x: torch.Tensor, layer: int, plan: EpochSample | None = None
    ) -> Transfer:
        """Send this rank's boundary rows of ``x`` (n_inner, F) under ``plan`` (default: the
        plan in use); the transfer receives the plan's halo rows (n_kept_halo, F)."""
        plan = self.plan if plan is None else plan
        rows = pack_rows(x, plan.send_index)
        sent = Message(layer, "forward", self.inner_ids, plan.send_index)
        received = Message(layer, "forward", self.halo_ids, plan.halo_keep)
        return self._start(rows, plan.recv_splits, plan.send_splits, sent, received)

    def start_backward(
        self, grad_halo: torch.Tensor, layer: int, plan: EpochSample | None = None
    ) -> Transfer:
        """Return halo gradients (n_kept_halo, F) to their owners; the transfer receives
        (len(plan.send_index), F) rows, in send order."""
        plan = self.plan if plan is None else plan
        sent = Message(layer, "backward", self.halo_ids, plan.halo_keep)
        received = Message(layer, "backward", self.inner_ids, plan.send_index)
        return self._start(grad_halo, plan.send_splits, plan.recv_splits, sent, received)

    def wait(self, transfer: Transfer) -> torch.Tensor:
        """Block until ``transfer`` is done and return its rows (decoded by the hooks)."""
        start = time.perf_counter()
        if transfer.work is not None:
            transfer.work.wait()
            self.wait_s += time.perf_counter() - start
            done = transfer.done_at if transfer.done_at is not None else start
            self.hidden_s += max(0.0, min(done, start) - transfer.started)
        rows = transfer.received
        for hook in reversed(self.hooks):
            rows = hook.on_receive(transfer.message, rows)
        return rows

    # -- the transport protocol (synchronous within a layer) ------------------------------

    def send_features(self, x: torch.Tensor, layer: int) -> Transfer:
        return self.start_forward(x, layer)

    def halo_features(self, sent: Transfer, layer: int) -> torch.Tensor:
        """The halo rows the layer aggregates this time: (n_kept_halo, F)."""
        return self.wait(sent)

    def send_gradients(self, grad_halo: torch.Tensor, layer: int) -> Transfer:
        return self.start_backward(grad_halo, layer)

    def add_returned_gradients(self, sent: Transfer, layer: int, grad_x: torch.Tensor) -> None:
        """Add the gradients peers returned for this rank's sent rows into ``grad_x``."""
        scatter_add_rows(grad_x, self.plan.send_index, self.wait(sent))

    def _start(
        self,
        rows: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        sent: Message,
        arriving: Message,
    ) -> Transfer:
        sizes = {"send_rows": tuple(in_splits), "recv_rows": tuple(out_splits)}
        sent, arriving = replace(sent, **sizes), replace(arriving, **sizes)
        payload = rows.contiguous()
        for hook in self.hooks:
            payload = hook.on_send(sent, payload)
        if isinstance(payload, BytePayload):  # one byte buffer, split by peer
            received = payload.arriving()
            buffers = received.data, payload.data.contiguous()
            out_splits, in_splits = payload.recv_bytes, payload.send_bytes
        else:
            payload = payload.contiguous()
            received = payload.new_empty((sum(out_splits), *payload.shape[1:]))
            buffers = received, payload
        if len(out_splits) == 1:  # one rank: nothing travels
            return Transfer(None, received, arriving)
        work = dist.all_to_all_single(*buffers, out_splits, in_splits, self.group, async_op=True)
        transfer = Transfer(work, received, arriving)
        work.get_future().add_done_callback(lambda _: _mark_done(transfer))
        return transfer


def _mark_done(transfer: Transfer) -> None:
    transfer.done_at = time.perf_counter()
