"""Process-group set-up for torchrun workers (and a one-process group otherwise).

Restarts need a fresh store: gloo publishes each rank's address there, and a restarted group
that reads the dead attempt's addresses fails ("connectFullMesh failed ... Connection
refused"). ``bns-pipe train`` makes torch's agent open a new store every rendezvous round
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, the same on every node). Under plain ``torchrun``
the agent shares one store across restarts, so the workers join under
``bns_pipe/attempt_<TORCHELASTIC_RESTART_COUNT>``: consistent on one node, where every worker
restarts together (several nodes: set that variable, as the launch scripts do).
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bns_pipe.errors import BnsPipeError, ConfigError


class PeerError(BnsPipeError):
    """Communication with the other ranks failed: a peer died, hung or never arrived."""


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


def restart_count() -> int:
    """How often the elastic agent has restarted the group (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


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
    rank, world, local_rank, local_world = world_from_env()
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("--backend nccl needs --device cuda")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=timeout_s)
    try:
        if not dist.is_initialized():
            store = _store(rank, world, timeout)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
        halo_group = dist.new_group(backend=backend, timeout=timeout)
    except Exception as exc:
        raise as_peer_error(exc, rank, timeout_s, "joining the process group") from None
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        device=dev,
        halo_group=halo_group,
        reduce_group=dist.group.WORLD,
    )


def _store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store torchrun points at (``MASTER_ADDR``; the agent's own, kept
    across restarts, in this attempt's key space); an in-memory store without torchrun."""
    if "MASTER_ADDR" not in os.environ:
        return dist.HashStore()
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # kept across restarts
        return dist.PrefixStore(f"bns_pipe/attempt_{restart_count()}", store)
    return store


# What gloo, NCCL and the store say when a peer is gone or silent.
_PEER_MARKERS = ("connection", "timed out", "timeout", "gloo", "nccl", "broken pipe", "socket")


def as_peer_error(exc: BaseException, rank: int, timeout_s: float, during: str) -> BaseException:
    """``exc`` as a one-line :class:`PeerError` when it is a communication failure, else
    ``exc`` itself (a programming error keeps its traceback)."""
    text = str(exc)
    lowered = text.lower()
    if not isinstance(exc, dist.DistError) and not (
        isinstance(exc, RuntimeError) and any(m in lowered for m in _PEER_MARKERS)
    ):
        return exc
    if "timed out" in lowered or "timeout" in lowered:
        what = (
            f"a peer did not answer within --timeout {timeout_s:g} s (hung, stopped or not started)"
        )
    else:
        what = "a peer closed the connection (it probably died; see its error above)"
    detail = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text.strip().split("\n")[0])
    detail = detail.split(". ")[0]  # gloo appends advice to its first sentence
    detail = (detail[:157] + "...") if len(detail) > 160 else detail or type(exc).__name__
    if restart_count() < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
        then = "the launcher restarts every rank from the newest complete checkpoint"
    else:
        then = (
            "resume with --resume --checkpoint-dir DIR, or train with --max-restarts N to "
            "restart automatically"
        )
    return PeerError(f"rank {rank}: communication failed while {during}: {what}; {then} [{detail}]")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SigtermFlag:
    """Remembers a SIGTERM (preemption) so the loop can checkpoint at the epoch's end."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
