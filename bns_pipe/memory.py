"""Keep large freed CPU blocks in the process, so each epoch's tensors reuse mapped pages.

glibc serves an allocation above 32 MiB (at most) with a fresh ``mmap`` and unmaps it on
free, and smaller ones land in holes that PyTorch's 64-byte-aligned requests often do not
fit, so a 100k x 128 float32 activation costs ~12,500 page faults every time it is made: on
a 2-core Xeon ``x * 0.5`` takes 33 ms with a new output against 6 ms into an existing one,
and one epoch of a 3-layer GCN on 100k nodes 0.85 s against 0.40 s with this cache. The
machine floor has no such term.

:func:`keep_freed_memory` installs the C++ extension's caching CPU allocator
(``csrc/cpu_cache.cpp``): blocks of 1 MiB and more are kept when freed and handed out again
to requests of up to 1.25x less, best fit first; the cache holds at most ``max_cached_bytes``
of free blocks (default: a quarter of the machine's memory), releasing its largest beyond
that. The process's resident memory therefore stays near its high-water mark. Without the
extension, or with ``BNS_PIPE_CPU_CACHE=0``, the allocator stays PyTorch's.
"""

from __future__ import annotations

import os

from bns_pipe import _ext

__all__ = ["cache_stats", "keep_freed_memory"]


def _default_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf: 2 GiB
        return 2 << 30


def keep_freed_memory(max_cached_bytes: int | None = None) -> bool:
    """Make the caching allocator the process's CPU allocator (idempotent; a later call
    sets the limit); True when it is in use."""
    limit = _default_limit() if max_cached_bytes is None else max_cached_bytes
    if limit < 0:
        raise ValueError(f"max_cached_bytes must be >= 0, got {limit}")
    if os.environ.get("BNS_PIPE_CPU_CACHE") == "0" or not _ext.available():
        return False
    _ext.ops().cpu_cache_enable(limit)
    return True


def cache_stats() -> dict[str, int]:
    """The cache's counters (zeros until :func:`keep_freed_memory` took)."""
    if not _ext.available():
        return {"cached_bytes": 0, "hits": 0, "misses": 0, "released": 0}
    cached, hits, misses, released = _ext.ops().cpu_cache_stats()
    return {"cached_bytes": cached, "hits": hits, "misses": misses, "released": released}
