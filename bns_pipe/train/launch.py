"""Entry points of ``bns-pipe train``: a torchrun worker, or a local launch of K workers.

Inside torchrun (``torchrun --nproc_per_node=K -m bns_pipe train --partition-dir DIR``) each
process runs :func:`run_worker`. ``bns-pipe train --dataset NAME --parts K`` partitions first
(cached), then starts K local workers through torch's elastic launcher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bns_pipe.errors import BnsPipeError, ConfigError
from bns_pipe.paths import cache_dir
from bns_pipe.train.config import TrainConfig

SHARED_CHECKPOINTS_NEEDED = (
    "--max-restarts on several nodes needs --checkpoint-dir on a filesystem every node sees"
)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def cached_partition(
    spec: dict, parts: int, method: str, seed: int, root: str | None, objective: str = "cut"
) -> str:
    """Partition the dataset ``spec`` into ``parts`` once; return the cached directory."""
    from bns_pipe.data import LOADER_VERSION, load_dataset_spec
    from bns_pipe.partition import BALANCE_CONSTRAINTS, partition

    identity = {
        "dataset": spec,
        "parts": parts,
        "method": method,
        "seed": seed,
        "loader": LOADER_VERSION,
    }
    if objective != "cut":  # the default stays out of the key: earlier caches remain valid
        identity["objective"] = objective
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    directory = (
        cache_dir("partitions")
        / f"{spec['name'].replace(':', '_').replace('/', '_')}-{parts}-{method}-{digest}"
    )
    if not (directory / "manifest.json").exists():
        data = load_dataset_spec(spec, root=root)
        partition(
            data,
            parts,
            directory,
            method=method,
            balance=BALANCE_CONSTRAINTS,
            seed=seed,
            objective=objective,
            dataset=spec,
        )
    return str(directory)


def run_worker(config: TrainConfig) -> dict:
    """Train as one rank of the job torchrun (or nobody, for one rank) started.

    Under an elastic agent with restarts (``--max-restarts``), a restarted worker resumes from
    the newest complete checkpoint. A failure to talk to a peer ends this rank with one line
    (:class:`PeerError`) instead of the backend's traceback.
    """
    from bns_pipe.train.distributed import as_peer_error, init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed(config.backend, config.device, config.threads_per_rank, config.timeout)
    try:
        elastic_defaults(config, ctx.rank, ctx.world_size, ctx.local_world_size)
        if ctx.is_main:
            from bns_pipe import _ext

            # one write with its newline: print() writes the newline apart, and on the shared,
            # unbuffered stderr another rank's error could land between the two
            banner = f"bns-pipe: {ctx.world_size} rank(s) on {ctx.device}; {_ext.describe()}\n"
            sys.stderr.write(banner)
        try:
            final = Trainer(config, ctx).fit()
        except Exception as exc:
            raise as_peer_error(exc, ctx.rank, config.timeout, "training") from None
        if ctx.is_main:
            print(summary_table(final))
        return final
    finally:
        shutdown()


def elastic_defaults(config: TrainConfig, rank: int, world: int, local_world: int) -> None:
    """With agent restarts allowed (``TORCHELASTIC_MAX_RESTARTS`` > 0) a restart must find a
    checkpoint: default ``--checkpoint-dir`` to this run's cache (one node only) and
    ``--checkpoint-every`` to a tenth of the epochs."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) == 0:
        return
    notes = []
    if config.checkpoint_dir is None:
        if world != local_world:
            raise ConfigError(SHARED_CHECKPOINTS_NEEDED)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        config.checkpoint_dir = str(cache_dir("checkpoints", run_id))
        notes.append(f"checkpoints go to {config.checkpoint_dir}")
    if config.checkpoint_every == 0:
        config.checkpoint_every = max(1, config.epochs // 10)
        notes.append(f"checkpointing every {config.checkpoint_every} epochs")
    if notes and rank == 0 and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        print(f"bns-pipe: restarts allowed: {'; '.join(notes)}", file=sys.stderr)


def evaluate_checkpoint(checkpoint_path: str, config: TrainConfig) -> dict[str, float]:
    """Evaluate a saved model on ``config.partition_dir`` as one rank (any world size)."""
    from bns_pipe.hooks import build_hook
    from bns_pipe.hooks.weights import load_plain_state_dict
    from bns_pipe.train.checkpoint import read_model_file
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    blob = read_model_file(checkpoint_path)
    saved = {k: v for k, v in blob["config"].items() if k in TrainConfig.__dataclass_fields__}
    model_config = TrainConfig(
        **{
            **saved,
            "partition_dir": config.partition_dir,
            "backend": config.backend,
            "device": config.device,
            "threads_per_rank": config.threads_per_rank,
            "timeout": config.timeout,
            "inductive": False,
            "metric": config.metric,
            "resume": False,
            "checkpoint_dir": None,
            "metrics_jsonl": None,
            # the saved weights are the ones the model computed with; a hook that also
            # changes inference beyond them (LDP's input quantization) runs again
            "hook": [spec for spec in saved.get("hook", []) if build_hook(spec).at_inference],
        }
    )
    ctx = init_distributed(config.backend, config.device, config.threads_per_rank, config.timeout)
    try:
        trainer = Trainer(model_config, ctx)
        try:
            keys = trainer.model.state_dict().keys()
            own = {k: v for k, v in blob.get("hook_state", {}).items() if k in keys}
            load_plain_state_dict(trainer.model, blob["model"], own)
        except RuntimeError as exc:
            raise BnsPipeError(
                f"checkpoint {checkpoint_path} does not fit this graph's model: "
                f"{str(exc).splitlines()[-1].strip()}"
            ) from None
        scores = trainer.evaluate()
        if ctx.is_main:
            print(
                json.dumps({"checkpoint": str(checkpoint_path), "metric": trainer.metric, **scores})
            )
        return scores
    finally:
        shutdown()


@dataclass
class Launch:
    """How ``bns-pipe train`` starts its workers: ``nprocs`` here, on one of ``nnodes`` nodes
    that meet at ``rdzv_endpoint`` (c10d rendezvous; node 0 hosts it), restarting the whole
    group up to ``max_restarts`` times when a worker fails."""

    nprocs: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "bns_pipe"
    max_restarts: int = 0
    timeout: float = 300.0

    def launcher_args(self, worker_args: Sequence[str]) -> list[str]:
        if self.nnodes == 1 and self.rdzv_endpoint is None:
            where = ["--standalone"]
        else:
            if self.rdzv_endpoint is None:
                raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0)")
            wait = max(1, round(self.timeout))  # seconds for every node to join
            where = [
                f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                f"--rdzv-id={self.rdzv_id}",
                f"--rdzv-conf=join_timeout={wait},read_timeout={wait},"
                f"is_host={int(self.node_rank == 0)}",
            ]
        return [
            *where,
            f"--nproc-per-node={self.nprocs}",
            f"--max-restarts={self.max_restarts}",
            "-m",
            "bns_pipe",
            *worker_args,
        ]


