"""The ``bns-pipe`` command (also ``python -m bns_pipe``): one subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bns_pipe import __version__
from bns_pipe.errors import BnsPipeError, ConfigError


def _partition_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.data import add_dataset_arguments
    from bns_pipe.partition import BALANCE_CONSTRAINTS, METHODS, OBJECTIVES

    add_dataset_arguments(parser)
    parser.add_argument("--parts", type=int, required=True, help="number of parts K (ranks)")
    parser.add_argument("--method", choices=METHODS, default="metis")
    parser.add_argument(
        "--partition-obj",
        choices=tuple(OBJECTIVES),
        default="cut",
        help="METIS objective: cut (edge cut) or vol (communication volume = halo total)",
    )
    parser.add_argument(
        "--balance",
        default=",".join(BALANCE_CONSTRAINTS),
        help="comma list of METIS balance constraints from: %(default)s",
    )
    parser.add_argument("--seed", type=int, default=0, help="METIS / random assignment seed")
    parser.add_argument("--out", required=True, help="output partition directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace another partition held in --out"
    )


def _run_partition(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.data import dataset_spec_from_args, load_dataset_spec
    from bns_pipe.partition import format_table, partition

    spec = dataset_spec_from_args(args)
    data = load_dataset_spec(spec, root=args.root)
    manifest = partition(
        data,
        args.parts,
        args.out,
        method=args.method,
        balance=args.balance,
        seed=args.seed,
        objective=args.partition_obj,
        dataset=spec,
        overwrite=args.overwrite,
    )
    print(format_table(manifest))
    return 0


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="partition directory")
    parser.add_argument(
        "--hook",
        action="append",
        default=[],
        help="run this hook's load step (e.g. island) on every part and print its report",
    )


def _run_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.hooks import build_hook, validate_specs
    from bns_pipe.partition import format_table, load_partition, verify_partition

    validate_specs(args.hook)
    manifest = verify_partition(args.directory)
    print(format_table(manifest))
    print(f"\nall {len(manifest['files'])} part files match their SHA-256")
    for spec in args.hook:
        for rank in range(manifest["num_parts"]):
            hook = build_hook(spec)
            hook.on_graph(load_partition(args.directory, rank))
            print(f"part {rank + 1}/{manifest['num_parts']} {spec}: {json.dumps(hook.report())}")
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.train.config import add_train_arguments

    add_train_arguments(parser)
    _add_partitioning_arguments(parser)


def _add_partitioning_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.data import add_dataset_arguments
    from bns_pipe.partition import METHODS, OBJECTIVES

    group = parser.add_argument_group("without --partition-dir: partition a dataset first")
    add_dataset_arguments(group)
    group.add_argument("--parts", type=int, default=1, help="number of parts K")
    group.add_argument("--nprocs", type=int, help="local worker processes (default: --parts)")
    group.add_argument("--method", choices=METHODS, default="metis", help="partition method")
    group.add_argument(
        "--partition-obj", choices=tuple(OBJECTIVES), default="cut", help="METIS objective"
    )
    group.add_argument("--partition-seed", type=int, default=0)
    launch = parser.add_argument_group("launching the workers (not under torchrun)")
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every worker up to N times when one fails; they resume from the "
        "newest complete checkpoint (default --checkpoint-dir: under the cache)",
    )
    launch.add_argument("--nnodes", type=int, default=1, help="nodes taking part (c10d rendezvous)")
    launch.add_argument(
        "--node-rank", type=int, default=0, help="this node's index; node 0 hosts the rendezvous"
    )
    launch.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous on node 0")
    launch.add_argument("--rdzv-id", default="bns_pipe", help="job id shared by all nodes")


def _run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.train.config import config_from_args
    from bns_pipe.train.launch import run_here_or_launch, run_worker

    config = config_from_args(args)
    return run_here_or_launch("train", args, argv, config, lambda: run_worker(config))


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.train.config import METRICS

    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or model.pt")
    for flag in ("--partition-dir", "--backend", "--device"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--threads-per-rank", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="metric reported beside accuracy (default auto: the task's)",
    )
    _add_partitioning_arguments(parser)


def _run_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.train.config import config_from_args
    from bns_pipe.train.launch import evaluate_checkpoint, run_here_or_launch

    config = config_from_args(args)
    return run_here_or_launch(
        "eval", args, argv, config, lambda: evaluate_checkpoint(args.checkpoint, config)
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=int, default=4, help="parts and CPU ranks")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--metrics-jsonl", default="runs/demo/metrics.jsonl")


def _run_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Partition the synthetic default into K parts and train on K CPU ranks."""
    from bns_pipe.partition import format_table, read_manifest

    train_args = [
        "--dataset",
        "synthetic",
        "--parts",
        str(args.parts),
        "--epochs",
        str(args.epochs),
        "--hidden",
        "128",
        "--layers",
        "2",
        "--dropout",
        "0.5",
        "--lr",
        "0.01",
        "--metrics-jsonl",
        args.metrics_jsonl,
    ]
    parser = build_parser()
    train = parser.parse_args(["train", *train_args])
    status = _run_train(train, train_args)
    print(f"\npartition: {train.partition_dir}")
    print(format_table(read_manifest(train.partition_dir)))
    print(f"metrics: {args.metrics_jsonl}")
    return status


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.bench.suite import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.bench.suite import bench, settings_from_args

    bench(settings_from_args(args), args.out)
    print(f"results: {args.out / 'results.md'} (json, PNG plots beside it)")
    return 0


