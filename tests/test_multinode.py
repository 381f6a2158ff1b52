"""Multi-node launch: two agents on 127.0.0.1 through ``launch/two_node.sh`` (c10d
rendezvous) train exactly as one agent does, and ``launch/slurm.sbatch`` runs on CPU nodes
with stand-in ``srun`` / ``scontrol`` (each "node" a local agent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from tests.distributed import free_port
from tests.test_failures import _worker_pids, losses, train
from tests.test_faults import elastic, wait_for_epochs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--no-progress", "--epochs", "4", "--dropout", "0.5", "--norm", "batch"]


@pytest.fixture(scope="module")
def four_parts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "p4"
    data = load_dataset("synthetic", num_nodes=2000, num_features=16, num_classes=4)
    partition(data, 4, out, verbose=False)
    return out


@pytest.fixture(scope="module")
def one_agent(four_parts: Path, tmp_path_factory) -> dict[int, float]:
    metrics = tmp_path_factory.mktemp("one") / "m.jsonl"
    done = train("--partition-dir", str(four_parts), *TRAIN, "--metrics-jsonl", str(metrics))
    assert done.returncode == 0, done.stderr
    return losses(metrics)


def start_two_agents(partition_dir: Path, *flags: str) -> list[subprocess.Popen]:
    """Node 1, then node 0, of ``launch/two_node.sh`` on 127.0.0.1, 2 ranks each."""
    port = str(free_port())
    agents = []
    for node in ("1", "0"):
        env = {
            **os.environ,
            "NODE_RANK": node,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHON": sys.executable,
        }
        command = ["bash", str(ROOT / "launch/two_node.sh"), str(partition_dir), "2", *flags]
        agents.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    return agents


def finish(agents: list[subprocess.Popen]) -> list[tuple[str, str]]:
    try:
        return [agent.communicate(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()


def test_two_agents_on_localhost_equal_one_agent(four_parts, one_agent, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"  # both nodes name it; global rank 0 writes it
    agents = start_two_agents(
        four_parts, *TRAIN, "--timeout", "60", "--metrics-jsonl", str(metrics)
    )
    outputs = finish(agents)
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert losses(metrics) == one_agent
    summaries = ["best val accuracy" in out for out, _ in outputs]
    assert sorted(summaries) == [False, True]  # printed by global rank 0's node only


def test_elastic_restart_across_two_nodes(four_parts, tmp_path: Path) -> None:
    """A worker killed on one node: both agents restart their workers (the other node's keep
    a restart count of 0) and every rank resumes from the shared checkpoint."""
    flags = ["--no-progress", "--epochs", "60", "--dropout", "0.5", "--timeout", "60"]
    full = tmp_path / "full.jsonl"
    assert (
        train("--partition-dir", str(four_parts), *flags, "--metrics-jsonl", str(full)).returncode
        == 0
    )
    metrics = tmp_path / "m.jsonl"
    restartable = elastic(tmp_path / "ckpt")
    agents = start_two_agents(four_parts, *flags, *restartable, "--metrics-jsonl", str(metrics))
    wait_for_epochs(metrics, 12, *agents)
    os.kill(_worker_pids(agents[0].pid)[-1], signal.SIGKILL)
    outputs = finish(agents)
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r] == list(range(60))
    assert rows[-1]["restarts"] == 1 and rows[-1]["resumed_from_epoch"] >= 10
    assert losses(metrics) == losses(full)


def test_two_node_script_checks_its_environment(four_parts) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK")}
    script = str(ROOT / "launch/two_node.sh")
    done = subprocess.run(
        ["bash", script, str(four_parts), "2"], capture_output=True, text=True, env=env
    )
    assert done.returncode != 0 and "set MASTER_ADDR" in done.stderr
    env.update(MASTER_ADDR="127.0.0.1", NODE_RANK="2")
    done = subprocess.run(
        ["bash", script, str(four_parts), "2"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "NODE_RANK must be 0 or 1" in done.stderr
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "usage:" in done.stderr


STAND_INS = {
    # one task per node, as `srun --ntasks-per-node=1` runs them; node ids from 0
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
echo "srun $*" >> "$SLURM_DRY_RUN_LOG"
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scontrol": """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\n127.0.0.2\\n'
""",
}


def test_slurm_script_on_cpu_nodes(four_parts, one_agent, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, metrics = tmp_path / "srun.log", tmp_path / "m.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",  # no nvidia-smi on CPU nodes
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "cpu[01-02]",
        "SLURM_JOB_ID": "4242",
        "SLURM_DRY_RUN_LOG": str(log),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    command = [
        "bash",
        str(ROOT / "launch/slurm.sbatch"),
        str(four_parts),
        *TRAIN,
        "--timeout",
        "60",
        "--metrics-jsonl",
        str(metrics),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    launched = log.read_text()
    for part in ("--nprocs 2", "--nnodes 2", "--rdzv-endpoint 127.0.0.1:", "--rdzv-id 4242"):
        assert part in launched, launched
    assert losses(metrics) == one_agent
    env["SLURM_JOB_NUM_NODES"] = "3"
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "4 parts do not split evenly over 3 nodes" in done.stderr
