"""The communication byte counter: a message hook registered last by the trainer."""

from __future__ import annotations

from torch import Tensor

from bns_pipe.hooks.base import BytePayload, LayerHook, Message


class ByteCounter(LayerHook):
    """Counts the bytes this rank sends in halo transfers, per direction.

    Registered last, so it counts the payload as it travels (after any compression).
    """

    name = "byte-counter"

    def __init__(self) -> None:
        self.sent = {"forward": 0, "backward": 0}

    def on_send(self, message: Message, rows: Tensor | BytePayload) -> Tensor | BytePayload:
        data = rows.data if isinstance(rows, BytePayload) else rows
        self.sent[message.direction] += data.numel() * data.element_size()
        return rows

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent = dict.fromkeys(self.sent, 0)
