"""Run a function on several CPU ranks (gloo) from a test, with a hard timeout."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    fn(rank, world, *args)


def run_ranks(fn: Callable, world: int, *args, timeout: float = 120.0) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes; fail on error or timeout.

    The environment is what torchrun sets, so the product's ``init_distributed`` works as is.
    """
    context = mp.start_processes(
        _entry,
        args=(world, free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
