"""Layer hooks (:mod:`bns_pipe.hooks.base` defines the interface), one module per hook,
registered by name in :data:`HOOKS`; ``--hook NAME[:key=value,...]`` builds one.

Specs are checked by :func:`validate_specs` when the training options are validated, so a bad
``--hook`` fails before any worker starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from bns_pipe.errors import ConfigError
from bns_pipe.hooks.base import BytePayload, EpochContext, InnerOperator, LayerHook, Message
from bns_pipe.hooks.byte_counter import ByteCounter
from bns_pipe.hooks.int_weights import IntHook
from bns_pipe.hooks.island import IslandHook
from bns_pipe.hooks.kmeans import KMeansHook
from bns_pipe.hooks.ldp import LDPHook
from bns_pipe.hooks.quant import QuantHook
from bns_pipe.hooks.smartexchange import SmartExchangeHook
from bns_pipe.spec import build_from_spec

__all__ = [
    "HOOKS",
    "ByteCounter",
    "BytePayload",
    "EpochContext",
    "InnerOperator",
    "LayerHook",
    "Message",
    "build_hook",
    "validate_specs",
]

HOOKS: dict[str, type[LayerHook]] = {
    hook.name: hook
    for hook in (
        ByteCounter,
        QuantHook,
        KMeansHook,
        LDPHook,
        SmartExchangeHook,
        IntHook,
        IslandHook,
    )
}


def build_hook(spec: str) -> LayerHook:
    """Make a hook from ``NAME[:key=value,...]`` (values are passed as strings)."""
    return build_from_spec(spec, HOOKS, "hook")


def validate_specs(specs: Sequence[str]) -> None:
    """Build every hook of ``specs`` once, raising :class:`ConfigError` on the first bad one;
    a hook named twice is an error too."""
    names = [build_hook(spec).name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"hook(s) given more than once: {repeated}")
