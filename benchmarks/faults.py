"""The fault matrix, the elastic restart cost and the two-node run, measured end to end.

    python benchmarks/faults.py [--out benchmarks/results]

Every fault is injected into a real run of ``bns-pipe train`` (local launcher, gloo, CPU) on
a synthetic graph (``--num-nodes``, 4 METIS parts); each row records the time from the fault
to the exit of the processes that must end, the exit code, our one-line message and what was
kept. A fault whose processes outlive its bound counts as a hang. The elastic rows kill one
of 4 workers with ``--max-restarts 1`` and time the gap from the kill to the first resumed
epoch's record. Writes ``faults.json`` and ``faults.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import REPO, describe, finish, summary

sys.path.insert(0, str(REPO))  # the tests' helpers and killed-writer script

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from bns_pipe.train import checkpoint
from tests.distributed import free_port
from tests.test_failures import _worker_pids

TIMEOUT = 10  # --timeout of the runs that wait on a silent peer
MARGIN = 15  # seconds past a fault's bound that still count as ending, not hanging
PIPELINE_BNS = ["--pipeline", "--sampling-rate", "0.5", "--feat-smooth", "0.9"]


class Run:
    """One ``bns-pipe train`` launch whose metrics and workers can be watched."""

    def __init__(
        self,
        work: Path,
        *args: str,
        preexec_fn: Callable | None = None,
        metrics: Path | None = None,
    ) -> None:
        self.metrics = metrics or work / f"m{time.monotonic_ns()}.jsonl"
        command = [sys.executable, "-m", "bns_pipe", "train", "--no-progress", *args]
        command += ["--metrics-jsonl", str(self.metrics)]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )

    def epochs(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "epoch" in row:
                rows.append(row)
        return rows

    def wait_epochs(self, count: int, bound: float = 300) -> None:
        deadline = time.monotonic() + bound
        while len(self.epochs()) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"run ended before epoch {count}: {self.finish()[1][-2000:]}")
            time.sleep(0.01)

    def kill_one_worker(self, after_epochs: int) -> float:
        """SIGKILL the last worker once ``after_epochs`` epochs are recorded; the kill time."""
        self.wait_epochs(after_epochs)
        os.kill(self.workers()[-1], signal.SIGKILL)
        return time.monotonic()

    def workers(self) -> list[int]:
        return _worker_pids(self.process.pid)

    def finish(self, bound: float = 300) -> tuple[int, str]:
        try:
            _, err = self.process.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def message(stderr: str) -> str:
    """Our first one-line message in a run's stderr (an error, else a warning)."""
    lines = stderr.splitlines()
    for marker in ("error:", "warning:"):
        for line in lines:
            if marker in line and line.startswith("bns-pipe"):
                return line.split(marker, 1)[1].strip()
    return lines[-1] if lines else ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], bound: float) -> float:
    began = time.monotonic()
    while any(alive(p) for p in pids) and time.monotonic() - began < bound:
        time.sleep(0.02)
    return time.monotonic() - began


def row(fault: str, bound: float, seconds: float, code: int, text: str, kept: str) -> dict:
    return {
        "fault": fault,
        "bound_s": bound,
        "time_to_exit_s": round(seconds, 2),
        "exit_code": code,
        "hang": seconds > bound + MARGIN,
        "message": text,
        "data_kept": kept,
    }


def killed_rank(work: Path, parts: Path) -> dict:
    ckpt = work / "killed"
    run = Run(
        work,
        "--partition-dir",
        str(parts),
        "--epochs",
        "100000",
        "--checkpoint-every",
        "5",
        "--checkpoint-dir",
        str(ckpt),
    )
    began = run.kill_one_worker(12)
    code, err = run.finish()
    newest = checkpoint.newest_complete(ckpt, warn=False)
    kept = f"{len(run.epochs())} epoch records; newest checkpoint {newest.name} intact"
    return row(
        "killed rank (SIGKILL, 1 of 4)", 5, time.monotonic() - began, code, message(err), kept
    )


def stopped_rank(work: Path, parts: Path) -> dict:
    run = Run(work, "--partition-dir", str(parts), "--epochs", "100000", "--timeout", str(TIMEOUT))
    run.wait_epochs(5)
    *survivors, victim = run.workers()
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    seconds = wait_gone(survivors, TIMEOUT + 60)
    code, err = run.finish()  # the agent kills the stopped rank after torch's 30 s grace
    kept = (
        f"{len(run.epochs())} epoch records; the launcher ended "
        f"{time.monotonic() - stopped:.0f} s after the stop (SIGKILL of the stopped rank)"
    )
    fault = f"stopped rank (SIGSTOP, 1 of 4, --timeout {TIMEOUT})"
    return row(fault, TIMEOUT, seconds, code, message(err), kept)