def _accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    from bns_pipe.bench.accuracy import add_accuracy_arguments

    add_accuracy_arguments(parser)


def _run_accuracy(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe.bench.accuracy import accuracy, study_from_args

    accuracy(study_from_args(args))
    print(f"results: {args.out / 'accuracy.md'} (json and accuracy_curves.png beside it)")
    return 0


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or model.pt")
    parser.add_argument(
        "--method",
        required=True,
        help="kmeans:k=K (weights shared by K centres), int:bits=B (integers per row) or "
        "smartexchange[:basis=3,sparsity=0.2,exp_bits=4,iterations=40] (a basis times sparse "
        "powers of two)",
    )
    parser.add_argument("--out", required=True, help="the compressed file to write")
    tune = parser.add_argument_group("fine-tuning in the compressed form first")
    tune.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="train N epochs with the method's hook (the weights in its form from the first "
        "epoch, gradients straight through) from the checkpoint, then compress the result",
    )
    tune.add_argument(
        "--partition-dir",
        help="partition to fine-tune on (made by `bns-pipe partition`; one local rank a part)",
    )
    tune.add_argument("--finetune-lr", type=float, help="learning rate (default: the checkpoint's)")
    tune.add_argument("--metrics-jsonl", help="write the fine-tuning run's metrics here")


# what fine-tuning takes from the checkpoint's options, beside the model's
FINETUNE_KEYS = ("lr", "weight_decay", "metric", "eval_every")


