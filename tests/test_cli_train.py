"""The train and eval commands end to end: TOML config, metrics, checkpoints, SIGTERM, eval."""

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
from bns_pipe.train import checkpoint
from tests.test_failures import _worker_pids, losses, train

GRAPH = {"num_nodes": 2000, "num_features": 16, "num_classes": 4}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[int, Path]:
    """The same small graph in 1, 2 and 3 parts."""
    base = tmp_path_factory.mktemp("cli")
    data = load_dataset("synthetic", **GRAPH)
    for k in (1, 2, 3):
        partition(data, k, base / f"p{k}", verbose=False)
    return {k: base / f"p{k}" for k in (1, 2, 3)}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_toml_config_flags_override_and_metrics_contract(parts, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('model = "sage"\nhidden = 8\nepochs = 9\nnorm = "layer"\neval-every = 2\n')
    metrics = tmp_path / "m.jsonl"
    done = train(
        "--config",
        str(config),
        "--partition-dir",
        str(parts[2]),
        "--epochs",
        "5",
        "--metrics-jsonl",
        str(metrics),
        "--hook",
        "byte-counter",
    )
    assert done.returncode == 0, done.stderr
    rows = records(metrics)
    header, epochs, final = rows[0], rows[1:-1], rows[-1]
    assert header["header"] and header["config"]["model"] == "sage"
    assert header["config"]["hidden"] == 8 and header["config"]["epochs"] == 5
    assert len(header["partition_hash"]) == 64
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
    keys = {
        "loss",
        "epoch_time_s",
        "compute_s",
        "comm_s",
        "comm_hidden_s",
        "reduce_s",
        "sample_s",
        "comm_bytes",
        "peak_mem_bytes",
        "peak_mem_bytes_per_rank",
    }
    assert all(keys <= set(r) for r in epochs)
    assert [("val_acc" in r) for r in epochs] == [False, True, False, True, True]
    assert all(r["comm_bytes"] > 0 and len(r["peak_mem_bytes_per_rank"]) == 2 for r in epochs)
    for r in epochs:  # the slowest rank's times: its parts add up to its epoch time
        summed = r["compute_s"] + r["comm_s"] + r["reduce_s"] + r["sample_s"]
        assert abs(summed - r["epoch_time_s"]) < 1e-9 and r["peak_mem_bytes"] == max(
            r["peak_mem_bytes_per_rank"]
        )
    assert final["final"] and final["world_size"] == 2 and final["epochs_per_s"] > 0
    assert 0 < final["test_acc"] <= 1 and final["best_val_acc"] == max(
        r["val_acc"] for r in epochs if "val_acc" in r
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("epochz = 3\n")
    done = train("--config", str(bad), "--partition-dir", str(parts[2]))
    assert done.returncode == 2 and "unknown option(s) ['epochz']" in done.stderr


def test_eval_any_world_size_matches_training(parts, tmp_path: Path) -> None:
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    done = train(
        "--partition-dir",
        str(parts[2]),
        "--epochs",
        "4",
        "--norm",
        "batch",
        "--metrics-jsonl",
        str(metrics),
        "--checkpoint-dir",
        str(ckpt),
    )
    assert done.returncode == 0, done.stderr
    val = records(metrics)[-2]["val_acc"]
    for k in (1, 3):
        command = [
            sys.executable,
            "-m",
            "bns_pipe",
            "eval",
            "--checkpoint",
            str(ckpt / "epoch_000004"),
            "--partition-dir",
            str(parts[k]),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["val"] == pytest.approx(val, abs=1e-12)
    # the best validation epoch's model, saved beside the checkpoints, scores what the run said
    final = records(metrics)[-1]
    command[command.index(str(ckpt / "epoch_000004"))] = str(ckpt / "best")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    best = json.loads(done.stdout.strip().splitlines()[-1])
    assert best["val"] == pytest.approx(final["best_val_acc"], abs=1e-12)
    assert best["test"] == pytest.approx(final["test_acc"], abs=1e-12)


def test_sigterm_checkpoints_and_resume_continues(parts, tmp_path: Path) -> None:
    common = ["--partition-dir", str(parts[2]), "--dropout", "0.5", "--no-progress"]
    full = tmp_path / "full.jsonl"
    assert train(*common, "--epochs", "40", "--metrics-jsonl", str(full)).returncode == 0
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    command = [
        sys.executable,
        "-m",
        "bns_pipe",
        "train",
        *common,
        "--epochs",
        "40",
        "--metrics-jsonl",
        str(metrics),
        "--checkpoint-dir",
        str(ckpt),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(losses(metrics) if metrics.exists() else {}) < 3:
            time.sleep(0.1)
        os.kill(_worker_pids(process.pid)[0], signal.SIGTERM)  # preempt one rank
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and "stopped by SIGTERM" in stderr, stderr
    saved = checkpoint.checkpoints(ckpt)
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) < 40
    done = train(
        *common,
        "--epochs",
        "40",
        "--resume",
        "--checkpoint-dir",
        str(ckpt),
        "--metrics-jsonl",
        str(metrics),
    )
    assert done.returncode == 0, done.stderr
    assert losses(metrics) == losses(full)
