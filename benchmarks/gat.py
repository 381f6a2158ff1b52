"""GAT training speed: ours against PyTorch Geometric's ``GATConv``, side by side.

One synthetic graph (default 100k nodes, average degree 16, 128 features, 8 classes) and one
model (3 GAT layers, hidden 128 as 4 heads of 32, one output head, dropout 0.5 of features
and attention coefficients, ELU), in this process with the same threads:

1. single-process epoch time of ours, PyG ``GATConv`` on ``edge_index`` and on a CSR
   ``adj_t``; the target is ours <= 0.5x PyG's faster path;
2. where our epoch goes: torch.profiler self time per op of one epoch (top ops);
3. ours on 1, 2 and 4 ranks (``bns-pipe train`` subprocesses): epoch time and breakdown.

    python benchmarks/gat.py [--quick] [--out benchmarks/results/gat.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from benchmarks.train import (  # noqa: E402
    DROPOUT,
    HIDDEN,
    LAYERS,
    add_graph_arguments,
    log,
    one_process_trainer,
    ours_epochs,
    partitions,
    pyg_epochs,
    ranks_run,
    ranks_table,
    summary,
    synthetic_graph,
    write_results,
)


def profile_epoch(part_dir: str, heads: int, top: int = 10) -> list[dict]:
    """Self CPU seconds of the ``top`` most expensive ops of one epoch (after a warm-up)."""
    with one_process_trainer(part_dir, "gat", heads=heads) as trainer:
        trainer.train_step(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_step(1)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in ops[:top]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_graph_arguments(parser, "gat.json")
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    warmup, heads = 2, args.heads
    info = describe()
    graph, data = synthetic_graph(args)
    results: dict = {
        "machine": info,
        "graph": graph,
        "model": {"layers": LAYERS, "hidden": HIDDEN, "heads": heads, "dropout": DROPOUT},
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        parts = partitions(data, graph, tmp)
        row = {}
        for name, run in (
            ("ours", lambda: ours_epochs(parts[1], "gat", args.epochs, warmup, heads=heads)),
            ("pyg_csr", lambda: pyg_epochs(data, "gat", "csr", args.epochs, warmup, heads)),
            (
                "pyg_edge_index",
                lambda: pyg_epochs(data, "gat", "edge_index", args.epochs, warmup, heads),
            ),
        ):
            log(f"single process: {name}")
            row[name] = summary(run())
        ours = row["ours"]["median_s"]
        fastest = min(row["pyg_csr"]["median_s"], row["pyg_edge_index"]["median_s"])
        row["ratios"] = {
            "ours_over_pyg_csr": ours / row["pyg_csr"]["median_s"],
            "ours_over_pyg_edge_index": ours / row["pyg_edge_index"]["median_s"],
            "ours_over_pyg_fastest": ours / fastest,
        }
        results["single_process"] = row
        log("profile of one epoch")
        results["profile"] = profile_epoch(parts[1], heads)
        results["ranks"] = {
            f"gat-{k}": ranks_run(parts[k], "gat", args.epochs, tmp, ("--heads", str(heads)))
            for k in (1, 2, 4)
        }
    write_results(Path(args.out), results, info, markdown)


def markdown(results: dict) -> str:
    g, m, row = results["graph"], results["model"], results["single_process"]
    cell = lambda r: f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})"  # noqa: E731
    ratios = row["ratios"]
    lines = [
        f"# GAT training speed ({g['num_nodes']:,} nodes, avg degree {g['avg_degree']}, "
        f"{g['num_features']} features; {m['layers']} layers, hidden {m['hidden']} = "
        f"{m['heads']} heads x {m['hidden'] // m['heads']}, dropout {m['dropout']})",
        "",
        f"Machine: {machine_summary(results['machine'])} {results['threads']} threads.",
        "",
        "Single process, median epoch seconds (min-max) after warm-up (target: ours <= 0.5x "
        "PyG's faster path):",
        "",
        "| ours | PyG GATConv CSR | PyG GATConv edge_index | ours/CSR | ours/ei | ours/fastest |",
        "|---|---|---|---|---|---|",
        f"| {cell(row['ours'])} | {cell(row['pyg_csr'])} | {cell(row['pyg_edge_index'])} | "
        f"{ratios['ours_over_pyg_csr']:.2f} | {ratios['ours_over_pyg_edge_index']:.2f} | "
        f"{ratios['ours_over_pyg_fastest']:.2f} |",
        "",
        "Our epoch by op (torch.profiler self time, one epoch):",
        "",
        "| op | calls | self s |",
        "|---|---|---|",
    ]
    lines += [f"| `{p['op']}` | {p['calls']} | {p['self_s']:.3f} |" for p in results["profile"]]
    return "\n".join(lines + ranks_table(results)) + "\n"


if __name__ == "__main__":
    main()
