"""Checkpoints: ``<dir>/epoch_<N>/`` with ``model.pt`` (rank 0), ``rank_<k>.pt`` per rank
and ``checkpoint.json``, the completion record; and ``<dir>/best/model.pt``, the model of the
best validation score so far (:func:`save_best`; for deploying, not resuming).

``model.pt`` holds the model, the optimiser and the loop state; it does not depend on the
number of ranks, so ``bns-pipe eval`` can load it on any world size. Each rank's shard holds
its own state (RNG, and with ``--pipeline`` the stale halo buffers). Files hold tensors and
plain values only and are read with ``torch.load(weights_only=True)``. The directory must be
shared by all ranks (for multi-node runs: a shared filesystem).

A checkpoint survives faults:

- every rank writes into ``.epoch_<N>.tmp/`` and fsyncs its file; rank 0 then writes
  ``checkpoint.json`` (epoch, world size, and every file's size and SHA-256), fsyncs it and
  renames the directory into place, so a process killed mid-write leaves only the temporary
  directory, which later writes replace and readers never look at;
- a write that fails on any rank (disk full, file-size limit) removes the temporary directory
  and raises :class:`CheckpointError` on every rank; the previous checkpoints are untouched;
- :func:`newest_complete` skips, with a warning naming it, a checkpoint whose record is missing
  or whose files do not match it, and falls back to the previous complete one;
- after each write only the newest ``keep`` intact checkpoints up to it are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bns_pipe import compress
from bns_pipe.errors import BnsPipeError, unreadable
from bns_pipe.hooks.weights import hook_tensors, load_plain_state_dict, plain_state_dict
from bns_pipe.train.distributed import DistContext

PREFIX = "epoch_"
RECORD = "checkpoint.json"
MODEL = "model.pt"
BEST = "best"
ENTRY = 33  # a file in the write table: its size, then the 32 bytes of its SHA-256


class CheckpointError(BnsPipeError):
    """A checkpoint cannot be written or read."""


def shard_name(rank: int) -> str:
    return f"rank_{rank}.pt"


def epoch_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def save(
    directory: str | Path,
    ctx: DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: dict,
    rank_state: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of the epoch ``state["epoch"]`` (every rank calls this);
    ``rank_state`` goes into this rank's shard; ``keep`` (0: all) checkpoints stay."""
    directory = Path(directory)
    final = directory / f"{PREFIX}{state['epoch']:06d}"
    tmp = directory / f".{final.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=ctx.reduce_group)
    files = {
        shard_name(ctx.rank): {
            "rng_cpu": torch.get_rng_state(),
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "rank_state": rank_state or {},
        }
    }
    if ctx.is_main:
        plain, hook_state = plain_state_dict(model)
        files[MODEL] = {
            "model": plain,
            "hook_state": hook_state,
            "optimizer": optimizer.state_dict(),
            "state": state,
            "config": config,
        }
    # per rank: error (errno, -1 without one; 0: none), then (size, 32 digest bytes) of its
    # shard and of model.pt
    table = torch.zeros(ctx.world_size, 1 + 2 * ENTRY, dtype=torch.int64)
    error = None
    try:
        for slot, (name, blob) in enumerate(files.items()):
            size, digest = _write(tmp / name, blob)
            at = 1 + ENTRY * slot
            table[ctx.rank, at] = size
            table[ctx.rank, at + 1 : at + ENTRY] = torch.tensor(list(digest))
    except Exception as exc:  # a full disk, a size limit, a vanished directory
        error = str(exc)
        table[ctx.rank, 0] = getattr(exc, "errno", None) or -1  # so every rank can say why
    dist.all_reduce(table, group=ctx.reduce_group)
    if error is None and ctx.is_main and not table[:, 0].any():
        try:
            _publish(tmp, final, table, ctx.world_size, state["epoch"])
            _prune(directory, final, keep)
        except Exception as exc:
            error = str(exc)
            table[0, 0] = getattr(exc, "errno", None) or -1
    published = table[0, 0].clone()
    dist.broadcast(published, src=0, group=ctx.reduce_group)
    table[0, 0] = published
    if table[:, 0].any():
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        error = "; ".join(
            f"rank {r}: "
            + (os.strerror(code) if code > 0 else error if r == ctx.rank else "see its message")
            for r, code in enumerate(table[:, 0].tolist())
            if code
        )
        previous = newest_name(directory)
        kept = f"the previous checkpoint {previous} is intact" if previous else "none was kept"
        raise CheckpointError(
            f"writing checkpoint {final} failed ({error}); {kept}. Free space or raise the "
            "limit, then resume with --resume"
        )
    return final


def save_best(directory: str | Path, model: torch.nn.Module, config: dict, epoch: int) -> Path:
    """Replace ``<directory>/best/model.pt`` with ``model`` as it is after ``epoch`` epochs
    (rank 0 calls this when validation improves): the model and its hooks' state, no
    optimiser; written to a temporary file first, so a reader sees the old or the new one.
    ``bns-pipe eval`` and ``bns-pipe compress`` read ``<directory>/best`` like a checkpoint."""
    final = Path(directory) / BEST / MODEL
    final.parent.mkdir(parents=True, exist_ok=True)
    plain, hook_state = plain_state_dict(model)
    tmp = final.with_name(f".{MODEL}.tmp")
    blob = {"model": plain, "hook_state": hook_state, "config": config, "state": {"epoch": epoch}}
    try:
        _write(tmp, blob)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing the best model {final} failed: {exc}") from exc
    return final