def launch_workers(launch: Launch, worker_args: Sequence[str]) -> int:
    """Start the workers of ``python -m bns_pipe WORKER_ARGS`` with torch's elastic launcher
    and turn its failures into one-line errors."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nprocs)))
    # a new rendezvous store every round, on every node (bns_pipe.train.distributed)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if launch.rdzv_endpoint is not None and launch.node_rank != 0:
        wait_for_endpoint(launch.rdzv_endpoint, launch.timeout)
    try:
        run(get_args_parser().parse_args(launch.launcher_args(worker_args)))
    except ChildFailedError as exc:
        restarts = f" after {launch.max_restarts} restart(s)" if launch.max_restarts else ""
        raise BnsPipeError(f"training failed{restarts} ({_failures(exc)})") from None
    except RendezvousError as exc:
        detail = f": {str(exc).splitlines()[0]}" if str(exc).strip() else ""
        raise BnsPipeError(
            f"rendezvous at {launch.rdzv_endpoint} failed: not all {launch.nnodes} nodes "
            f"joined within --timeout {launch.timeout:g} s ({type(exc).__name__}{detail}); "
            "start the launch on every node with the same endpoint and id"
        ) from None
    except SignalException as exc:
        raise BnsPipeError(
            f"stopped by signal {exc.sigval.name}; the workers checkpointed if "
            "--checkpoint-dir was given (continue with --resume)"
        ) from None
    return 0


def run_here_or_launch(
    command: str,
    args: argparse.Namespace,
    argv: Sequence[str],
    config: TrainConfig,
    work: Callable[[], object],
) -> int:
    """``bns-pipe train|eval``: run ``work`` in this process (under torchrun, or for one
    local rank) or start the workers with ``python -m bns_pipe COMMAND ARGV``, partitioning
    the dataset first (cached) when no ``--partition-dir`` was given."""
    from bns_pipe.data import dataset_spec_from_args
    from bns_pipe.partition import read_manifest

    if under_torchrun():
        if config.partition_dir is None:
            raise ConfigError("under torchrun, pass --partition-dir (made by `bns-pipe partition`)")
        work()
        return 0
    if args.max_restarts < 0 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError("need --max-restarts >= 0, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    if args.max_restarts and args.nnodes > 1 and not getattr(config, "checkpoint_dir", None):
        raise ConfigError(SHARED_CHECKPOINTS_NEEDED)
    if config.partition_dir is None:
        spec = dataset_spec_from_args(args)
        config.partition_dir = cached_partition(
            spec, args.parts, args.method, args.partition_seed, args.root, args.partition_obj
        )
        argv = [*argv, "--partition-dir", config.partition_dir]
    args.partition_dir = config.partition_dir
    nprocs = args.nprocs or int(read_manifest(config.partition_dir)["num_parts"]) // args.nnodes
    if nprocs == 1 and args.nnodes == 1 and args.max_restarts == 0:
        work()
        return 0
    launch = Launch(
        nprocs,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        timeout=config.timeout,
    )
    return launch_workers(launch, [command, *argv])


def _failures(exc) -> str:
    """Each failed rank's exit code, and the messages the workers left (ranks that said the
    same thing grouped), from a ``ChildFailedError``."""
    codes = "; ".join(f"rank {r}: exit code {f.exitcode}" for r, f in sorted(exc.failures.items()))
    said: dict[str, list[int]] = {}
    for rank, failure in sorted(exc.failures.items()):
        message = failure.message if isinstance(failure.message, str) else ""
        if failure.exitcode > 0 and message and not message.startswith("To enable traceback"):
            said.setdefault(message, []).append(rank)
    if not said:
        return f"{codes}; see the rank errors above"
    messages = "; ".join(
        f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}: {m}" for m, r in said.items()
    )
    return f"{codes}. {messages}"


def wait_for_endpoint(endpoint: str, timeout: float) -> None:
    """Wait until node 0's rendezvous at ``HOST:PORT`` accepts connections (up to
    ``timeout`` seconds); torch's store client would retry with C++ tracebacks instead."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--rdzv-endpoint must be HOST:PORT, not {endpoint!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise BnsPipeError(
                    f"rendezvous at {endpoint} failed: node 0 did not open it within --timeout "
                    f"{timeout:g} s ({exc.strerror or exc}); start launch/two_node.sh with "
                    "NODE_RANK=0 there, and check MASTER_ADDR, MASTER_PORT and the firewall"
                ) from None
            time.sleep(0.25)


def summary_table(final: dict) -> str:
    """The closing summary rank 0 prints."""
    rate = final["epochs_per_s"]
    rows = [
        ("world size", str(final["world_size"])),
        ("best val accuracy", f"{final['best_val_acc']:.4f}"),
        ("test accuracy (at best val)", f"{final['test_acc']:.4f}"),
        ("epochs/s (median)", f"{rate:.2f}" if rate else "n/a (fewer than 4 epochs)"),
        ("comm bytes/epoch (median)", _bytes(final.get("comm_bytes_per_epoch"))),
        ("peak memory (max rank)", _bytes(final.get("peak_mem_bytes"))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(value)
