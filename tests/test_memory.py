"""Large freed CPU blocks stay in the process (bns_pipe.memory), so epochs reuse mapped pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bns_pipe import _ext
from bns_pipe.memory import keep_freed_memory

needs_ext = pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")

# A fresh process: an epoch-like pattern, a 51 MB activation computed again and again from
# one input; after two warm-up rounds, count the page faults of three more.
PROBE = """
import json, resource, torch
from bns_pipe.memory import cache_stats, keep_freed_memory
took = keep_freed_memory()
x = torch.randn(100_000, 128)
for _ in range(2):
    x * 0.5
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x * 0.5
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults, **cache_stats()}))
"""


# Three 2 MiB blocks freed together under a 3 MiB limit: the cache keeps one.
LIMITED = """
import json, torch
from bns_pipe.memory import cache_stats, keep_freed_memory
keep_freed_memory(3 << 20)
blocks = [torch.empty(1 << 19) for _ in range(3)]
del blocks
print(json.dumps(cache_stats()))
"""


def probe(**env: str) -> dict:
    return probe_code(PROBE, **env)


def probe_code(code: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_freed_memory_is_reused_without_page_faults():
    kept = probe()
    system = probe(BNS_PIPE_CPU_CACHE="0")
    assert kept["took"] and not system["took"]
    pages = 3 * 100_000 * 128 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert system["faults"] > pages / 2  # glibc maps fresh pages each time
    assert kept["faults"] < pages / 20  # the cache hands the same block back
    assert kept["hits"] >= 3 and kept["cached_bytes"] == 100_000 * 128 * 4
    assert system["hits"] == 0


@needs_ext
def test_cache_limit_releases_the_largest_blocks():
    limited = probe_code(LIMITED)
    assert limited["released"] >= 2 and limited["cached_bytes"] <= 3 << 20


def test_bad_limit():
    with pytest.raises(ValueError, match="max_cached_bytes"):
        keep_freed_memory(-1)
