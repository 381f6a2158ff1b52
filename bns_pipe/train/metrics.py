"""Metrics as JSON lines (rank 0) and the measurements behind them.

The file holds a header ``{"header": true, ...}``, one object per epoch and a final
``{"final": true, ...}`` object; the keys are those of the metrics contract in the README.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

from bns_pipe import __version__

# Per-epoch times in the metrics, each the max over ranks (see the README's metrics contract).
TIMES = ("epoch_time_s", "compute_s", "comm_s", "comm_hidden_s", "reduce_s", "sample_s")


def epoch_record(
    times: dict, peak: int, stop_requested: bool, bytes_sent: int, group: dist.ProcessGroup
) -> dict:
    """One epoch's record from every rank's ``times`` (:meth:`Trainer.train_step`'s, hooks'
    seconds included), peak memory, stop request, loss share and bytes sent, gathered in one
    all-reduce over ``group`` (one row per rank): the summed loss and bytes, the *slowest*
    rank's times (their parts add up to its epoch time), the peak per rank and ``_stop``, true
    if any rank was asked to stop."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    columns = [*TIMES, *times["hooks"]]  # the same hooks, so the same keys, on every rank
    row = [times[k] for k in TIMES] + list(times["hooks"].values())
    row += [float(peak), float(stop_requested), float(times["loss"]), float(bytes_sent)]
    per_rank = torch.zeros(world, len(row), dtype=torch.float64)
    per_rank[rank] = torch.tensor(row, dtype=torch.float64)
    dist.all_reduce(per_rank, group=group)
    k = len(columns)
    slowest = per_rank[per_rank[:, TIMES.index("epoch_time_s")].argmax(), :k]
    peaks, stops, summed = per_rank[:, k], per_rank[:, k + 1], per_rank[:, k + 2 :].sum(0)
    return {
        "loss": float(summed[0]),
        **dict(zip(columns, slowest.tolist(), strict=True)),
        "comm_bytes": int(summed[1]),
        "peak_mem_bytes": int(peaks.max()),
        "peak_mem_bytes_per_rank": [int(v) for v in peaks],
        "_stop": bool(stops.any()),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark: ``max_memory_allocated`` on CUDA, the process's peak RSS on CPU.

    The RSS peak is ``VmHWM`` of /proc/self/status, which starts afresh at ``exec`` and at
    :func:`reset_peak_memory`; ``ru_maxrss`` would carry over the RSS of the process that
    forked this one.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB, not Linux-exact


def memory_now_bytes(device: torch.device) -> int:
    """Memory in use now: ``memory_allocated`` on CUDA, the resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_memory(device: torch.device) -> None:
    """Restart the high-water mark from the memory in use now (after start-up), so the peak
    measures training; on CPU by writing 5 to /proc/self/clear_refs (Linux), where allowed."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then includes start-up


def git_commit() -> str | None:
    """The commit of the source tree bns_pipe runs from, when it is a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def median_epochs_per_s(epoch_times: list[float], skip: int = 3) -> float | None:
    """Median throughput over the epochs after the first ``skip`` (warm-up); None if none."""
    steady = epoch_times[skip:]
    return 1.0 / statistics.median(steady) if steady else None


class MetricsWriter:
    """Appends JSON objects, one per line; a no-op without a path (non-zero ranks).

    ``keep_before=E`` continues a resumed run's file: it keeps the header and the records of
    epochs before ``E`` (those of the checkpoint it resumed from) and drops later epochs, final
    lines and a line torn by a crash, so the file holds each epoch once. The file is rewritten
    through a temporary file and a rename, so a crash here loses nothing.
    """

    def __init__(self, path: str | None, keep_before: int | None = None) -> None:
        self.file = None
        self.has_header = path is None
        if not path:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        kept = _records_before(target, keep_before) if keep_before is not None else []
        self.has_header = bool(kept) and "header" in kept[0]
        if keep_before is not None:
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(target)
        self.file = open(target, "a" if keep_before is not None else "w")  # noqa: SIM115

    def header(self, config: dict, partition_hash: str) -> None:
        self.write(
            {
                "header": True,
                "config": config,
                "version": __version__,
                "commit": git_commit(),
                "partition_hash": partition_hash,
            }
        )

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _records_before(path: Path, epoch: int) -> list[dict]:
    """The header and the epoch records before ``epoch`` of a metrics file (none if absent);
    lines that do not parse (a write torn by a crash) are dropped."""
    if not path.exists():
        return []
    kept: list[dict] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        first_header = record.get("header") is True and not kept
        earlier_epoch = bool(kept) and isinstance(record.get("epoch"), int)
        if first_header or (earlier_epoch and record["epoch"] < epoch):
            kept.append(record)
    return kept


def progress_bar(enabled: bool, initial: int, total: int):
    """The epochs' tqdm bar (rank 0 only: others pass ``enabled=False``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="epoch", dynamic_ncols=True)
