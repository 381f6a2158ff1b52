"""Training options: one dataclass, filled from a TOML file and command-line flags.

Precedence: flags given on the command line, then ``--config FILE.toml`` (keys are the flag
names with ``-`` or ``_``), then the defaults below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from bns_pipe.errors import ConfigError
from bns_pipe.hooks import validate_specs

METRICS = ("auto", "accuracy", "rocauc", "f1")  # --metric (bns_pipe.train.evaluation)


@dataclass
class TrainConfig:
    partition_dir: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads_per_rank: int | None = None
    model: str = "gcn"
    layers: int = 2
    hidden: int = 128
    heads: int = 1
    dropout: float = 0.5
    norm: str = "none"
    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: int = 100
    seed: int = 0
    eval_every: int = 1
    metric: str = "auto"
    metrics_jsonl: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    init_from: str | None = None
    sampling_rate: float = 1.0
    bns_norm: str = "unbiased"
    pipeline: bool = False
    feat_smooth: float = 0.0
    grad_smooth: float = 0.0
    use_pp: bool = False
    normalize_features: bool = False
    sparse_features: str = "auto"
    inductive: bool = False
    hook: list[str] = field(default_factory=list)
    dtype: str = "float32"
    timeout: float = 300.0
    progress: bool = True

    def validate(self) -> TrainConfig:
        checks = [
            (self.backend in ("auto", "gloo", "nccl"), "--backend must be auto, gloo or nccl"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.model in ("gcn", "sage", "gat"), "--model must be gcn, sage or gat"),
            (self.norm in ("none", "layer", "batch"), "--norm must be none, layer or batch"),
            (self.layers >= 1, "--layers must be at least 1"),
            (self.hidden >= 1, "--hidden must be at least 1"),
            (self.heads >= 1, "--heads must be at least 1"),
            (self.model == "gat" or self.heads == 1, "--heads applies to --model gat only"),
            (
                self.heads < 1 or self.hidden % self.heads == 0,
                f"--hidden {self.hidden} does not split evenly over --heads {self.heads}",
            ),
            (
                not (self.use_pp and self.model == "gat"),
                "--use-pp precomputes a fixed aggregation; GAT's depends on its weights",
            ),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be non-negative"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.eval_every >= 0, "--eval-every must be non-negative (0: never)"),
            (self.metric in METRICS, f"--metric must be one of {', '.join(METRICS)}"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be non-negative"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must be non-negative (0: all)"),
            (self.timeout > 0, "--timeout must be positive"),
            (0.0 <= self.sampling_rate <= 1.0, "--sampling-rate must be in [0, 1]"),
            (self.bns_norm in ("unbiased", "renorm"), "--bns-norm must be unbiased or renorm"),
            (0.0 <= self.feat_smooth < 1.0, "--feat-smooth must be in [0, 1)"),
            (0.0 <= self.grad_smooth < 1.0, "--grad-smooth must be in [0, 1)"),
            (
                self.pipeline or (self.feat_smooth == 0 and self.grad_smooth == 0),
                "--feat-smooth and --grad-smooth need --pipeline",
            ),
            (
                self.sparse_features in ("auto", "on", "off"),
                "--sparse-features must be auto, on or off",
            ),
            (self.dtype in ("float32", "float64"), "--dtype must be float32 or float64"),
            (not self.resume or self.checkpoint_dir, "--resume needs --checkpoint-dir"),
            (
                self.threads_per_rank is None or self.threads_per_rank >= 1,
                "--threads-per-rank must be at least 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        validate_specs(self.hook)
        return self


_FLAG_HELP = {
    "partition_dir": "partition directory made by `bns-pipe partition`",
    "backend": "process-group backend (auto: nccl with CUDA, else gloo)",
    "device": "auto, cpu or cuda",
    "threads_per_rank": "intra-op threads per rank (default: cores / local ranks)",
    "model": "gcn, sage or gat",
    "layers": "number of graph convolution layers",
    "hidden": "hidden width (GAT: the total over its heads)",
    "heads": "GAT attention heads of each hidden layer (--hidden split evenly; output: one)",
    "dropout": "dropout probability before every layer (GAT: of attention coefficients too)",
    "norm": "none, layer or batch (batch statistics synchronised across ranks)",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "epochs": "training epochs",
    "seed": "model initialisation and dropout seed (the graph uses --data-seed)",
    "eval_every": "evaluate every N epochs (0: only at the end)",
    "metric": "model-selection metric: auto (OGB's for ogbn-*, f1 if multilabel, else "
    "accuracy), accuracy, rocauc or f1 (macro; micro if multilabel)",
    "metrics_jsonl": "write metrics as JSON lines to this file (rank 0)",
    "checkpoint_dir": "directory for checkpoints",
    "checkpoint_every": "checkpoint every N epochs (0: only at the end and on SIGTERM)",
    "keep_checkpoints": "keep the newest N checkpoints (0: all)",
    "resume": "resume from the newest complete checkpoint in --checkpoint-dir",
    "init_from": "start from the model of this checkpoint (directory or model.pt) or "
    "compressed file, with a fresh optimiser at epoch 0 (fine-tuning)",
    "sampling_rate": "BNS: keep each boundary node with this probability per epoch (1: all)",
    "bns_norm": "BNS normalisation: unbiased (kept halo rows x 1/p) or renorm (sampled "
    "degree); GAT's softmax always runs over the kept neighbours",
    "pipeline": "PipeGCN: use last epoch's halo features and gradients; transfers run hidden",
    "feat_smooth": "pipeline: moving-average factor of the stale halo features (0: off)",
    "grad_smooth": "pipeline: moving-average factor of the stale halo gradients (0: off)",
    "use_pp": "precompute the first layer's aggregation once (raw features never travel)",
    "normalize_features": "divide each node's features by their sum (Kipf & Welling)",
    "sparse_features": "first layer reads x as a sparse matrix: auto (<= 10 %% nonzero), on, off",
    "inductive": "train on the subgraph induced by training nodes; evaluate on the full graph",
    "hook": "layer hook NAME[:key=value,...] (repeatable)",
    "dtype": "float32, or float64 for verification",
    "timeout": "seconds a collective may wait for a peer before the run fails",
    "progress": "hide the progress bar (shown on rank 0 by default)",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field (defaults are filled in by ``from_args``)."""
    parser.add_argument("--config", help="TOML file with the same options (flags override)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": None, "help": _FLAG_HELP[f.name], "dest": f.name}
        if f.type == "bool":
            if f.default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"), action="store_false", **kwargs
                )
            else:
                parser.add_argument(flag, action="store_true", **kwargs)
        elif f.name == "hook":
            parser.add_argument(flag, action="append", **kwargs)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            parser.add_argument(flag, type=kind, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the TOML file of ``--config`` and the flags given."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(read_toml(args.config))
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values).validate()


def to_toml(values: dict) -> str:
    """A flat TOML document of ``values`` (None values left out), as ``--config`` reads."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        if not isinstance(value, bool | int | float | str | list):
            raise ConfigError(f"option {key}={value!r} cannot be written to a config file")
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def read_toml(path: str | Path) -> dict:
    """Options from a TOML file, keys normalised to field names; unknown keys are errors."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {unknown}")
    return values
