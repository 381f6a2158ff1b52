"""Process-group set-up for torchrun workers (and a one-process group otherwise)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bns_pipe.errors import ConfigError


@dataclass
class DistContext:
    """Who this process is and the groups it talks on.

    ``halo_group`` carries halo transfers and ``reduce_group`` gradient and metric
    reductions, so the two never queue behind each other.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    halo_group: dist.ProcessGroup
    reduce_group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's variables."""
    get = os.environ.get
    return (
        int(get("RANK", 0)),
        int(get("WORLD_SIZE", 1)),
        int(get("LOCAL_RANK", 0)),
        int(get("LOCAL_WORLD_SIZE", 1)),
    )


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    backend: str = "auto",
    device: str = "auto",
    threads_per_rank: int | None = None,
    timeout_s: float = 300.0,
) -> DistContext:
    """Join the process group torchrun set up (or make a one-rank group) and pick the device."""
    _, _, local_rank, local_world = world_from_env()
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("--backend nccl needs --device cuda")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    halo_group = dist.new_group(backend=backend, timeout=timeout)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        device=dev,
        halo_group=halo_group,
        reduce_group=dist.group.WORLD,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
