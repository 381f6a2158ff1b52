"""Where bns_pipe reads data and writes caches."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "BNS_PIPE_DATA"
CACHE_ENV = "BNS_PIPE_CACHE"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset root: ``root`` if given, else ``$BNS_PIPE_DATA``, else ``./data``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(DATA_ENV) or "data")


def cache_dir(*parts: str) -> Path:
    """A writable cache folder: ``$BNS_PIPE_CACHE``, else ``~/.cache/bns_pipe``, plus ``parts``."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bns_pipe")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
