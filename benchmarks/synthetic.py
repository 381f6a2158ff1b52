"""Time and peak memory of ``load_dataset("synthetic", ...)`` up to ogbn-products scale.

Each size runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. Graphs
use ogbn-products' shape: ``avg_degree=25``, ``num_features=100``, ``num_classes=47``.

    python benchmarks/synthetic.py                       # 100k, 1M, 2.4M nodes
    python benchmarks/synthetic.py --sizes 100000        # a quick check

Writes ``benchmarks/results/synthetic.json`` and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = (100_000, 1_000_000, 2_400_000)
SHAPE = {"avg_degree": 25.0, "num_features": 100, "num_classes": 47}
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bns_pipe from a checkout


def measure(num_nodes: int) -> dict:
    """Generate one graph in this process; its times, sizes and peak RSS."""
    import numpy as np
    import torch

    from bns_pipe.data.synthetic import synthetic_graph
    from bns_pipe.data.validate import validate_data

    rss_before = _peak_rss_gib()
    start = time.perf_counter()
    raw = synthetic_graph(num_nodes=num_nodes, **SHAPE)
    generated = time.perf_counter()
    data = validate_data(raw, "synthetic")
    validated = time.perf_counter()
    src, dst = data.edge_index.numpy()
    degree = np.bincount(src, minlength=num_nodes)
    return {
        "num_nodes": num_nodes,
        **SHAPE,
        "directed_edges": int(src.size),
        "mean_degree": round(src.size / num_nodes, 2),
        "max_degree": int(degree.max()),
        "isolated_nodes": int((degree == 0).sum()),
        "edge_homophily": round(float((data.y[src] == data.y[dst]).float().mean()), 3),
        "generate_s": round(generated - start, 2),
        "validate_s": round(validated - generated, 2),
        "load_dataset_s": round(validated - start, 2),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        "rss_after_imports_gib": round(rss_before, 2),
        "torch_threads": torch.get_num_threads(),
    }


def machine() -> dict:
    """CPU model, cores, RAM and library versions of this machine."""
    import numpy as np
    import torch

    cpu = "unknown"
    meminfo = Path("/proc/meminfo")
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    total_kib = next(
        int(line.split()[1])
        for line in meminfo.read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(total_kib / 2**20, 1),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Synthetic generator benchmark",
        "",
        f"`python benchmarks/synthetic.py` on {m['cpu_model']} ({m['cpu_cores']} cores, "
        f"{m['ram_gib']} GiB RAM), torch {m['torch']}, numpy {m['numpy']}; load average at "
        f"start {m['load_average_at_start']} (a shared machine: times are upper bounds).",
        f"Shape: {SHAPE}. `load_dataset` time = generate + validate.",
        "",
        "| nodes | directed edges | mean / max degree | homophily | generate s | validate s "
        "| load_dataset s | peak RSS GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['num_nodes']:,} | {r['directed_edges']:,} | {r['mean_degree']} / "
            f"{r['max_degree']:,} | {r['edge_homophily']} | {r['generate_s']} | "
            f"{r['validate_s']} | {r['load_dataset_s']} | {r['peak_rss_gib']} |"
        )
    return "\n".join(lines) + "\n"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, default=RESULTS / "synthetic.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    report = {"machine": machine(), "runs": []}
    for size in args.sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--worker", str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        report["runs"].append(json.loads(child.stdout.splitlines()[-1]))
        print(json.dumps(report["runs"][-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
