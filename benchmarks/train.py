"""Training speed: ours against PyTorch Geometric and against the machine's floor.

Side by side in one script, on one synthetic graph (default 100k nodes, average degree 16,
128 features, 8 classes) and one model (3 layers, hidden 128, dropout 0.5):

1. the machine floor: measured GEMM rate, CSR-product time and memory bandwidth, combined
   into the time one epoch of this model cannot beat;
2. single-process epoch time of ours, PyG with ``edge_index`` and PyG with a CSR ``adj_t``
   (its fastest CPU path), GCN and SAGE, all in this process with the same threads;
3. ours on 1, 2 and 4 ranks (``bns-pipe train`` subprocesses): epoch time and breakdown.

    python benchmarks/train.py [--quick] [--out benchmarks/results/train.json]
    python benchmarks/train.py --dataset coauthor-cs   # a stored graph ($BNS_PIPE_DATA)
    python benchmarks/train.py --num-nodes 1000000 --out benchmarks/results/train-1m.json

With sparse input features (bag of words, at most 10 % nonzero) our first layer reads them as
a CSR (:mod:`bns_pipe.nn.features`), and so does the floor: that layer's ``X Wᵀ`` and ``Xᵀ G``
count as sparse products measured with the features' own pattern, not as dense GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_geometric.transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe, finish  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from benchmarks.machine_floor import (  # noqa: E402
    DROPOUT,
    HIDDEN,
    LAYERS,
    floor_epoch_s,
    graph_shape,
    timed,
)
from bns_pipe.bench.pyg_run import PygModel  # noqa: E402
from bns_pipe.bench.suite import read_run, run_checked, summarise  # noqa: E402
from bns_pipe.data import load_dataset  # noqa: E402
from bns_pipe.graph import LocalGraph  # noqa: E402
from bns_pipe.memory import keep_freed_memory  # noqa: E402
from bns_pipe.partition import load_partition, partition  # noqa: E402
from bns_pipe.train.config import TrainConfig  # noqa: E402
from bns_pipe.train.distributed import init_distributed, shutdown  # noqa: E402
from bns_pipe.train.trainer import Trainer  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# -- single process: ours and PyG ----------------------------------------------------------


def pyg_epochs(
    data, model: str, form: str, epochs: int, warmup: int, heads: int = 1
) -> list[float]:
    torch.manual_seed(0)
    dims = [data.x.size(1)] + [HIDDEN] * (LAYERS - 1) + [data.num_classes]
    net = PygModel(model, dims, DROPOUT, heads)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    if form == "csr":
        adj = T.ToSparseTensor(layout=torch.sparse_csr)(data.clone()).adj_t
    else:
        adj = data.edge_index
    mask = data.train_mask

    def step() -> None:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(data.x, adj)[mask], data.y[mask])
        loss.backward()
        optimizer.step()

    return timed(step, epochs, warmup)


@contextlib.contextmanager
def one_process_trainer(part_dir: str, model: str, **options) -> Iterator[Trainer]:
    """Our trainer for this benchmark's model on a one-part partition, in this process;
    ``options``: further :class:`TrainConfig` fields (e.g. GAT's ``heads``)."""
    config = TrainConfig(
        partition_dir=part_dir,
        model=model,
        layers=LAYERS,
        hidden=HIDDEN,
        dropout=DROPOUT,
        progress=False,
        threads_per_rank=torch.get_num_threads(),
        **options,
    )
    ctx = init_distributed("gloo", "cpu", config.threads_per_rank)
    try:
        yield Trainer(config, ctx)
    finally:
        shutdown()


def ours_epochs(part_dir: str, model: str, epochs: int, warmup: int, **options) -> list[float]:
    with one_process_trainer(part_dir, model, **options) as trainer:
        counter = iter(range(10**9))
        return timed(lambda: trainer.train_step(next(counter)), epochs, warmup)


# -- ours on several ranks -----------------------------------------------------------------


def partitions(data, graph: dict, tmp: Path) -> dict[int, str]:
    """METIS partitions of ``data`` (``graph`` its options) into 1, 2 and 4 parts under
    ``tmp``."""
    parts = {}
    name = graph.get("dataset", "synthetic")
    dataset = {"name": name, "options": graph if name == "synthetic" else {}}
    for k in (1, 2, 4):
        parts[k] = str(tmp / f"p{k}")
        partition(data, k, parts[k], dataset=dataset, verbose=False)
    return parts


def ranks_run(part_dir: str, model: str, epochs: int, tmp: Path, flags: tuple = ()) -> dict:
    metrics = tmp / f"{Path(part_dir).name}-{model}.jsonl"
    command = [
        sys.executable,
        "-m",
        "bns_pipe",
        "train",
        "--partition-dir",
        part_dir,
        "--model",
        model,
        "--layers",
        str(LAYERS),
        "--hidden",
        str(HIDDEN),
        "--dropout",
        str(DROPOUT),
        "--epochs",
        str(epochs + 3),
        "--eval-every",
        "0",
        "--no-progress",
        "--metrics-jsonl",
        str(metrics),
        *flags,
    ]
    run_checked(command)
    return summarise(read_run(metrics), warmup=3)


def add_graph_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The synthetic graph's flags, ``--epochs``, ``--quick`` and ``--out`` (default ``out``)."""
    parser.add_argument("--num-nodes", type=int, default=100_000)
    parser.add_argument("--avg-degree", type=float, default=16.0)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="20k nodes, 4 epochs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results" / out))


