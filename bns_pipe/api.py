"""The Python API: train from a notebook or a script, and get a plain PyG model back.

    import bns_pipe
    result = bns_pipe.fit(data, parts=4, model="gcn", hidden=64, epochs=200)
    result.final["test_acc"], result.records[-1]["loss"]
    logits = result.model(data.x, data.edge_index)       # torch_geometric.nn layers
    model = bns_pipe.load_model("runs/ckpt/epoch_000200")  # the same from a checkpoint

:func:`fit` validates the PyG ``Data``, partitions it once (cached under a hash of its
content, so two different graphs never share a partition), starts one local worker per part
with torch's elastic launcher, exactly as ``bns-pipe train`` does, and reads the metrics and
the final checkpoint back. A worker's error reaches the caller as a :class:`BnsPipeError` with
the worker's own message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bns_pipe.errors import BnsPipeError, ConfigError
from bns_pipe.nn.features import row_normalize
from bns_pipe.paths import cache_dir
from bns_pipe.train.config import TrainConfig, to_toml


@dataclass
class FitResult:
    """What :func:`fit` hands back: the final metrics object, the per-epoch records, the
    trained model as a PyG module, and the checkpoint it was loaded from."""

    final: dict
    records: list[dict]
    model: nn.Module
    checkpoint: Path


def fit(
    data,
    parts: int = 4,
    *,
    method: str = "metis",
    partition_seed: int = 0,
    partition_obj: str = "cut",
    **options,
) -> FitResult:
    """Train on ``data`` (a PyG ``Data``) split into ``parts`` parts (``method`` "metis" or
    "random"; METIS objective ``partition_obj`` "cut" or "vol"), one local worker per part.

    ``options`` are the :class:`~bns_pipe.train.config.TrainConfig` fields, named as there
    (``model``, ``layers``, ``hidden``, ``epochs``, ``seed``, ``sampling_rate``,
    ``checkpoint_dir``, ...). Without ``checkpoint_dir`` the final checkpoint goes to a fresh
    temporary directory; without ``metrics_jsonl`` the records are read from a temporary file.
    """
    from bns_pipe.data import validate_data
    from bns_pipe.partition import partition
    from bns_pipe.train.checkpoint import newest_complete
    from bns_pipe.train.launch import Launch, launch_workers

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; the options are {sorted(fields)}")
    graph = validate_data(data)
    digest = content_hash(graph)
    name = f"data-{parts}-{method}-{partition_obj}-{partition_seed}-{digest[:16]}"
    directory = cache_dir("partitions", name)
    if not (directory / "manifest.json").exists():
        dataset = {"name": "python", "options": {"sha256": digest}}
        partition(
            graph,
            parts,
            directory,
            method=method,
            seed=partition_seed,
            objective=partition_obj,
            dataset=dataset,
        )
    work = Path(tempfile.mkdtemp(prefix="bns_pipe_fit_"))
    config = TrainConfig(
        **{
            "checkpoint_dir": str(work / "checkpoints"),
            "metrics_jsonl": str(work / "metrics.jsonl"),
            **options,
            "partition_dir": str(directory),
        }
    ).validate()
    config_file = work / "config.toml"
    config_file.write_text(to_toml(dataclasses.asdict(config)))
    launch_workers(Launch(parts, timeout=config.timeout), ["train", "--config", str(config_file)])
    records = [json.loads(line) for line in Path(config.metrics_jsonl).read_text().splitlines()]
    newest = newest_complete(config.checkpoint_dir)
    if newest is None:
        raise BnsPipeError(f"training ended without a checkpoint in {config.checkpoint_dir}")
    return FitResult(
        final=records[-1],
        records=[r for r in records if "epoch" in r],
        model=load_model(newest),
        checkpoint=newest,
    )


def content_hash(data) -> str:
    """SHA-256 of a validated graph's tensors and label attributes."""
    digest = hashlib.sha256()
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        value = getattr(data, key, None)
        if value is not None:
            tensor = value.contiguous().cpu()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    digest.update(f"{data.num_classes}:{data.multilabel}".encode())
    return digest.hexdigest()


class PygGNN(nn.Module):
    """Our GNN built from ``torch_geometric.nn`` layers: ``GCNConv`` / ``SAGEConv`` /
    ``GATConv`` (``heads`` concatenated heads per hidden layer, one at the output), with
    ``LayerNorm`` / ``BatchNorm`` and ReLU (ELU for GAT) between them and dropout before each.

    ``forward(x, edge_index)``: x (N, in_dim), edge_index (2, E) as the loaders give it
    (symmetric, no self-loops) → logits (N, out_dim). With ``normalize_features`` each row of
    x is divided by its sum first, as training did.
    """

    def __init__(self, config: dict, dims: list[int]) -> None:
        super().__init__()
        import torch_geometric.nn as pyg

        self.dropout = float(config["dropout"])
        self.attention = config["model"] == "gat"
        if self.attention:
            heads = int(config.get("heads", 1))
            options = {"dropout": self.dropout}
            self.convs = nn.ModuleList(
                pyg.GATConv(a, b // heads, heads=heads, **options)
                for a, b in itertools.pairwise(dims[:-1])
            )
            self.convs.append(pyg.GATConv(dims[-2], dims[-1], concat=False, **options))
        else:
            conv = {"gcn": pyg.GCNConv, "sage": pyg.SAGEConv}[config["model"]]
            self.convs = nn.ModuleList(conv(a, b) for a, b in itertools.pairwise(dims))
        norm = {
            "none": lambda d: nn.Identity(),
            "layer": lambda d: pyg.LayerNorm(d, mode="node"),  # nn.LayerNorm's math
            "batch": pyg.BatchNorm,
        }
        self.norms = nn.ModuleList(norm[config["norm"]](d) for d in dims[1:-1])
        self.normalize_features = bool(config.get("normalize_features", False))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.normalize_features:
            x = row_normalize(x)
        for layer, conv in enumerate(self.convs):
            x = conv(nn.functional.dropout(x, self.dropout, self.training), edge_index)
            if layer < len(self.norms):
                x = self.norms[layer](x)
                x = nn.functional.elu(x) if self.attention else torch.relu(x)
        return x


def load_model(checkpoint: str | Path) -> nn.Module:
    """The model of a checkpoint (its directory or its ``model.pt``) as a :class:`PygGNN`
    holding the trained weights, in evaluation mode."""
    from bns_pipe.train.checkpoint import read_model_file

    blob = read_model_file(checkpoint)
    config, state = blob["config"], blob["model"]
    layers = int(config["layers"])
    lin = "lin_l" if config["model"] == "sage" else "lin"
    weights = [state[f"convs.{i}.{lin}.weight"] for i in range(layers)]
    dims = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
    model = PygGNN(config, dims).to(weights[0].dtype)
    renamed = {}
    for key, value in state.items():
        if config["norm"] == "batch" and key.startswith("norms."):
            index, name = key.split(".", 2)[1:]
            key = f"norms.{index}.module.{name}"
        renamed[key] = value
    try:
        model.load_state_dict(renamed)
    except RuntimeError as exc:
        raise BnsPipeError(f"checkpoint {checkpoint} does not fit a PyG model: {exc}") from None
    return model.eval()
