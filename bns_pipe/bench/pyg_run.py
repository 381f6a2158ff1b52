"""One single-process PyTorch Geometric training run, timed like ours (a bench baseline).

The same model as ``bns-pipe train`` (GCN or SAGE layers with ReLU, or GAT layers with ELU;
dropout before every layer, Adam) from PyG's own layers, with the graph as ``edge_index`` or
as a CSR ``adj_t`` (PyG's fastest CPU path), on the GPU when one is present (``--device
auto``). Run as ``python -m bns_pipe.bench.pyg_run --dataset NAME --form csr``; it prints
one JSON object: per-epoch seconds, peak memory, validation curve, test accuracy and the
test score in ``--metric`` (chosen on the validation score, as ``bns-pipe train`` does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from bns_pipe.data import add_dataset_arguments, dataset_spec_from_args, load_dataset_spec
from bns_pipe.train.config import METRICS
from bns_pipe.train.distributed import resolve_device
from bns_pipe.train.evaluation import resolve_metric, split_metric
from bns_pipe.train.metrics import memory_now_bytes, peak_memory_bytes, reset_peak_memory

FORMS = ("edge_index", "csr")


class PygModel(nn.Module):
    """``layers`` PyG convolutions (GCN normalisation cached, as a full-graph user would;
    GAT: ``heads`` concatenated heads per hidden layer, one at the output, attention dropout)."""

    def __init__(self, conv: str, dims: list[int], dropout: float, heads: int = 1) -> None:
        super().__init__()
        import torch_geometric.nn as pyg

        def make(a: int, b: int, last: bool) -> nn.Module:
            if conv == "gat":
                h = 1 if last else heads
                return pyg.GATConv(a, b // h, heads=h, concat=not last, dropout=dropout)
            return pyg.GCNConv(a, b, cached=True) if conv == "gcn" else pyg.SAGEConv(a, b)

        pairs = list(itertools.pairwise(dims))
        self.convs = nn.ModuleList(
            make(a, b, i + 1 == len(pairs)) for i, (a, b) in enumerate(pairs)
        )
        self.dropout = dropout
        self.activation = F.elu if conv == "gat" else torch.relu

    def forward(self, x: torch.Tensor, adj) -> torch.Tensor:
        """x (N, in) → logits (N, out)."""
        for i, conv in enumerate(self.convs):
            x = conv(F.dropout(x, self.dropout, self.training), adj)
            if i < len(self.convs) - 1:
                x = self.activation(x)
        return x


def train(data, args: argparse.Namespace) -> dict:
    """Train ``args.epochs`` epochs; evaluate every ``args.eval_every`` (0: at the end)."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device, local_rank=0)
    dims = [data.x.size(1)] + [args.hidden] * (args.layers - 1) + [data.num_classes]
    net = PygModel(args.model, dims, args.dropout, args.heads).to(device)
    data = data.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    if args.form == "csr":
        import torch_geometric.transforms as T

        adj = T.ToSparseTensor(layout=torch.sparse_csr)(data.clone()).adj_t
    else:
        adj = data.edge_index
    startup = memory_now_bytes(device)
    reset_peak_memory(device)
    times, curve, best, best_metric = [], [], (-1.0, 0.0), (-1.0, 0.0)
    metric = resolve_metric(args.metric, args.dataset, False, data.num_classes)
    masks = (data.val_mask.to(device), data.test_mask.to(device))
    elapsed = 0.0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        net.train()
        optimizer.zero_grad()
        logits = net(data.x, adj)
        F.cross_entropy(logits[data.train_mask], data.y[data.train_mask]).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        elapsed += times[-1]
        last = epoch + 1 == args.epochs
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or last:
            net.eval()
            with torch.no_grad():
                logits = net(data.x, adj)
            scores = [_scores(metric, args.dataset, logits, data, m) for m in masks]
            (val_acc, val_metric), (test_acc, test_metric) = scores
            curve.append(
                {"epoch": epoch, "train_s": elapsed, "val_acc": val_acc, "val_metric": val_metric}
            )
            if val_acc > best[0]:
                best = (val_acc, test_acc)
            if val_metric > best_metric[0]:
                best_metric = (val_metric, test_metric)
    return {
        "epoch_times_s": times,
        "peak_mem_bytes_per_rank": [peak_memory_bytes(device)],
        "startup_mem_bytes_per_rank": [startup],
        "curve": curve,
        "best_val_acc": best[0],
        "test_acc": best[1],
        "metric": metric,
        "best_val_metric": best_metric[0],
        "test_metric": best_metric[1],
    }


def _scores(metric: str, dataset: str, logits, data, mask) -> tuple[float, float]:
    """(accuracy, ``metric``) of the nodes of ``mask``, as ``bns-pipe train`` computes them."""
    logits, y = logits[mask], data.y[mask]
    ids = mask.nonzero().squeeze(1)
    accuracy = split_metric("accuracy", dataset, logits, y, ids, multilabel=False)
    if metric == "accuracy":
        return accuracy, accuracy
    return accuracy, split_metric(metric, dataset, logits, y, ids, multilabel=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--form", choices=FORMS, default="csr")
    parser.add_argument("--model", choices=("gcn", "sage", "gat"), default="gcn")
    parser.add_argument("--heads", type=int, default=1, help="GAT heads per hidden layer")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--metric", choices=METRICS, default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    data = load_dataset_spec(dataset_spec_from_args(args), root=args.root)
    if data.y.dim() > 1:
        raise SystemExit("the PyG baseline supports single-label datasets only")
    print(json.dumps(train(data, args)))


if __name__ == "__main__":
    main()
