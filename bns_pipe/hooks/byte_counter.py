"""The communication byte counter: a message hook registered last by the trainer."""

from __future__ import annotations

from torch import Tensor

from bns_pipe.hooks.base import LayerHook, Message


class ByteCounter(LayerHook):
    """Counts the bytes this rank sends in halo transfers, per direction.

    Registered last, so it counts the payload as it travels (after any compression).
    """

    name = "byte-counter"

    def __init__(self) -> None:
        self.sent = {"forward": 0, "backward": 0}

    def on_send(self, message: Message, rows: Tensor) -> Tensor:
        self.sent[message.direction] += rows.numel() * rows.element_size()
        return rows

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent = dict.fromkeys(self.sent, 0)