def _write(path: Path, blob: dict) -> tuple[int, bytes]:
    """Serialise ``blob`` to ``path`` durably; return its size and SHA-256."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    data = buffer.getbuffer()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).digest()


def _publish(tmp: Path, final: Path, table: torch.Tensor, world_size: int, epoch: int) -> None:
    """Write the completion record and rename ``tmp`` to ``final`` (rank 0)."""
    files = {}
    for rank in range(world_size):
        names = [shard_name(rank)] + ([MODEL] if rank == 0 else [])
        for slot, name in enumerate(names):
            row = table[rank, 1 + ENTRY * slot : 1 + ENTRY * (slot + 1)]
            files[name] = {"bytes": int(row[0]), "sha256": bytes(row[1:].tolist()).hex()}
    record = {"epoch": epoch, "world_size": world_size, "files": files}
    with open(tmp / RECORD, "w") as f:
        f.write(json.dumps(record, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: Path, written: Path, keep: int) -> None:
    """Keep ``written`` and the ``keep - 1`` newest intact checkpoints before it (0: keep
    all); broken older ones go too, newer ones (left by an earlier attempt) stay."""
    if keep == 0:
        return
    kept = 1
    for path in reversed(checkpoints(directory)):
        if epoch_of(path) >= epoch_of(written):
            continue
        if kept < keep and problem(path) is None:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)


def checkpoints(directory: str | Path) -> list[Path]:
    """Every ``epoch_<N>`` directory in ``directory``, oldest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()
    )


def newest_name(directory: str | Path) -> str | None:
    found = checkpoints(directory)
    return found[-1].name if found else None


def refuse_used(directory: str | Path) -> None:
    """A fresh run must not share ``directory`` with checkpoints of another run: a restart
    would resume the newest of them."""
    if checkpoints(directory):
        raise CheckpointError(
            f"--checkpoint-dir {directory} already holds checkpoints (newest "
            f"{newest_name(directory)}); pass --resume to continue from them, or use another "
            "directory"
        )


def problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` is not complete and intact, or None if it is."""
    try:
        record = json.loads((path / RECORD).read_text())
        files = record["files"]
    except FileNotFoundError:
        return f"{RECORD} is missing (incomplete write)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{RECORD} is unreadable ({exc})"
    for name, expected in files.items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            return f"{name} is missing"
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            return f"{name} does not match its SHA-256 in {RECORD} (corrupt)"
    return None


def newest_complete(directory: str | Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint; newer broken ones are skipped with a warning."""
    for path in reversed(checkpoints(directory)):
        reason = problem(path)
        if reason is None:
            return path
        if warn:
            print(f"bns-pipe: warning: skipping checkpoint {path}: {reason}", file=sys.stderr)
    return None


def read_model_file(path: str | Path) -> dict:
    """Load ``model.pt`` (a checkpoint directory or the file itself) or a compressed model
    file (:mod:`bns_pipe.compress`, decompressed) without unpickling code: ``{"model",
    "config"}`` at least."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a bns_pipe checkpoint: {unreadable(exc)}"
        ) from exc
    if compress.is_compressed(blob):
        return compress.read(blob, str(path))
    if not (isinstance(blob, dict) and {"model", "config"} <= blob.keys()):
        raise CheckpointError(f"{path} is not a bns_pipe checkpoint (no model and config)")
    return blob


def load_initial(model: torch.nn.Module, path: str | Path) -> None:
    """Load the model of the checkpoint or compressed file ``path`` into ``model``
    (``--init-from``: fine-tuning's start); the model's hooks keep their own state."""
    blob = read_model_file(path)
    try:
        load_plain_state_dict(model, blob["model"], hook_tensors(model))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this run's model: {exc}") from None


def load_latest(
    directory: str | Path,
    ctx: DistContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Restore the newest complete checkpoint into ``model`` and ``optimizer``; return the
    loop state and this rank's ``rank_state``, or None without one. Rank 0 chooses (and
    warns about the broken ones it skips), so every rank loads the same epoch."""
    chosen = torch.tensor([-1], dtype=torch.int64)
    if ctx.is_main:
        path = newest_complete(directory)
        chosen[0] = -1 if path is None else epoch_of(path)
    dist.broadcast(chosen, src=0, group=ctx.reduce_group)
    if chosen.item() < 0:
        return None
    path = Path(directory) / f"{PREFIX}{int(chosen.item()):06d}"
    record = json.loads((path / RECORD).read_text())
    if record["world_size"] != ctx.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {record['world_size']} ranks, this run has "
            f"{ctx.world_size}; resume needs the same world size"
        )
    blob = read_model_file(path)
    shard_path = path / shard_name(ctx.rank)
    try:
        shard = torch.load(shard_path, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint shard {shard_path} is missing or corrupt: {unreadable(exc)}"
        ) from exc
    load_plain_state_dict(model, blob["model"], blob.get("hook_state"))
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(shard["rng_cpu"])
    if ctx.is_main:
        print(f"bns-pipe: resuming from {directory} at epoch {record['epoch']}", file=sys.stderr)
    return blob["state"], shard.get("rank_state", {})
