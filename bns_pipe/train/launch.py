"""Entry points of ``bns-pipe train``: a torchrun worker, or a local launch of K workers.

Inside torchrun (``torchrun --nproc_per_node=K -m bns_pipe train --partition-dir DIR``) each
process runs :func:`run_worker`. ``bns-pipe train --dataset NAME --parts K`` partitions first
(cached), then starts K local workers through torch's elastic launcher.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence

import torch

from bns_pipe.errors import BnsPipeError
from bns_pipe.paths import cache_dir
from bns_pipe.train.config import TrainConfig


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def cached_partition(spec: dict, parts: int, method: str, seed: int, root: str | None) -> str:
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
            dataset=spec,
        )
    return str(directory)


def run_worker(config: TrainConfig) -> dict:
    """Train as one rank of the job torchrun (or nobody, for one rank) started."""
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed(config.backend, config.device, config.threads_per_rank, config.timeout)
    try:
        if ctx.is_main:
            from bns_pipe import _ext

            print(
                f"bns-pipe: {ctx.world_size} rank(s) on {ctx.device}; {_ext.describe()}",
                file=sys.stderr,
            )
        try:
            final = Trainer(config, ctx).fit()
        except torch.distributed.DistError as exc:
            raise BnsPipeError(
                f"rank {ctx.rank}: communication with the other ranks failed "
                f"({str(exc).splitlines()[0]}); a peer probably died, see its error above"
            ) from None
        if ctx.is_main:
            print(summary_table(final))
        return final
    finally:
        shutdown()


def evaluate_checkpoint(checkpoint_path: str, config: TrainConfig) -> dict[str, float]:
    """Evaluate a saved model on ``config.partition_dir`` as one rank (any world size)."""
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
            "resume": False,
            "checkpoint_dir": None,
            "metrics_jsonl": None,
        }
    )
    ctx = init_distributed(config.backend, config.device, config.threads_per_rank, config.timeout)
    try:
        trainer = Trainer(model_config, ctx)
        try:
            trainer.model.load_state_dict(blob["model"])
        except RuntimeError as exc:
            raise BnsPipeError(
                f"checkpoint {checkpoint_path} does not fit this graph's model: "
                f"{str(exc).splitlines()[-1].strip()}"
            ) from None
        accuracy = trainer.evaluate()
        if ctx.is_main:
            print(json.dumps({"checkpoint": str(checkpoint_path), **accuracy}))
        return accuracy
    finally:
        shutdown()


def launch_local(nprocs: int, worker_args: Sequence[str]) -> int:
    """Start ``nprocs`` workers of ``python -m bns_pipe WORKER_ARGS`` with torch's launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    launcher_args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nprocs}",
            "--max-restarts=0",
            "-m",
            "bns_pipe",
            *worker_args,
        ]
    )
    try:
        run(launcher_args)
    except ChildFailedError as exc:
        failures = "; ".join(
            f"rank {rank}: exit code {f.exitcode}" for rank, f in sorted(exc.failures.items())
        )
        raise BnsPipeError(f"training failed ({failures}); see the rank errors above") from None
    return 0


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