def lonely_node(work: Path, parts: Path, node_rank: str) -> dict:
    env = {
        **os.environ,
        "NODE_RANK": node_rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
    }
    command = [
        "bash",
        str(REPO / "launch/two_node.sh"),
        str(parts),
        "2",
        "--no-progress",
        "--timeout",
        str(TIMEOUT),
    ]
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    who = "node 1 never arrives" if node_rank == "0" else "node 0 (the host) never arrives"
    return row(
        f"rendezvous: {who}",
        TIMEOUT,
        time.monotonic() - began,
        done.returncode,
        message(done.stderr),
        "nothing started",
    )


def corrupt_checkpoint(work: Path, parts: Path) -> dict:
    ckpt = work / "corrupt"
    common = ["--partition-dir", str(parts), "--checkpoint-dir", str(ckpt)]
    Run(work, *common, "--epochs", "10", "--checkpoint-every", "5").finish()
    newest = ckpt / "epoch_000010" / "model.pt"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    began = time.monotonic()
    code, err = Run(work, *common, "--epochs", "12", "--resume").finish()
    return row(
        "corrupt newest checkpoint, --resume",
        60,
        time.monotonic() - began,
        code,
        message(err),
        "resumed from epoch_000005; run completed",
    )


def killed_writer(work: Path, parts: Path) -> dict:
    """The test's script: a process killed after half of ``model.pt`` reached the disk."""
    from tests.test_faults import KILLED_WRITER

    directory = work / "torn"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    newest = checkpoint.newest_complete(directory, warn=False)
    kept = f"{newest.name} intact; the torn .epoch_000002.tmp is never read"
    return row(
        "SIGKILL while writing a checkpoint",
        5,
        time.monotonic() - began,
        done.returncode,
        "(the writer is dead; readers fall back)",
        kept,
    )


def failed_write(work: Path, parts: Path) -> dict:
    ckpt = work / "full-disk"
    common = [
        "--partition-dir",
        str(parts),
        "--checkpoint-dir",
        str(ckpt),
        "--hidden",
        "256",
        "--checkpoint-every",
        "2",
    ]
    Run(work, *common, "--epochs", "4").finish()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    began = time.monotonic()
    code, err = Run(work, *common, "--epochs", "8", "--resume", preexec_fn=limit).finish()
    intact = checkpoint.problem(ckpt / "epoch_000004") is None
    return row(
        "checkpoint write fails (RLIMIT_FSIZE 32 KiB)",
        60,
        time.monotonic() - began,
        code,
        message(err),
        f"epoch_000004 intact: {intact}",
    )


