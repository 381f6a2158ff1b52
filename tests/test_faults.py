"""Faults on a cluster: elastic restarts that resume exactly, and a fault matrix with no hangs.

Each fault ends with its message within a bound, and what was saved stays usable: a killed or
stopped rank, a rendezvous peer that never arrives, a corrupt newest checkpoint, a process
killed while writing a checkpoint, a write that fails (file-size limit) and a metrics line
torn by a crash.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from bns_pipe.train import checkpoint
from tests.distributed import free_port
from tests.test_failures import PIPELINE_BNS, _worker_pids, losses, rank_errors, train

ROOT = Path(__file__).resolve().parents[1]
GRAPH = {"num_nodes": 3000, "num_features": 16, "num_classes": 4}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("faults")
    data = load_dataset("synthetic", **GRAPH)
    for k in (2, 4):
        partition(data, k, base / f"p{k}", verbose=False)
    return {k: base / f"p{k}" for k in (2, 4)}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def start(*args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "bns_pipe", "train", "--no-progress", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def wait_for_epochs(metrics: Path, count: int, *processes: subprocess.Popen) -> None:
    """Until ``metrics`` holds ``count`` epochs; fails if a process ends or 120 s pass."""
    deadline = time.monotonic() + 120
    while len(losses(metrics) if metrics.exists() else {}) < count:
        for process in processes:
            assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"fewer than {count} epochs within 120 s"
        time.sleep(0.02)


def elastic(checkpoint_dir: Path) -> list[str]:
    """One allowed restart, resuming from checkpoints every 5 epochs."""
    return [
        "--max-restarts",
        "1",
        "--checkpoint-every",
        "5",
        "--checkpoint-dir",
        str(checkpoint_dir),
    ]


@pytest.mark.parametrize("mode", [[], PIPELINE_BNS], ids=["vanilla", "pipeline-bns"])
def test_elastic_restart_resumes_the_same_trajectory(parts, tmp_path: Path, mode) -> None:
    """SIGKILL one of 4 workers: the agent restarts all four, they resume from the newest
    checkpoint (with the pipeline's stale buffers), and the run equals an uninterrupted one."""
    common = ["--partition-dir", str(parts[4]), "--epochs", "80", "--hidden", "64", *mode]
    full = tmp_path / "full.jsonl"
    assert train(*common, "--metrics-jsonl", str(full)).returncode == 0
    metrics = tmp_path / "m.jsonl"
    process = start(*common, *elastic(tmp_path / "ckpt"), "--metrics-jsonl", str(metrics))
    try:
        wait_for_epochs(metrics, 12, process)
        os.kill(_worker_pids(process.pid)[-1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    rows = records(metrics)
    assert [r["epoch"] for r in rows if "epoch" in r] == list(range(80))
    assert sum("header" in r for r in rows) == 1 and rows[-1]["final"]
    assert losses(metrics) == losses(full)
    assert rows[-1]["restarts"] == 1 and rows[-1]["resumed_from_epoch"] % 5 == 0
    assert rows[-1]["resumed_from_epoch"] >= 10
    assert "Traceback" not in stderr and "resuming from" in stderr
    kept = [p.name for p in checkpoint.checkpoints(tmp_path / "ckpt")]
    assert kept == ["epoch_000075", "epoch_000080"]  # --keep-checkpoints 2


def test_stopped_rank_ends_the_survivor_within_the_timeout(parts, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    process = start(
        "--partition-dir",
        str(parts[2]),
        "--epochs",
        "100000",
        "--timeout",
        "8",
        "--metrics-jsonl",
        str(metrics),
    )
    try:
        wait_for_epochs(metrics, 3, process)
        survivor, victim = _worker_pids(process.pid)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        while Path(f"/proc/{survivor}").exists() and _state(survivor) != "Z":
            assert time.monotonic() - stopped < 8 + 15, "the survivor hung"
            time.sleep(0.1)
        waited = time.monotonic() - stopped
        os.kill(victim, signal.SIGKILL)  # the agent would wait 30 s more for it
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0 and waited >= 7
    assert rank_errors(stderr, "did not answer within --timeout 8 s") == 1, stderr
    assert "Traceback" not in stderr


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_rendezvous_peer_that_never_arrives(parts, node_rank: str) -> None:
    env = {
        **os.environ,
        "NODE_RANK": node_rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    command = ["bash", str(ROOT / "launch/two_node.sh"), str(parts[4]), "2", "--timeout", "5"]
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0 and time.monotonic() - began < 5 + 15
    assert "rendezvous at 127.0.0.1:" in done.stderr and "within --timeout 5 s" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 3, done.stderr


def _run_with_checkpoints(parts, tmp_path: Path, epochs: int, *extra: str, **popen):
    return train(
        "--partition-dir",
        str(parts[2]),
        "--dropout",
        "0.5",
        "--epochs",
        str(epochs),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--metrics-jsonl",
        str(tmp_path / "m.jsonl"),
        *extra,
        **popen,
    )


@pytest.mark.parametrize("damage", ["corrupt", "incomplete"])
def test_broken_newest_checkpoint_falls_back(parts, tmp_path: Path, damage: str) -> None:
    full = tmp_path / "full.jsonl"
    common = ["--partition-dir", str(parts[2]), "--dropout", "0.5"]
    assert train(*common, "--epochs", "8", "--metrics-jsonl", str(full)).returncode == 0
    done = _run_with_checkpoints(parts, tmp_path, 6, "--checkpoint-every", "2")
    assert done.returncode == 0, done.stderr
    newest = tmp_path / "ckpt" / "epoch_000006"
    if damage == "corrupt":
        blob = bytearray((newest / "model.pt").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / "model.pt").write_bytes(bytes(blob))
    else:
        (newest / "checkpoint.json").unlink()
    assert checkpoint.problem(newest) is not None
    done = _run_with_checkpoints(parts, tmp_path, 8, "--resume")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(f"skipping checkpoint {newest}") == 1, done.stderr
    assert "resuming from" in done.stderr and "at epoch 4" in done.stderr
    assert losses(tmp_path / "m.jsonl") == losses(full)
    assert records(tmp_path / "m.jsonl")[-1]["resumed_from_epoch"] == 4


KILLED_WRITER = """
import os, signal, sys
import torch
from bns_pipe.train import checkpoint
from bns_pipe.train.distributed import init_distributed

ctx = init_distributed("gloo", "cpu", 1, 30.0)
model = torch.nn.Linear(8, 4)
optimizer = torch.optim.Adam(model.parameters())
checkpoint.save(sys.argv[1], ctx, model, optimizer, {"epoch": 1}, {})
write = checkpoint._write

def dying_write(path, blob):
    if path.name == "model.pt":  # half the file reaches the disk, then the process dies
        path.write_bytes(b"PK\\x03\\x04 torn")
        os.kill(os.getpid(), signal.SIGKILL)
    return write(path, blob)

checkpoint._write = dying_write
checkpoint.save(sys.argv[1], ctx, model, optimizer, {"epoch": 2}, {})
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (directory / ".epoch_000002.tmp").is_dir()  # the torn write, never renamed
    assert [p.name for p in checkpoint.checkpoints(directory)] == ["epoch_000001"]
    assert checkpoint.newest_complete(directory) == directory / "epoch_000001"
    assert checkpoint.read_model_file(directory / "epoch_000001")["state"] == {"epoch": 1}


def test_failed_write_leaves_the_previous_checkpoint(parts, tmp_path: Path) -> None:
    big = ["--hidden", "256", "--checkpoint-every", "2"]
    assert _run_with_checkpoints(parts, tmp_path, 4, *big).returncode == 0
    previous = tmp_path / "ckpt" / "epoch_000004"
    assert (previous / "model.pt").stat().st_size > 64 * 1024

    def limit_file_size() -> None:  # a disk that fills up: writes past 32 KiB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    began = time.monotonic()
    done = _run_with_checkpoints(parts, tmp_path, 8, *big, "--resume", preexec_fn=limit_file_size)
    assert done.returncode != 0 and time.monotonic() - began < 120
    assert rank_errors(done.stderr, "rank 0: File too large") == 2, done.stderr  # both say why
    assert f"the previous checkpoint {previous.name} is intact" in done.stderr
    assert "Traceback" not in done.stderr
    assert checkpoint.problem(previous) is None
    saved = [p.name for p in checkpoint.checkpoints(tmp_path / "ckpt")]
    assert saved == ["epoch_000002", "epoch_000004"]


def test_torn_metrics_line_on_resume(parts, tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    common = ["--partition-dir", str(parts[2]), "--dropout", "0.5"]
    assert train(*common, "--epochs", "6", "--metrics-jsonl", str(full)).returncode == 0
    assert _run_with_checkpoints(parts, tmp_path, 3).returncode == 0
    metrics = tmp_path / "m.jsonl"
    with metrics.open("a") as f:  # a crash in the middle of a line
        f.write('{"epoch": 3, "loss": 0.4')
    done = _run_with_checkpoints(parts, tmp_path, 6, "--resume")
    assert done.returncode == 0, done.stderr
    rows = records(metrics)  # every line parses
    assert [r["epoch"] for r in rows if "epoch" in r] == list(range(6))
    assert losses(metrics) == losses(full) and "header" in rows[0] and rows[-1]["final"]


def test_fresh_run_refuses_a_directory_with_checkpoints(parts, tmp_path: Path) -> None:
    assert _run_with_checkpoints(parts, tmp_path, 2).returncode == 0
    done = _run_with_checkpoints(parts, tmp_path, 2)
    assert done.returncode != 0 and "already holds checkpoints" in done.stderr
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "ckpt")] == ["epoch_000002"]
