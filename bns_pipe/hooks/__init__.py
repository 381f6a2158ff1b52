"""Layer hooks: where islandization and compression modules plug into the training step.

A hook overrides any of these methods; each default returns its input unchanged (weight
hooks for quantisation and weight sharing will join them with the compression modules):

- ``on_graph(part) -> part``: once at load time (node reordering, islandization).
- ``on_send(layer, direction, rows) -> payload`` and ``on_receive(layer, direction,
  payload) -> rows``: around every halo transfer; ``direction`` is ``"forward"`` (features)
  or ``"backward"`` (feature gradients). A payload must keep the row count of ``rows``.

Hooks run in registration order on send and in reverse order on receive. Register classes by
name in :data:`HOOKS`; the CLI builds them from ``--hook NAME[:key=value,...]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bns_pipe.errors import ConfigError

if TYPE_CHECKING:
    from bns_pipe.partition import Partition


class LayerHook:
    """Base class: every method is the identity."""

    def on_graph(self, part: Partition) -> Partition:
        return part

    def on_send(self, layer: int, direction: str, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def on_receive(self, layer: int, direction: str, payload: torch.Tensor) -> torch.Tensor:
        return payload


class ByteCounter(LayerHook):
    """Counts the bytes this rank sends in halo transfers, per direction.

    Registered last, so it counts the payload as it travels (after any compression).
    """

    def __init__(self) -> None:
        self.sent = {"forward": 0, "backward": 0}

    def on_send(self, layer: int, direction: str, rows: torch.Tensor) -> torch.Tensor:
        self.sent[direction] += rows.numel() * rows.element_size()
        return rows

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent = dict.fromkeys(self.sent, 0)


HOOKS: dict[str, type[LayerHook]] = {"byte-counter": ByteCounter}


def build_hook(spec: str) -> LayerHook:
    """Make a hook from ``NAME[:key=value,...]`` (values are passed as strings)."""
    name, _, options = spec.partition(":")
    if name not in HOOKS:
        raise ConfigError(f"unknown hook {name!r}; registered hooks: {', '.join(sorted(HOOKS))}")
    kwargs = dict(item.split("=", 1) for item in options.split(",") if item)
    try:
        return HOOKS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for hook {name!r}: {exc}") from exc