def torn_metrics(work: Path, parts: Path) -> dict:
    ckpt = work / "torn-metrics"
    first = Run(work, "--partition-dir", str(parts), "--epochs", "5", "--checkpoint-dir", str(ckpt))
    first.finish()
    with first.metrics.open("a") as f:
        f.write('{"epoch": 5, "loss": 0.')
    began = time.monotonic()
    args = [
        "--partition-dir",
        str(parts),
        "--epochs",
        "8",
        "--resume",
        "--checkpoint-dir",
        str(ckpt),
    ]
    code, _ = Run(work, *args, metrics=first.metrics).finish()
    lines = first.metrics.read_text().splitlines()
    valid = all(_parses(line) for line in lines)
    epochs = [json.loads(line)["epoch"] for line in lines if '"epoch"' in line]
    once = epochs == list(range(8))
    kept = f"every line parses: {valid}; epochs {epochs[0]}..{epochs[-1]}, each once: {once}"
    return row(
        "torn metrics line, --resume",
        60,
        time.monotonic() - began,
        code,
        "(none: the torn line is dropped)",
        kept,
    )


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def elastic_restart(work: Path, parts: Path, mode: list[str], name: str) -> dict:
    """Kill one of 4 workers at epoch 22 or later (newest checkpoint: epoch 20); time from the
    kill to the first epoch record written after the restart. Resuming rewrites the metrics
    file to the checkpoint's epochs, so that record is the one that makes the file hold
    exactly ``resumed_from_epoch + 1`` epochs again."""
    epochs = 60
    ckpt = work / f"elastic-{name}"
    run = Run(
        work,
        "--partition-dir",
        str(parts),
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        "5",
        "--max-restarts",
        "1",
        "--checkpoint-dir",
        str(ckpt),
        *mode,
    )
    killed_at = run.kill_one_worker(22)
    snapshots = []
    while run.process.poll() is None:
        rows = run.epochs()
        snapshots.append((time.monotonic(), len(rows), rows[-1]["epoch"] if rows else -1))
        time.sleep(0.005)
    code, _ = run.finish()
    final = json.loads(run.metrics.read_text().splitlines()[-1])
    resumed = final["resumed_from_epoch"]
    first = next(t for t, n, last in snapshots if n == resumed + 1 and last == resumed)
    times = sorted(r["epoch_time_s"] for r in run.epochs())
    return {
        "mode": name,
        "exit_code": code,
        "restarts": final["restarts"],
        "resumed_from_epoch": resumed,
        "kill_to_first_resumed_epoch_s": round(first - killed_at, 2),
        "median_epoch_s": round(times[len(times) // 2], 4),
        "each_epoch_once": [r["epoch"] for r in run.epochs()] == list(range(epochs)),
    }


def two_node(work: Path, parts: Path) -> dict:
    """Two agents of ``launch/two_node.sh`` on 127.0.0.1 against one agent of 4 ranks."""
    common = ["--no-progress", "--epochs", "20", "--timeout", "60"]
    single = Run(work, "--partition-dir", str(parts), *common)
    single.finish()
    metrics, port = work / "two-node.jsonl", str(free_port())
    began = time.monotonic()
    agents = [
        subprocess.Popen(
            [
                "bash",
                str(REPO / "launch/two_node.sh"),
                str(parts),
                "2",
                *common,
                "--metrics-jsonl",
                str(metrics),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "NODE_RANK": node,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "PYTHON": sys.executable,
            },
        )
        for node in ("0", "1")
    ]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    wall = time.monotonic() - began
    two = [json.loads(line) for line in metrics.read_text().splitlines()]
    one = [json.loads(line) for line in single.metrics.read_text().splitlines()]
    return {
        "exit_codes": [agent.returncode for agent in agents],
        "wall_s": round(wall, 1),
        "losses_equal_one_agent": [r["loss"] for r in two if "epoch" in r]
        == [r["loss"] for r in one if "epoch" in r],
        "epochs_per_s": two[-1]["epochs_per_s"],
        "one_agent_epochs_per_s": one[-1]["epochs_per_s"],
        "summary_printed_by_node": [i for i, (out, _) in enumerate(outputs) if "best val" in out],
    }


def markdown(result: dict) -> str:
    lines = [
        "# Faults: the matrix, elastic restarts and the two-node run",
        "",
        f"`python benchmarks/faults.py`; synthetic graph of {result['num_nodes']:,} nodes, "
        "4 METIS parts, gloo on CPU, `bns-pipe train` (local launcher). "
        f"{summary(result['machine'])}",
        "",
        f"Hangs: **{sum(r['hang'] for r in result['matrix'])}** of {len(result['matrix'])} faults "
        f"(a hang: the processes that must end outlive the bound by more than {MARGIN} s).",
        "",
        "| fault | bound s | time to exit s | exit | message | data kept |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in result["matrix"]:
        lines.append(
            f"| {r['fault']} | {r['bound_s']} | {r['time_to_exit_s']} | {r['exit_code']} | "
            f"{r['message'].replace('|', '/')} | {r['data_kept']} |"
        )
    lines += [
        "",
        "Time to exit: from the fault to the exit of the launcher, except the stopped rank (to "
        "the survivors' exit: the stopped process itself is killed by the agent 30 s later, "
        "torch's shutdown grace) and the checkpoint runs (the whole resumed run).",
        "",
        "## Elastic restart (`--max-restarts 1`, SIGKILL of 1 of 4 workers at epoch >= 22)",
        "",
        "| mode | exit | restarts | resumed from | kill → first resumed epoch s | median epoch s "
        "| each epoch once |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["elastic"]:
        lines.append(
            f"| {r['mode']} | {r['exit_code']} | {r['restarts']} | {r['resumed_from_epoch']} | "
            f"{r['kill_to_first_resumed_epoch_s']} | {r['median_epoch_s']} | "
            f"{r['each_epoch_once']} |"
        )
    t = result["two_node"]
    lines += [
        "",
        "## Two nodes on one machine (`launch/two_node.sh`, 2 agents x 2 ranks, c10d)",
        "",
        f"Exit codes {t['exit_codes']}, {t['wall_s']} s wall; losses equal one 4-rank agent: "
        f"{t['losses_equal_one_agent']}; {t['epochs_per_s']:.1f} epochs/s against "
        f"{t['one_agent_epochs_per_s']:.1f} for one agent; the summary came from node "
        f"{t['summary_printed_by_node']} (global rank 0 lands on the node that joins first).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--num-nodes", type=int, default=20000)
    args = parser.parse_args()
    machine = describe()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = load_dataset("synthetic", num_nodes=args.num_nodes, num_features=64, num_classes=8)
        parts = work / "p4"
        partition(data, 4, parts, verbose=False)
        matrix = []
        for fault in (
            killed_rank,
            stopped_rank,
            corrupt_checkpoint,
            killed_writer,
            failed_write,
            torn_metrics,
        ):
            matrix.append(fault(work, parts))
            print(json.dumps(matrix[-1]), flush=True)
        for node_rank in ("0", "1"):
            matrix.append(lonely_node(work, parts, node_rank))
            print(json.dumps(matrix[-1]), flush=True)
        elastic = [
            elastic_restart(work, parts, [], "vanilla"),
            elastic_restart(work, parts, PIPELINE_BNS, "pipeline + BNS 0.5"),
        ]
        print(json.dumps(elastic), flush=True)
        two = two_node(work, parts)
        print(json.dumps(two), flush=True)
    result = {
        "machine": finish(machine),
        "num_nodes": args.num_nodes,
        "matrix": matrix,
        "elastic": elastic,
        "two_node": two,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(result, indent=1))
    (args.out / "faults.md").write_text(markdown(result))
    print(f"results: {args.out / 'faults.md'}")


if __name__ == "__main__":
    main()
