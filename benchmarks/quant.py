"""Halo-message quantization (``--hook quant``): bytes, epoch time and its breakdown.

One synthetic graph (default 100k nodes, average degree 16, 128 features, 8 classes), K
partitions (default 4, METIS; ``--method random`` for a communication-heavy cut), the train
benchmark's model (3 layers, hidden 128, dropout 0.5). Each configuration is one
``bns-pipe train`` launch: vanilla, 8/4/2 bits, adaptive widths at a budget of 4 bits, and 4
bits with BNS p = 0.1 and with the pipeline. Reported per configuration: median epoch time
with its parts, ``quantize_s`` and its share of the transfer time it saves (the bytes saved
at this machine's measured all-to-all rate between K local gloo ranks, and at a 10 Gb/s link),
halo bytes per epoch, their ratio to vanilla and to the ideal ratio of the row widths that
travel (``(ceil(F·b/8) + 4) / 4F`` per layer, F the narrow side of each layer), and for the
adaptive run its aggregation-weighted rounding variance against uniform 4 bits.

    python benchmarks/quant.py [--num-nodes N] [--parts K] [--method metis|random] [--out PATH]

The communication-heavy configuration: ``--num-nodes 1000000 --method random``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    ranks_run,
    synthetic_graph,
    write_results,
)
from bns_pipe.hooks.quant import row_bytes  # noqa: E402
from bns_pipe.partition import partition  # noqa: E402

BNS = ("--sampling-rate", "0.1", "--bns-norm", "renorm")
CONFIGS = {  # name → (the bits of the ideal byte ratio or None, flags)
    "vanilla": (None, ()),
    "quant-8": (8, ("--hook", "quant:bits=8")),
    "quant-4": (4, ("--hook", "quant:bits=4")),
    "quant-2": (2, ("--hook", "quant:bits=2")),
    "quant-adaptive-4": (4, ("--hook", "quant:bits=adaptive,budget=4")),
    "bns-0.1": (None, BNS),
    "bns-0.1+quant-4": (4, (*BNS, "--hook", "quant:bits=4")),
    "pipeline": (None, ("--pipeline",)),
    "pipeline+quant-4": (4, ("--pipeline", "--hook", "quant:bits=4")),
}


def travelling_widths(num_features: int, classes: int) -> list[int]:
    """The widths of the halo rows that travel, each transfer once: every layer sends the
    narrower side of its linear map forward, and its gradient backward, except the first
    layer when it aggregates the raw features (they need no gradient)."""
    dims = [num_features] + [HIDDEN] * (LAYERS - 1) + [classes]
    forward = [min(a, b) for a, b in itertools.pairwise(dims)]
    first_backward = dims[1] < dims[0]  # weight-first: x·Wᵀ needs its gradient
    return forward + forward[0 if first_backward else 1 :]


def ideal_ratio(widths: list[int], bits: int) -> float:
    """Quantized bytes over float32 bytes when every transfer carries the same rows."""
    return sum(row_bytes(w, bits) for w in widths) / sum(4 * w for w in widths)


LINK_BYTES_PER_S = 10e9 / 8  # a 10 Gb/s link, one direction
PROBE_BYTES = 64 * 2**20  # what each rank sends in one probe all-to-all


def _probe(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    send = torch.ones(PROBE_BYTES // 4 // world * world)
    received = torch.empty_like(send)
    times = []
    for _ in range(6):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(received, send)
        times.append(time.perf_counter() - start)
    if rank == 0:
        torch.save(torch.tensor(sorted(times[1:])[2]), out)
    dist.destroy_process_group()


def all_to_all_rate(world: int, tmp: Path) -> float:
    """Bytes a second each of ``world`` local gloo ranks sends in an all-to-all (median)."""
    out = str(tmp / "probe.pt")
    port = 29_000 + os.getpid() % 1000
    mp.start_processes(_probe, args=(world, port, out), nprocs=world, start_method="spawn")
    return PROBE_BYTES / float(torch.load(out, weights_only=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_graph_arguments(parser, "quant.json")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--method", choices=("metis", "random"), default="metis")
    args = parser.parse_args()
    info = describe()
    graph, data = synthetic_graph(args)
    widths = travelling_widths(args.num_features, graph["num_classes"])
    results: dict = {
        "machine": info,
        "graph": graph,
        "partition": {"parts": args.parts, "method": args.method},
        "model": {"layers": LAYERS, "hidden": HIDDEN, "dropout": DROPOUT},
        "row_widths": widths,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        part_dir = str(tmp / "parts")
        dataset = {"name": "synthetic", "options": graph}
        partition(data, args.parts, part_dir, method=args.method, dataset=dataset, verbose=False)
        results["all_to_all_bytes_per_s"] = all_to_all_rate(args.parts, tmp)
        for name, (bits, flags) in CONFIGS.items():
            log(f"{args.parts} ranks: {name}")
            (tmp / name).mkdir()
            run = ranks_run(part_dir, "gcn", args.epochs, tmp / name, flags)
            run["ideal_byte_ratio"] = ideal_ratio(widths, bits) if bits else 1.0
            results["runs"][name] = run
    vanilla = results["runs"]["vanilla"]
    for run in results["runs"].values():
        run["byte_ratio"] = run["comm_bytes"] / vanilla["comm_bytes"]
        run["time_ratio"] = run["epoch_time_s"] / vanilla["epoch_time_s"]
        # per rank: comm_bytes is the sum over the K ranks
        saved = (vanilla["comm_bytes"] - run["comm_bytes"]) / results["partition"]["parts"]
        for key, rate in (("local", results["all_to_all_bytes_per_s"]), ("link", LINK_BYTES_PER_S)):
            share = run.get("quantize_s", 0.0) / (saved / rate) if saved > 0 else None
            run[f"quantize_per_saved_{key}"] = share
    write_results(Path(args.out), results, info, markdown)


def markdown(results: dict) -> str:
    g, p = results["graph"], results["partition"]
    lines = [
        f"# Halo quantization ({g['num_nodes']:,} nodes, avg degree {g['avg_degree']}, "
        f"{g['num_features']} features; {p['parts']} {p['method']} parts; "
        f"{LAYERS} layers, hidden {HIDDEN})",
        "",
        f"Machine: {machine_summary(results['machine'])}",
        "",
        f"Rows that travel are {results['row_widths']} wide (forward by layer, then the "
        "gradients). Medians over the epochs after warm-up; `comm` is exposed halo time, "
        "`quantize` the pack + unpack time inside compute (the slowest rank's). `q/saved` is "
        "`quantize` over the transfer time the saved bytes take per rank, at this machine's "
        f"all-to-all rate between {p['parts']} local gloo ranks "
        f"({results['all_to_all_bytes_per_s'] / 2**30:.2f} GiB/s a rank) and on a 10 Gb/s "
        "link; `variance` is the adaptive run's aggregation-weighted rounding variance over "
        "uniform 4 bits' (rank 0's rows).",
        "",
        "| run | epoch s | x vanilla | compute | comm | quantize | q/saved local | q/saved 10 Gb/s "
        "| MiB/epoch | bytes x vanilla | ideal | variance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        variance = r["hooks"].get("quant", {}).get("variance_vs_uniform")
        shares = [r[f"quantize_per_saved_{key}"] for key in ("local", "link")]
        share_cells = " | ".join("–" if v is None or v == 0 else f"{v:.2f}" for v in shares)
        lines.append(
            f"| {name} | {r['epoch_time_s']:.3f} | {r['time_ratio']:.2f} | {r['compute_s']:.3f} "
            f"| {r['comm_s']:.3f} | {r.get('quantize_s', 0.0):.3f} | {share_cells} "
            f"| {r['comm_bytes'] / 2**20:.1f} | {r['byte_ratio']:.3f} "
            f"| {r['ideal_byte_ratio']:.3f} | {'–' if variance is None else f'{variance:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
