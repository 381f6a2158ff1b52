"""Multi-node launch: two agents on 127.0.0.1 through ``launch/two_node.sh`` (c10d
rendezvous) train exactly as one agent does, and ``launch/slurm.sbatch`` runs on CPU nodes
with stand-in ``srun`` / ``scontrol`` (each "node" a local agent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from tests.distributed import free_port
from tests.test_failures import losses, train

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


def test_two_agents_on_localhost_equal_one_agent(four_parts, one_agent, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"  # both nodes name it; global rank 0 writes it
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
        command = [
            "bash",
            str(ROOT / "launch/two_node.sh"),
            str(four_parts),
            "2",
            *TRAIN,
            "--timeout",
            "60",
            "--metrics-jsonl",
            str(metrics),
        ]
        agents.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    try:
        outputs = [agent.communicate(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert losses(metrics) == one_agent
    summaries = ["best val accuracy" in out for out, _ in outputs]
    assert sorted(summaries) == [False, True]  # printed by global rank 0's node only


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
