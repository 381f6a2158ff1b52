"""Bad runs end every rank with a clear message, within a timeout; resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from bns_pipe.partition.store import part_file
from bns_pipe.train import checkpoint

TIMEOUT = 180


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("failures") / "part"
    data = load_dataset("synthetic", num_nodes=2000, num_features=16, num_classes=4)
    partition(data, 2, out, verbose=False)
    return out


def train(*args: str, timeout: float = TIMEOUT, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bns_pipe", "train", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)


def rank_errors(stderr: str, phrase: str) -> int:
    """How many ranks printed an error containing ``phrase`` (the launcher's closing line,
    which repeats the ranks' messages, is not counted)."""
    return sum(
        phrase in line and "training failed" not in line
        for line in stderr.splitlines()
        if line.startswith("bns-pipe train: error: ")
    )


def losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["epoch"]: r["loss"] for r in records if "epoch" in r}


def test_world_size_mismatch_is_an_error_on_every_rank(two_parts: Path) -> None:
    done = train("--partition-dir", str(two_parts), "--nprocs", "3", "--epochs", "2")
    assert done.returncode != 0
    assert rank_errors(done.stderr, "has 2 parts but the world size is 3") == 3, done.stderr
    closing = [line for line in done.stderr.splitlines() if "training failed" in line]
    assert "but the world size is 3" in closing[-1]  # the launcher repeats what ranks said


def test_missing_partition_file(two_parts: Path, tmp_path: Path) -> None:
    broken = tmp_path / "part"
    broken.mkdir()
    for f in two_parts.iterdir():
        if f.name != part_file(1):
            (broken / f.name).write_bytes(f.read_bytes())
    done = train("--partition-dir", str(broken), "--epochs", "2")
    assert done.returncode != 0
    assert "part_1.pt is missing" in done.stderr, done.stderr


def test_nan_loss_stops_every_rank(two_parts: Path) -> None:
    done = train("--partition-dir", str(two_parts), "--epochs", "50", "--lr", "1e30")
    assert done.returncode != 0
    assert rank_errors(done.stderr, "the loss became nan") == 2, done.stderr


PIPELINE_BNS = [
    "--pipeline",
    "--sampling-rate",
    "0.5",
    "--feat-smooth",
    "0.9",
    "--grad-smooth",
    "0.5",
]


@pytest.mark.parametrize("mode", [[], PIPELINE_BNS], ids=["vanilla", "pipeline-bns"])
def test_killed_rank_ends_the_others(two_parts: Path, tmp_path: Path, mode: list[str]) -> None:
    metrics = tmp_path / "m.jsonl"
    command = [
        sys.executable,
        "-m",
        "bns_pipe",
        "train",
        "--no-progress",
        "--partition-dir",
        str(two_parts),
        "--epochs",
        "100000",
        "--metrics-jsonl",
        str(metrics),
        *mode,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and len(losses(metrics) if metrics.exists() else {}) < 3:
            time.sleep(0.2)
        victim = _worker_pids(process.pid)[-1]
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "training failed" in stderr, stderr
    # the survivor says what happened in one line: no backend traceback flood
    assert rank_errors(stderr, "communication failed while training") == 1, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) < 12, stderr


def _worker_pids(parent: int) -> list[int]:
    """Child processes of ``parent`` (the launcher) that run a bns_pipe worker."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, NotADirectoryError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"bns_pipe" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.parametrize("mode", [[], PIPELINE_BNS], ids=["vanilla", "pipeline-bns"])
def test_resume_continues_the_same_trajectory(
    two_parts: Path, tmp_path: Path, mode: list[str]
) -> None:
    """With ``--pipeline`` the stale halo buffers and their averages travel in the shards."""
    common = ["--partition-dir", str(two_parts), "--dropout", "0.5", "--norm", "batch", *mode]
    full = tmp_path / "full.jsonl"
    assert train(*common, "--epochs", "6", "--metrics-jsonl", str(full)).returncode == 0
    part = tmp_path / "part.jsonl"
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first = train(*common, *ckpt, "--epochs", "3", "--metrics-jsonl", str(part))
    assert first.returncode == 0, first.stderr
    second = train(*common, *ckpt, "--epochs", "6", "--resume", "--metrics-jsonl", str(part))
    assert second.returncode == 0, second.stderr
    assert losses(part) == losses(full)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "ckpt")] == [
        "epoch_000003",
        "epoch_000006",
    ]
    assert (tmp_path / "ckpt" / checkpoint.BEST / "model.pt").is_file()  # beside, not among them
