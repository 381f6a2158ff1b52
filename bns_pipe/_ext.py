"""The compiled ops of ``csrc/`` (module ``bns_pipe._C``), loaded once.

Every op has a pure-PyTorch fallback next to its caller; :func:`available` decides which
one runs. ``BNS_PIPE_NO_EXT=1`` forces the fallback.
"""

from __future__ import annotations

import importlib
import os
from functools import cache

import torch


@cache
def _load() -> str | None:
    """Import the extension; return None on success, else the reason it is not used."""
    if os.environ.get("BNS_PIPE_NO_EXT") == "1":
        return "disabled by BNS_PIPE_NO_EXT=1"
    try:
        importlib.import_module("bns_pipe._C")
    except ImportError as exc:
        return f"not built ({exc})"
    return None


def available() -> bool:
    """True when the C++ ops are loaded and allowed."""
    return _load() is None


def ops():
    """The op namespace ``torch.ops.bns_pipe`` (only valid when :func:`available`)."""
    return torch.ops.bns_pipe


def describe() -> str:
    """One line naming the path in use, for logs."""
    reason = _load()
    if reason is None:
        return "graph ops: C++ extension bns_pipe._C"
    return f"graph ops: pure-PyTorch fallback (extension {reason})"
