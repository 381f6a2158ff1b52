"""The layer-hook interface: where islandization and compression modules plug into training.

A hook overrides any of these points; each default leaves training unchanged:

- graph: ``on_graph(part) -> part``, once at load (node reordering, islands). It may permute
  the inner nodes only (remapping ``send_ids``' values); peers and halo order stay.
- inner aggregation: ``inner_operator(kind, default)`` may hand the local graph a
  replacement for ``default``, its operator of the fixed inner block ``A_inner`` of
  aggregation ``kind`` (``"gcn"`` or ``"mean"``; a CSR product, ``default.block``, GCN's with
  its self-loop term as the diagonal): an :class:`InnerOperator` with the product and its
  transpose (GCN's self-loop term included or not). The halo block stays on its path, so BNS
  and the pipeline are untouched.
- messages: ``on_send(message, rows) -> payload`` and ``on_receive(message, payload) ->
  rows`` around every halo transfer; :class:`Message` names the layer, the direction
  (``"forward"``: features, ``"backward"``: feature gradients), the global ids of the rows
  and the rows per peer. A payload keeps the row count of ``rows`` (any width or dtype, e.g.
  packed bytes per row), or is a :class:`BytePayload`: one byte buffer split by peer, for
  rows coded differently per peer.
- weights: ``on_model(model)``, once after the model is built (and before its replicas are
  synchronised), e.g. to register ``torch.nn.utils.parametrize`` parametrizations on conv
  weights; every rank applies the same, so the gradient all-reduce is unchanged.
- loss: ``loss_term() -> Tensor | None``, a regulariser added once to the global training
  loss (each rank adds 1/K of it: the weights are replicated, so every rank computes the same).
- per epoch: ``on_epoch(context)`` before each training step (``training=True``) and each
  evaluation (``training=False``); ``epoch_times()`` the seconds this rank spent in the hook
  since the last call (per-epoch keys, the slowest rank's).
- ``deployed() -> bool``: whether evaluations now score the weights in the form training
  ends with (model selection counts only those: a k-means run's best epoch is a shared one).
- ``report() -> dict``: what the hook did; the final metrics line gathers the reports of
  every hook as ``"hooks": {name: report}`` (rank 0's; reports must agree across ranks or
  say whose they are).

Message hooks run in registration order on send and in reverse order on receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from bns_pipe.partition import Partition


@dataclass(frozen=True)
class EpochContext:
    """The step about to run: ``epoch`` (0-based), whether it trains or evaluates, the
    run's ``--seed`` (for keyed random streams) and its ``--epochs``."""

    epoch: int
    training: bool
    seed: int = 0
    epochs: int = 0


@dataclass(frozen=True)
class Message:
    """One halo transfer as a message hook sees it: ``layer``, ``direction``, where its
    rows' global ids come from (``id_table[index]``: ``index`` int64 positions or a bool
    mask; no table when the exchange was built without ids) and the rows this rank sends to
    (``send_rows[j]``) and receives from (``recv_rows[j]``) each peer j in this transfer (rows
    are grouped by peer in rank order)."""

    layer: int
    direction: str
    id_table: Tensor | None = None
    index: Tensor | None = None
    send_rows: tuple[int, ...] = ()
    recv_rows: tuple[int, ...] = ()

    @property
    def global_ids(self) -> Tensor:
        """The global node id of every row of the transfer, (rows,) int64."""
        if self.id_table is None or self.index is None:
            raise ValueError("this halo exchange was built without global ids")
        return self.id_table[self.index]


@dataclass
class BytePayload:
    """A payload as one flat byte buffer: ``data`` (sum(send_bytes),) uint8 in peer order,
    ``send_bytes[j]`` / ``recv_bytes[j]`` the bytes going to / coming from peer j (both sides
    must agree), ``plan`` what the receiving hook needs to decode it (kept with the transfer,
    never sent). On receive (:meth:`arriving`), ``data`` holds the received bytes."""

    data: Tensor
    send_bytes: list[int]
    recv_bytes: list[int]
    plan: object = None

    def arriving(self) -> BytePayload:
        """The empty receive side of this payload: a buffer of sum(recv_bytes) bytes."""
        data = self.data.new_empty(sum(self.recv_bytes))
        return BytePayload(data, self.send_bytes, self.recv_bytes, self.plan)


class InnerOperator(Protocol):
    """A replacement for ``A_inner`` (n_inner, n_inner): ``A x`` and ``Aᵀ g``. An operator
    of the ``"gcn"`` kind with a true attribute ``self_loops`` (read after its first product)
    includes the self-loop term diag(1 / (d_i + 1)) in both, and the graph does not add it."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def transposed(self, g: Tensor) -> Tensor: ...


class LayerHook:
    """Base class: every point is the identity; ``name`` is the registry name;
    ``at_inference``: the hook changes inference beyond the weights a checkpoint saves, so
    evaluating a checkpoint runs it again (with its saved state)."""

    name = ""
    at_inference = False

    def on_graph(self, part: Partition) -> Partition:
        return part

    def inner_operator(self, kind: str, default: InnerOperator) -> InnerOperator | None:
        return None

    def on_model(self, model: nn.Module) -> None:
        return None

    def on_epoch(self, context: EpochContext) -> None:
        return None

    def loss_term(self) -> Tensor | None:
        return None

    def on_send(self, message: Message, rows: Tensor) -> Tensor | BytePayload:
        return rows

    def on_receive(self, message: Message, payload: Tensor | BytePayload) -> Tensor | BytePayload:
        return payload

    def epoch_times(self) -> dict[str, float]:
        return {}

    def deployed(self) -> bool:
        return True

    def report(self) -> dict:
        return {}
