"""The gold test: distributed training equals single-process full-graph training.

For world sizes 1, 2 and 4, on Cora and a synthetic graph, GCN, SAGE and GAT (4 heads) with
LayerNorm: the logits and weight gradients of the first step equal those of a single-process
model built from PyG's own ``GCNConv``/``SAGEConv``/``GATConv`` with the same initial weights,
and the losses of five Adam epochs agree. Computed in float64 so the tolerance is tight.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_geometric.nn as pyg
from torch import nn
from torch_geometric.utils import subgraph

from bns_pipe.data import load_dataset
from bns_pipe.partition import partition
from bns_pipe.train.config import TrainConfig
from tests.distributed import run_ranks

EPOCHS = 5
BASE = {"layers": 3, "hidden": 16, "norm": "layer", "dropout": 0.0, "lr": 0.01, "seed": 7}


class ReferenceGNN(nn.Module):
    """The same architecture from PyG layers, parameter names matching ``bns_pipe.nn.GNN``."""

    def __init__(self, model: str, dims: list[int], heads: int = 1) -> None:
        super().__init__()
        if model == "gat":  # heads concatenated in hidden layers, one head at the output
            self.convs = nn.ModuleList(
                pyg.GATConv(a, b // heads, heads=heads) for a, b in itertools.pairwise(dims[:-1])
            )
            self.convs.append(pyg.GATConv(dims[-2], dims[-1], concat=False))
        else:
            conv = pyg.GCNConv if model == "gcn" else pyg.SAGEConv
            self.convs = nn.ModuleList(conv(a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[1:-1])
        self.activation = F.elu if model == "gat" else torch.relu

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.norms):
                x = self.activation(self.norms[i](x))
        return x


def run_cases(rank: int, world: int, cases: list[tuple[TrainConfig, Path]]) -> None:
    """One rank: for each (config, out) train EPOCHS epochs and save what the tests compare."""
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed("gloo", "cpu", 1, 60)
    for config, out in cases:
        trainer = Trainer(config, ctx)
        loss, logits, _ = trainer.forward_backward(0)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        losses = [trainer._sum(loss.reshape(1))]
        trainer.optimizer.step()
        for epoch in range(1, EPOCHS):
            losses.append(trainer._sum(trainer.train_step(epoch)["loss"].reshape(1)))
        trainer.model.eval()
        view = trainer.eval_view
        with torch.no_grad():
            eval_logits = trainer.model(view.graph, view.x, precomputed=view.precomputed)
        torch.save(
            {
                "ids": trainer.view.graph.global_ids,
                "logits": logits,
                "grads": grads,
                "losses": torch.cat(losses),
                "eval_ids": view.graph.global_ids,
                "eval_logits": eval_logits,
            },
            out / f"rank_{rank}.pt",
        )
    shutdown()


def run_world(
    world: int, cases: list[tuple[str, dict]], tmp: Path, worker=run_cases
) -> dict[str, list[dict]]:
    """Partition each case's dataset into ``world`` parts, run every case in one spawn.

    ``cases``: (dataset name, TrainConfig options). Returns each case's per-rank results,
    keyed ``"<name>/<index>"``. ``worker``: :func:`run_cases`, or a function of a module the
    ranks must import (e.g. one registering test hooks) that calls it.
    """
    jobs, keys = [], []
    for index, (name, options) in enumerate(cases):
        part_dir = tmp / f"{name}-{world}"
        if not part_dir.exists():
            partition(gold_dataset(name), world, part_dir, verbose=False)
        out = tmp / f"{name}-{world}-{index}"
        out.mkdir()
        config = TrainConfig(
            partition_dir=str(part_dir), dtype="float64", progress=False, **{**BASE, **options}
        )
        jobs.append((config, out))
        keys.append(f"{name}/{index}")
    run_ranks(worker, world, jobs, timeout=300)
    return {
        key: [torch.load(out / f"rank_{r}.pt", weights_only=True) for r in range(world)]
        for key, (_, out) in zip(keys, jobs, strict=True)
    }


def reference_run(
    data,
    model: str,
    layers: int,
    hidden: int,
    init: dict,
    lr: float,
    inductive: bool = False,
    heads: int = 1,
):
    """Single-process full-graph training with PyG layers.

    Returns the first step's logits and gradients, the losses, and the eval-mode logits on the
    full graph after training. ``inductive`` trains on the subgraph induced by training nodes.
    """
    dims = [data.x.size(1)] + [hidden] * (layers - 1) + [data.num_classes]
    ref = ReferenceGNN(model, dims, heads).double()
    ref.load_state_dict(init)
    optimizer = torch.optim.Adam(ref.parameters(), lr=lr)
    x, y, mask, edge_index = data.x.double(), data.y, data.train_mask, data.edge_index
    if inductive:
        edge_index, _ = subgraph(mask, edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
        x, y, mask = x[mask], y[mask], torch.ones(int(mask.sum()), dtype=torch.bool)
    losses, first = [], None
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        logits = ref(x, edge_index)
        loss = F.cross_entropy(logits[mask], y[mask])
        loss.backward()
        if first is None:
            first = logits.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()}
        losses.append(loss.detach())
        optimizer.step()
    with torch.no_grad():
        eval_logits = ref(data.x.double(), data.edge_index)
    return first[0], first[1], torch.stack(losses), eval_logits


def initial_state(
    data, model: str, layers: int, hidden: int, seed: int, norm: str = "layer", heads: int = 1
) -> dict:
    from bns_pipe.nn.model import GNN

    torch.manual_seed(seed)
    gnn = GNN(
        data.x.size(1), hidden, data.num_classes, layers=layers, conv=model, norm=norm, heads=heads
    )
    return {k: v.double() for k, v in gnn.state_dict().items()}


@functools.cache
def gold_dataset(name: str):
    if name == "synthetic":
        data = load_dataset("synthetic", num_nodes=3000, num_features=32, num_classes=5)
    else:
        root = os.environ.get("BNS_PIPE_DATA")
        if not root:
            pytest.skip("BNS_PIPE_DATA is not set: no root holds Cora")
        data = load_dataset("cora", root=root)
    return data


MODELS = [{"model": "gcn"}, {"model": "sage"}, {"model": "gat", "heads": 4}]
CASES = [(name, options) for name in ("cora", "synthetic") for options in MODELS]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def gold_world(request, tmp_path_factory) -> dict[str, list[dict]]:
    """Every case for one world size, run in a single spawn of ranks."""
    world = request.param
    runnable = [(i, case) for i, case in enumerate(CASES) if _has_data(case[0])]
    runs = run_world(world, [case for _, case in runnable], tmp_path_factory.mktemp(f"g{world}"))
    return {f"{CASES[i][0]}/{i}": runs[f"{CASES[i][0]}/{k}"] for k, (i, _) in enumerate(runnable)}


def _has_data(name: str) -> bool:
    return name == "synthetic" or bool(os.environ.get("BNS_PIPE_DATA"))


@pytest.mark.parametrize(
    "index", range(len(CASES)), ids=lambda i: "-".join([CASES[i][0], CASES[i][1]["model"]])
)
def test_distributed_equals_single_process(gold_world, index: int) -> None:
    name, options = CASES[index]
    if not _has_data(name):
        pytest.skip("BNS_PIPE_DATA is not set: no root holds Cora")
    data = gold_dataset(name)
    runs = gold_world
    check_against_reference(data, runs[f"{name}/{index}"], **options)


def check_against_reference(
    data, results: list[dict], model: str, inductive: bool = False, heads: int = 1, **unused
) -> None:
    """Compare every rank's outputs with the single-process PyG run, to float64 precision."""
    layers, hidden, lr, seed = BASE["layers"], BASE["hidden"], BASE["lr"], BASE["seed"]
    init = initial_state(data, model, layers, hidden, seed, heads=heads)
    logits, grads, losses, eval_logits = reference_run(
        data, model, layers, hidden, init, lr, inductive, heads
    )
    train_ids = data.train_mask.nonzero().squeeze(1) if inductive else None
    for r in results:
        # Inductive ranks report train-view logits by global id; the reference is relabelled.
        ids = r["ids"] if train_ids is None else torch.searchsorted(train_ids, r["ids"])
        torch.testing.assert_close(r["logits"], logits[ids], rtol=1e-9, atol=1e-10)
        for name_, grad in grads.items():
            torch.testing.assert_close(r["grads"][name_], grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(r["losses"], losses, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(
            r["eval_logits"], eval_logits[r["eval_ids"]], rtol=1e-9, atol=1e-10
        )
