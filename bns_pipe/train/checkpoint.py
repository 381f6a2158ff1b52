"""Checkpoints: ``<dir>/epoch_<N>/`` with ``model.pt`` (rank 0) and ``rank_<k>.pt`` per rank.

``model.pt`` holds the model, the optimiser and the loop state; it does not depend on the
number of ranks, so ``bns-pipe eval`` can load it on any world size. Each rank's shard holds
its own state (RNG, and with ``--pipeline`` the stale halo buffers). All ranks write into a
temporary directory; after a barrier rank 0 renames it, so a checkpoint exists whole or not at
all. Files hold
tensors and plain values only and are read with ``torch.load(weights_only=True)``. The
directory must be shared by all ranks (for multi-node runs: a shared filesystem).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from bns_pipe.errors import BnsPipeError
from bns_pipe.train.distributed import DistContext

PREFIX = "epoch_"


def save(
    directory: str | Path,
    ctx: DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: dict,
    rank_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of the epoch ``state["epoch"]`` (every rank calls this);
    ``rank_state`` goes into this rank's shard."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{state['epoch']:06d}"
    tmp = directory / f".{final.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=ctx.reduce_group)
    shard = {
        "rng_cpu": torch.get_rng_state(),
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "rank_state": rank_state or {},
    }
    torch.save(shard, tmp / f"rank_{ctx.rank}.pt")
    if ctx.is_main:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
                "config": config,
            },
            tmp / "model.pt",
        )
    dist.barrier(group=ctx.reduce_group)
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier(group=ctx.reduce_group)
    return final


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "model.pt").is_file())
    return done[-1] if done else None


def read_model_file(path: str | Path) -> dict:
    """Load ``model.pt`` (a checkpoint directory or the file itself) without unpickling code."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise BnsPipeError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:
        raise BnsPipeError(
            f"checkpoint {path} is corrupt or not a bns_pipe checkpoint: {exc}"
        ) from exc


def load_latest(
    directory: str | Path,
    ctx: DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Restore the newest checkpoint into ``model`` and ``optimizer``; return the loop state
    and this rank's ``rank_state``, or None without a checkpoint."""
    path = latest(directory)
    if path is None:
        return None
    blob = read_model_file(path)
    shard_path = path / f"rank_{ctx.rank}.pt"
    try:
        shard = torch.load(shard_path, weights_only=True)
    except Exception as exc:
        raise BnsPipeError(f"checkpoint shard {shard_path} is missing or corrupt: {exc}") from exc
    if shard["world_size"] != ctx.world_size:
        raise BnsPipeError(
            f"checkpoint {path} was written by {shard['world_size']} ranks, this run has "
            f"{ctx.world_size}; resume needs the same world size"
        )
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(shard["rng_cpu"])
    return blob["state"], shard.get("rank_state", {})