def _run_compress(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from bns_pipe import compress
    from bns_pipe.train.checkpoint import read_model_file

    blob = read_model_file(args.checkpoint)
    if "compressed_with" in blob:  # a checkpoint or a best model is what one compresses
        raise BnsPipeError(f"{args.checkpoint} is already compressed: compress a checkpoint")
    compress.parse_method(args.method)  # a bad method fails before any fine-tuning
    if args.finetune_epochs < 0:
        raise ConfigError("--finetune-epochs must be non-negative")
    if args.finetune_epochs:
        out_dir = Path(args.out).resolve().parent
        with tempfile.TemporaryDirectory(prefix=".finetune-", dir=out_dir) as directory:
            blob = _finetune(args, blob["config"], directory)
    content, table = compress.compress_state(
        blob["model"], blob["config"], args.method, blob.get("hook_state")
    )
    compress.write(args.out, content)
    text, summary = compress.report(table)
    print(text)
    tuned = {"finetune_epochs": args.finetune_epochs}
    print(json.dumps({"out": args.out, "method": args.method, **tuned, **summary}))
    return 0


def _finetune(args: argparse.Namespace, saved: dict, directory: str) -> dict:
    """Train ``--finetune-epochs`` epochs from ``--checkpoint`` with the hook of
    ``--method``, checkpointing into ``directory``; return the final checkpoint."""
    from bns_pipe import compress
    from bns_pipe.train.checkpoint import newest_complete, read_model_file
    from bns_pipe.train.config import to_toml

    if not args.partition_dir:
        raise ConfigError("--finetune-epochs needs --partition-dir (made by `bns-pipe partition`)")
    keys = (*compress.MODEL_KEYS, *FINETUNE_KEYS)
    values = {key: saved[key] for key in keys if key in saved}
    values.update(
        partition_dir=args.partition_dir,
        init_from=args.checkpoint,
        epochs=args.finetune_epochs,
        hook=[compress.finetune_hook(args.method)],
        checkpoint_dir=str(Path(directory) / "checkpoints"),
        metrics_jsonl=args.metrics_jsonl,
    )
    if args.finetune_lr is not None:
        values["lr"] = args.finetune_lr
    config_file = Path(directory) / "finetune.toml"
    config_file.write_text(to_toml(values))
    train_argv = ["--config", str(config_file)]
    if _run_train(build_parser().parse_args(["train", *train_argv]), train_argv) != 0:
        raise BnsPipeError("fine-tuning failed (its error is above)")
    final = newest_complete(Path(directory) / "checkpoints")
    if final is None:
        raise BnsPipeError("fine-tuning wrote no checkpoint")
    return read_model_file(final)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
COMMANDS: tuple[Command, ...] = (
    ("partition", _partition_arguments, _run_partition),
    ("info", _info_arguments, _run_info),
    ("train", _train_arguments, _run_train),
    ("eval", _eval_arguments, _run_eval),
    ("demo", _demo_arguments, _run_demo),
    ("bench", _bench_arguments, _run_bench),
    ("accuracy", _accuracy_arguments, _run_accuracy),
    ("compress", _compress_arguments, _run_compress),
)
_HELP = {
    "partition": "partition a dataset once into K per-rank subgraphs",
    "info": "verify a partition directory and print its per-part table",
    "train": "train a GNN on a partition with torchrun workers (or launch them locally)",
    "eval": "evaluate a checkpoint on a partition, on any number of ranks",
    "demo": "run the main job on the built-in synthetic graph",
    "bench": "time every training method (PyG, ours, BNS, pipeline) side by side; plots",
    "accuracy": "paired-seed accuracy of every method against single-process (resumable)",
    "compress": "write a checkpoint's model as a compact file (k-means, integers, SmartExchange)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bns-pipe",
        description="Distributed full-graph GCN training with boundary-node sampling (BNS) "
        "and pipelined halo exchange (PipeGCN).",
    )
    parser.add_argument("--version", action="version", version=f"bns_pipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_arguments, run in COMMANDS:
        child = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        add_arguments(child)
        child.set_defaults(run=run)
    return parser


def _tell_the_launcher(exc: BnsPipeError) -> None:
    """Under torch's elastic agent, leave the message in the worker's error file, where the
    launcher (``bns-pipe train``, :func:`bns_pipe.fit`) reads it for its own error. Written
    beside it and renamed into place: the agent may read the file the moment this worker
    is stopped, and an empty or half-written file would crash the agent's JSON parse."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"message": str(exc), "timestamp": int(time.time())}, f)
        os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, argv[1:])
    except BnsPipeError as exc:
        # one write: the lines of several ranks sharing a terminal must not interleave
        sys.stderr.write(f"bns-pipe {args.command}: error: {exc}\n")
        sys.stderr.flush()
        _tell_the_launcher(exc)
        return 2
    except KeyboardInterrupt:
        print(f"bns-pipe {args.command}: interrupted", file=sys.stderr)
        return 130
