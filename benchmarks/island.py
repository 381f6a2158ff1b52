"""Islandization (``--hook island``): pruned additions, aggregation and epoch time, preprocessing.

Per dataset (``synthetic``: 100k nodes, ``synthetic-1m``: 1M, both degree 16 and 128
features), side by side in this script:

1. on 1 and 4 METIS parts, every part's islands, hubs and ``pruned_fraction`` with
   ``redundancy=on`` (what the structure removes; I-GCN reports 38 % on average, HAG 33-84 %)
   and the hook's load time (island search, renumbering, pair merging);
2. one process (1 part): the GCN inner aggregation at the hidden width, forward ``A x`` plus
   backward ``Aᵀ g``, plain (our CSR product with the self-loop diagonal) against the
   redundancy-free structure, and the epoch time of ``benchmarks/train.py``'s model (3 layers,
   hidden 128) without the hook, with ``--hook island`` (``redundancy=auto``, the default:
   it keeps the structure only where it pays) and with ``redundancy=on``;
3. 4 ranks (``bns-pipe train`` subprocesses): epoch time without and with the hook;
4. preprocessing against a 200-epoch run (one process).

    python benchmarks/island.py [--datasets cora,...] [--epochs 5] [--out DIR]

Writes ``DIR/island.json`` and ``DIR/island.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe, finish  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from benchmarks.machine_floor import HIDDEN, timed  # noqa: E402
from benchmarks.train import log, one_process_trainer, ranks_run  # noqa: E402
from bns_pipe.data import load_dataset  # noqa: E402
from bns_pipe.graph import LocalGraph  # noqa: E402
from bns_pipe.hooks.island import IslandHook  # noqa: E402
from bns_pipe.memory import keep_freed_memory  # noqa: E402
from bns_pipe.partition import load_partition, partition  # noqa: E402

DATASETS = [
    "cora",
    "citeseer",
    "coauthor-cs",
    "coauthor-physics",
    "amazon-computers",
    "synthetic",
    "synthetic-1m",
]
SYNTHETIC = {"num_features": 128, "num_classes": 8}
SYNTHETIC_NODES = {"synthetic": 100_000, "synthetic-1m": 1_000_000}
PAPERS = "I-GCN 38 % on average; HAG 33-84 %"


def load(name: str):
    if name in SYNTHETIC_NODES:
        options = {**SYNTHETIC, "num_nodes": SYNTHETIC_NODES[name]}
        return load_dataset("synthetic", **options), {"name": "synthetic", "options": options}
    return load_dataset(name), {"name": name, "options": {}}


def parts_report(part_dir: str, n_parts: int, full: bool = False) -> list[dict]:
    """The hook's report (``redundancy=on``) of every part, its GCN structure built; at the
    defaults (n_inner / 16 aggregation nodes, each of a pair shared by at least 4 rows) or,
    ``full``, the most the greedy prunes (n_inner nodes, pairs of at least 2 rows)."""
    reports = []
    for rank in range(n_parts):
        part = load_partition(part_dir, rank)
        options = {"capacity": str(part.n_inner), "min_share": "2"} if full else {}
        hook = IslandHook(redundancy="on", **options)
        part = hook.on_graph(part)
        graph = LocalGraph(part, hooks=[hook])
        graph.inner["gcn"](torch.zeros(part.n_inner, 1))  # builds the structure
        reports.append(hook.report())
    return reports


def aggregation_s(part_dir: str, width: int, repeats: int = 5) -> dict:
    """Forward + backward seconds of the GCN inner aggregation, plain and redundancy-free."""
    part = load_partition(part_dir, 0)
    hook = IslandHook(redundancy="on")
    hooked = LocalGraph(hook.on_graph(part), hooks=[hook]).inner["gcn"]
    plain = LocalGraph(part).inner["gcn"]
    x = torch.randn(part.n_inner, width)
    times = {}
    for name, op in (("plain", plain), ("island", hooked)):
        times[name] = min(timed(lambda op=op: op.transposed(op(x)), repeats, 1))
    return times


def epoch_s(part_dir: str, hook: list[str], epochs: int) -> float:
    """Median epoch seconds of the one-process trainer (GCN) with ``hook``."""
    with one_process_trainer(part_dir, "gcn", hook=hook) as trainer:
        counter = iter(range(10**9))
        return statistics.median(timed(lambda: trainer.train_step(next(counter)), epochs, 2))


def bench_dataset(name: str, epochs: int, tmp: Path) -> dict:
    data, spec = load(name)
    row: dict = {"nodes": data.num_nodes, "edges": data.num_edges}
    dirs = {}
    for k in (1, 4):
        dirs[k] = str(tmp / f"{name}-p{k}")
        partition(data, k, dirs[k], dataset=spec, verbose=False)
        log(f"{name}: islands on {k} part(s)")
        reports = parts_report(dirs[k], k)
        row[f"parts_{k}"] = reports
        row[f"pruned_{k}"] = statistics.mean(r["pruned_fraction"] for r in reports)
    row["pruned_n_1"] = parts_report(dirs[1], 1, full=True)[0]["pruned_fraction"]
    log(f"{name}: aggregation and epochs, one process")
    row["aggregation_s"] = aggregation_s(dirs[1], HIDDEN)
    start = time.perf_counter()
    IslandHook().on_graph(load_partition(dirs[1], 0))
    row["island_search_s"] = time.perf_counter() - start
    row["epoch_s"] = {
        "plain": epoch_s(dirs[1], [], epochs),
        "island": epoch_s(dirs[1], ["island"], epochs),
        "island_on": epoch_s(dirs[1], ["island:redundancy=on"], epochs),
    }
    preprocess = row["parts_1"][0]["preprocess_s"]
    row["preprocess_over_200_epochs"] = preprocess / (200 * row["epoch_s"]["plain"])
    log(f"{name}: 4 ranks")
    row["ranks_4"] = {}
    for label, flags in (("plain", ()), ("island", ("--hook", "island"))):
        runs = tmp / f"{name}-{label}"
        runs.mkdir()
        row["ranks_4"][label] = ranks_run(dirs[4], "gcn", epochs, runs, flags)["epoch_time_s"]
    return row


def markdown(results: dict) -> str:
    rows = results["datasets"]
    lines = [
        "# Islandization (`--hook island`)",
        "",
        f"`python benchmarks/island.py`; GCN, 3 layers, hidden {HIDDEN}; "
        f"{machine_summary(results['machine'])}",
        "",
        f"Pruned additions (`redundancy=on`, mean over parts; {PAPERS}), the inner "
        "aggregation forward + backward at width 128 (one process), epoch seconds (one "
        "process: plain, `island` = redundancy=auto, `island:redundancy=on`; 4 ranks: plain, "
        "`island`) and the hook's load time against a 200-epoch run:",
        "",
        "| dataset | pruned 1 part | pruned 4 parts | pruned 1 part, capacity n, min_share 2 | "
        "aggregation plain / island ms | epoch plain / auto / on s | 4 ranks plain / island s "
        "| preprocess / 200 epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        agg, ep, four = r["aggregation_s"], r["epoch_s"], r["ranks_4"]
        lines.append(
            f"| {name} | {r['pruned_1']:.3f} | {r['pruned_4']:.3f} | {r['pruned_n_1']:.3f} | "
            f"{agg['plain'] * 1e3:.1f} / {agg['island'] * 1e3:.1f} | "
            f"{ep['plain']:.3f} / {ep['island']:.3f} / {ep['island_on']:.3f} | "
            f"{four['plain']:.3f} / {four['island']:.3f} | "
            f"{r['preprocess_over_200_epochs']:.1%} |"
        )
    mean = statistics.mean(r["pruned_1"] for r in rows.values())
    full = statistics.mean(r["pruned_n_1"] for r in rows.values())
    lines += [
        "",
        f"Mean pruned fraction over these datasets (1 part): {mean:.3f} at the default "
        f"options (n/16 aggregation nodes, min_share 4), {full:.3f} at capacity n, min_share 2.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    keep_freed_memory()
    machine = describe()
    results: dict = {"datasets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            row = results["datasets"][name] = bench_dataset(name, args.epochs, Path(tmp))
            log(json.dumps({name: {k: v for k, v in row.items() if not k.startswith("parts_")}}))
            results["machine"] = finish(machine)  # written after every dataset
            (args.out / "island.json").write_text(json.dumps(results, indent=1))
            (args.out / "island.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