def synthetic_graph(args: argparse.Namespace) -> tuple[dict, object]:
    """The graph's options (``--quick`` applied to ``args``) and the generated graph."""
    if args.quick:
        args.num_nodes, args.epochs = 20_000, 4
    graph = {
        "num_nodes": args.num_nodes,
        "avg_degree": args.avg_degree,
        "num_features": args.num_features,
        "num_classes": 8,
    }
    log(f"generating synthetic graph {graph}")
    return graph, load_dataset("synthetic", **graph)


def load_graph(args: argparse.Namespace) -> tuple[dict, object]:
    """``--dataset``: the synthetic graph of the flags, or a stored graph, with its shape."""
    if args.dataset == "synthetic":
        return synthetic_graph(args)
    log(f"loading {args.dataset}")
    data = load_dataset(args.dataset)
    graph = {
        "dataset": args.dataset,
        "num_nodes": data.num_nodes,
        "avg_degree": round(data.num_edges / data.num_nodes, 1),
        "num_features": data.x.size(1),
        "num_classes": int(data.y.max()) + 1,
    }
    return graph, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_graph_arguments(parser, "train.json")
    parser.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (the flags above) or a stored graph, e.g. coauthor-cs; "
        "results then default to train-<dataset>.json",
    )
    parser.add_argument(
        "--no-edge-index",
        action="store_true",
        help="skip PyG's edge_index path (it holds an edges x features message tensor: "
        "about 9 GB on the 1M graph)",
    )
    args = parser.parse_args()
    if args.dataset != "synthetic" and "--out" not in sys.argv:
        args.out = str(Path(args.out).with_name(f"train-{args.dataset}.json"))
    warmup = 2
    info = describe()
    cpu_cache = keep_freed_memory()  # ours and PyG alike: the same allocator for both
    graph, data = load_graph(args)
    results: dict = {
        "machine": info,
        "graph": graph,
        "model": {"layers": LAYERS, "hidden": HIDDEN, "dropout": DROPOUT},
        "threads": torch.get_num_threads(),
        "cpu_cache": cpu_cache,
    }

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        parts = partitions(data, graph, tmp)
        shape = graph_shape(data, LocalGraph(load_partition(parts[1], 0)).blocks["gcn"][0])
        single = {}
        for model in ("gcn", "sage"):
            log(f"floor ({model})")
            floor = floor_epoch_s(shape, model)
            row = {"floor": floor}
            runs = {
                "ours": lambda m=model: ours_epochs(parts[1], m, args.epochs, warmup),
                "pyg_csr": lambda m=model: pyg_epochs(data, m, "csr", args.epochs, warmup),
                "pyg_edge_index": (
                    lambda m=model: pyg_epochs(data, m, "edge_index", args.epochs, warmup)
                ),
            }
            if args.no_edge_index:
                del runs["pyg_edge_index"]
            for name, run in runs.items():
                log(f"single process: {name} {model}")
                row[name] = summary(run())
            ours = row["ours"]["median_s"]
            row["ratios"] = {
                f"ours_over_{name}": ours / row[name]["median_s"] for name in runs if name != "ours"
            }
            row["ratios"]["ours_over_floor"] = ours / floor["floor_s"]
            single[model] = row
        results["single_process"] = single
        ranks = {}
        for k in (1, 2, 4):
            for model in ("gcn", "sage"):
                log(f"{k} rank(s): {model}")
                ranks[f"{model}-{k}"] = ranks_run(parts[k], model, args.epochs, tmp)
        results["ranks"] = ranks
    write_results(Path(args.out), results, info, markdown)


def write_results(out: Path, results: dict, info: dict, markdown) -> None:
    """Finish the machine description, write ``out`` (JSON) and its ``.md``, print the table."""
    results["machine"] = finish(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    g = results["graph"]
    lines = [
        f"# Training speed ({g.get('dataset', 'synthetic')}: {g['num_nodes']:,} nodes, "
        f"avg degree {g['avg_degree']}, "
        f"{g['num_features']} features; {LAYERS} layers, hidden {HIDDEN}, dropout {DROPOUT})",
        "",
        f"Machine: {machine_summary(results['machine'])} {results['threads']} threads.",
        "",
        "Single process, median epoch seconds (min-max) after warm-up:",
        "",
        "| model | ours | PyG CSR | PyG edge_index | floor | ours/CSR | ours/ei | ours/floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, row in results["single_process"].items():
        ratio = lambda key, r=row["ratios"]: f"{r[key]:.2f}" if key in r else "–"  # noqa: E731
        lines.append(
            f"| {model} | {_cell(row.get('ours'))} | {_cell(row.get('pyg_csr'))} | "
            f"{_cell(row.get('pyg_edge_index'))} | {row['floor']['floor_s']:.3f} | "
            f"{ratio('ours_over_pyg_csr')} | {ratio('ours_over_pyg_edge_index')} | "
            f"{ratio('ours_over_floor')} |"
        )
    return "\n".join(lines + ranks_table(results)) + "\n"


def _cell(run: dict | None) -> str:
    """A run's median (min-max) seconds, or a dash for a run left out."""
    return "–" if run is None else f"{run['median_s']:.3f} ({run['min_s']:.3f}-{run['max_s']:.3f})"


def ranks_table(results: dict) -> list[str]:
    """The Markdown lines of ``results["ranks"]`` (one row per ``ranks_run``)."""
    lines = [
        "",
        f"Ours on K ranks (each with {results['threads']} // K threads), medians:",
        "",
        "| run | epoch s | compute s | comm s | reduce s | comm MiB/epoch | peak MiB (max rank) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["ranks"].items():
        lines.append(
            f"| {name} | {r['epoch_time_s']:.3f} | {r['compute_s']:.3f} | {r['comm_s']:.3f} | "
            f"{r['reduce_s']:.3f} | {r['comm_bytes'] / 2**20:.1f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
