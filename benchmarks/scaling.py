"""Scaling study: synthetic graphs from 100k to 2.4M nodes (ogbn-products' node count) on 4
ranks, and a per-rank memory model checked against the measurements.

For every size: METIS partitioning (wall time and the partitioner's peak RSS, the one
process that holds the whole graph), then vanilla and BNS p = 0.1 training (3 layers, hidden
128, 128 features): epoch time, start-up memory and peak memory per rank.

The memory model is linear in what each rank holds (the partition manifest's counts):

    start-up = c0 + a_s · n_inner + e_s · edges
    peak     = start-up + a_g · n_inner + b_g · p · n_halo + e_g · edges

(``edges``: the rank's adjacency entries; ``n_halo``: its halo nodes, of which BNS keeps p).
The coefficients are bytes per node or edge at F = 128, hidden 128, 3 layers (ogbn-papers100M
has F = 128 too), fitted by least squares to every rank of the runs of up to 1M nodes here
and in ``bns.json``; the 2.4M runs are held out to check the prediction. The fitted model then
predicts per-rank memory for ogbn-papers100M on N ranks, and where this machine runs out.

    python benchmarks/scaling.py [--sizes 100k 300k 1m 2.4m] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe, finish  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from benchmarks.modes import SYNTHETIC, log, run  # noqa: E402
from bns_pipe.bench.suite import run_checked  # noqa: E402
from bns_pipe.paths import cache_dir  # noqa: E402

# name → (nodes, average degree): the degree-16 series, and two graphs as dense as
# ogbn-products (degree 50) so that per-node and per-edge memory can be told apart
SIZES = {
    "100k": (100_000, 16),
    "300k": (300_000, 16),
    "1m": (1_000_000, 16),
    "2.4m": (2_400_000, 16),
    "300k-d50": (300_000, 50),
    "1m-d50": (1_000_000, 50),
}
WORLD = 4
MODES = {"vanilla": ["--sampling-rate", "1"], "bns-0.1": ["--sampling-rate", "0.1"]}
FIT_MAX_NODES = 1_000_000
GIB = 2**30
# ogbn-papers100M (OGB): nodes, directed adjacency entries after symmetrisation (2 x 1.6B)
PAPERS = {"nodes": 111_059_956, "edges": 2 * 1_615_685_872}


def partition(size: str) -> tuple[Path, dict]:
    """Partition once (cached); the wall time and peak RSS of the partitioning process."""
    out = cache_dir("bench-partitions") / f"synthetic-{size}-{WORLD}-metis"
    stats_file = out / "partition_stats.json"
    if not stats_file.exists():
        log(f"partitioning {size} into {WORLD} (metis) ...")
        nodes, degree = SIZES[size]
        flags = ["--dataset", "synthetic", "--num-nodes", str(nodes), "--avg-degree", str(degree)]
        flags += SYNTHETIC
        rss = cache_dir("bench-runs") / "partition_rss_kib"
        rss.parent.mkdir(parents=True, exist_ok=True)
        command = ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "bns_pipe"]
        command += ["partition", *flags, "--parts", str(WORLD), "--method", "metis"]
        start = time.perf_counter()
        run_checked([*command, "--out", str(out), "--overwrite"])
        seconds = time.perf_counter() - start
        peak = int(rss.read_text().split()[-1]) * 1024
        stats_file.write_text(json.dumps({"partition_s": seconds, "partition_peak_bytes": peak}))
    return out, json.loads(stats_file.read_text())


def rank_points(manifest: dict, run: dict, p: float) -> list[dict]:
    """One point per rank: its counts and its measured start-up and peak memory."""
    return [
        {
            "n_inner": part["inner"],
            "n_halo": part["halo"],
            "edges": part["edges"],
            "p": p,
            "startup": startup,
            "peak": peak,
        }
        for part, startup, peak in zip(
            manifest["parts"],
            run["startup_mem_bytes_per_rank"],
            run["peak_mem_bytes_per_rank"],
            strict=True,
        )
    ]


def features(point: dict, which: str) -> list[float]:
    if which == "startup":
        return [1.0, point["n_inner"], point["edges"]]
    return [point["n_inner"], point["p"] * point["n_halo"], point["edges"]]


def fit(points: list[dict]) -> dict:
    """Least-squares coefficients of the start-up and growth models."""
    coef = {}
    for which, target in (("startup", "startup"), ("growth", None)):
        a = torch.tensor([features(q, which) for q in points], dtype=torch.float64)
        y = torch.tensor(
            [q[target] if target else q["peak"] - q["startup"] for q in points],
            dtype=torch.float64,
        )
        coef[which] = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    return coef


def predict(coef: dict, point: dict) -> tuple[float, float]:
    """(start-up, peak) bytes for a rank with ``point``'s counts."""
    startup, growth = (
        sum(c * f for c, f in zip(coef[which], features(point, which), strict=True))
        for which in ("startup", "growth")
    )
    return startup, startup + growth


def bns_points() -> list[dict]:
    """Rank points of the BNS suite (bns.json) on cached partitions whose manifests exist."""
    path = ROOT / "benchmarks" / "results" / "bns.json"
    points = []
    for r in json.loads(path.read_text())["runs"] if path.exists() else []:
        manifest = cache_dir("bench-partitions") / f"{r['graph']}-{r['world']}-{r['partition']}"
        if not r["graph"].startswith("synthetic") or not (manifest / "manifest.json").exists():
            continue
        p = float(r["mode"].removeprefix("p="))
        points += rank_points(json.loads((manifest / "manifest.json").read_text()), r, p)
    return points


def papers_table(coef: dict, halo_ratios: tuple[float, float]) -> list[dict]:
    """Predicted per-rank peak memory for ogbn-papers100M on N ranks: vanilla with the lowest
    and highest halo / inner ratio measured here, BNS p = 0.1 with the highest."""
    rows = []
    for n in (8, 16, 32, 64, 128):
        inner = PAPERS["nodes"] / n
        row = {"ranks": n}
        for name, ratio, p in (
            ("vanilla_low_halo", halo_ratios[0], 1.0),
            ("vanilla_high_halo", halo_ratios[1], 1.0),
            ("bns-0.1_high_halo", halo_ratios[1], 0.1),
        ):
            point = {"n_inner": inner, "n_halo": ratio * inner, "edges": PAPERS["edges"] / n}
            row[name] = predict(coef, {**point, "p": p})[1]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after 1 warm-up)")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the JSON's runs"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json"
    )
    args = parser.parse_args()
    machine = describe()
    tmp = cache_dir("bench-runs")
    tmp.mkdir(parents=True, exist_ok=True)
    # Runs finished by an earlier invocation are kept (an interrupted study resumes).
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    runs = earlier["runs"]
    if args.report_only:
        report(args.out, earlier["machine"], runs)
        return
    for size in args.sizes:
        part, stats = partition(size)
        manifest = json.loads((part / "manifest.json").read_text())
        for mode, flags in MODES.items():
            if any(r["size"] == size and r["mode"] == mode for r in runs):
                continue
            log(f"{size} {mode} ...")
            result = run(part, [*flags], args.epochs, 1, tmp)
            result.pop("curve")
            p = float(flags[-1])
            runs.append(
                {
                    "size": size,
                    "nodes": SIZES[size][0],
                    "avg_degree": SIZES[size][1],
                    "edges": manifest["num_edges"],
                    "mode": mode,
                    **stats,
                    **result,
                    "points": rank_points(manifest, result, p),
                }
            )
            log(
                f"    {result['epoch_time_s']:.2f} s/epoch, "
                f"peak {result['peak_mem_bytes'] / GIB:.2f} GiB/rank"
            )
            report(args.out, finish(machine), runs)


def report(out: Path, machine: dict, runs: list[dict]) -> None:
    fit_points = bns_points() + [
        q for r in runs if r["nodes"] <= FIT_MAX_NODES for q in r["points"]
    ]
    coef = fit(fit_points)
    for r in runs:
        predicted = [predict(coef, q)[1] for q in r["points"]]
        r["predicted_peak_bytes"] = max(predicted)
        r["held_out"] = r["nodes"] > FIT_MAX_NODES
    metis = [q for r in runs for q in r["points"] if r["mode"] == "vanilla"]
    ratios = [q["n_halo"] / q["n_inner"] for q in metis]
    halo_ratios = (min(ratios), max(ratios))
    result = {
        "machine": machine,
        "world": WORLD,
        "coefficients": coef,
        "fit_points": len(fit_points),
        "halo_ratios": halo_ratios,
        "papers100m": papers_table(coef, halo_ratios),
        "largest_graph": largest_graph(coef, runs, 24 * GIB),
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(out.with_suffix(".png"), runs)


def largest_graph(coef: dict, runs: list[dict], budget: float) -> dict:
    """The largest synthetic graph (this degree, 4 ranks on one machine) whose 4 ranks, and
    separately its partitioner, fit in ``budget`` bytes: both grow linearly with the nodes."""
    series = [r for r in runs if r["mode"] == "vanilla" and r["avg_degree"] == 16]
    big = max(series, key=lambda r: r["nodes"])
    per_node = {
        "edges": sum(q["edges"] for q in big["points"]) / big["nodes"],
        "halo": sum(q["n_halo"] for q in big["points"]) / big["nodes"],
    }

    def ranks_bytes(nodes: float) -> float:
        q = {
            "n_inner": nodes / WORLD,
            "n_halo": per_node["halo"] * nodes / WORLD,
            "edges": per_node["edges"] * nodes / WORLD,
            "p": 1.0,
        }
        return WORLD * predict(coef, q)[1]

    partitioner_per_node = big["partition_peak_bytes"] / big["nodes"]  # linear, from the largest
    lo, hi = 1e5, 1e9
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ranks_bytes(mid) <= budget else (lo, mid)
    return {
        "training_nodes": lo,
        "partitioner_nodes": budget / partitioner_per_node,
        "from_size": big["size"],
    }


def markdown(result: dict) -> str:
    coef = result["coefficients"]
    c0, a_s, e_s = coef["startup"]
    a_g, b_g, e_g = coef["growth"]
    lines = [
        "# Scaling: synthetic 100k → 2.4M nodes on 4 ranks (METIS)",
        "",
        machine_summary(result["machine"]),
        "",
        "3 layers, hidden 128, 128 features, average degree 16 (d50: 50, as ogbn-products); "
        "1 warm-up epoch, medians of the "
        "rest. Memory per rank is the peak RSS of the worst rank; *predicted* is the memory "
        "model's (held-out rows were not used to fit it).",
        "",
        "| graph | edges | mode | partition s | partitioner peak GiB | epoch s | start-up GiB/rank "
        "| peak GiB/rank | predicted GiB/rank | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        peak, predicted = r["peak_mem_bytes"], r["predicted_peak_bytes"]
        held = " (held out)" if r["held_out"] else ""
        lines.append(
            f"| {r['size']} | {r['edges']:,} | {r['mode']} | {r['partition_s']:.0f} "
            f"| {r['partition_peak_bytes'] / GIB:.2f} | {r['epoch_time_s']:.2f} "
            f"| {max(r['startup_mem_bytes_per_rank']) / GIB:.2f} | {peak / GIB:.2f} "
            f"| {predicted / GIB:.2f} | {100 * (predicted - peak) / peak:+.1f} %{held} |"
        )
    limit = result["largest_graph"]
    lines += [
        "",
        "## Memory model (bytes per rank)",
        "",
        f"Fitted to {result['fit_points']} rank measurements (graphs of at most 1M nodes):",
        "",
        f"    start-up = {c0 / 2**20:.0f} MiB + {a_s:.0f} B · n_inner + {e_s:.1f} B · edges",
        f"    peak     = start-up + {a_g:.0f} B · n_inner + {b_g:.0f} B · p · n_halo "
        f"+ {e_g:.1f} B · edges",
        "",
        "For scale: a float32 row of 128 values is 512 B, so the start-up's per-node term is "
        f"{a_s / 512:.1f} such rows (features and the graph's per-node arrays), training adds "
        f"{a_g / 512:.1f} rows per inner node (activations kept for the backward pass of 3 "
        f"layers, their gradients, Adam's inputs) and {b_g / 512:.1f} per kept halo node "
        "(receive and return buffers).",
        "",
        f"This machine (24 GiB): 4 ranks of training fit up to about "
        f"{limit['training_nodes'] / 1e6:.1f}M nodes of this graph; the partitioner (one process "
        f"holding the whole graph) up to about {limit['partitioner_nodes'] / 1e6:.1f}M "
        f"(extrapolated linearly from the {limit['from_size']} run).",
        "",
        "## ogbn-papers100M (111M nodes, 3.2B adjacency entries, 128 features): predicted peak "
        "GiB per rank",
        "",
        "The halo of a rank depends on the partition; the columns use the lowest and highest "
        "halo / inner ratio of the METIS partitions measured here ({:.2f} and {:.2f}).".format(
            *result["halo_ratios"]
        ),
        "",
        "| ranks | vanilla, low halo | vanilla, high halo | BNS p = 0.1, high halo |",
        "|---|---|---|---|",
    ]
    for row in result["papers100m"]:
        lines.append(
            f"| {row['ranks']} | {row['vanilla_low_halo'] / GIB:.1f} "
            f"| {row['vanilla_high_halo'] / GIB:.1f} | {row['bns-0.1_high_halo'] / GIB:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        for degree, style in ((16, "o-"), (50, "s:")):
            rows = [r for r in runs if r["mode"] == mode and r["avg_degree"] == degree]
            rows.sort(key=lambda r: r["nodes"])
            nodes, label = [r["nodes"] for r in rows], f"{mode}, degree {degree}"
            left.plot(nodes, [r["epoch_time_s"] for r in rows], style, label=label)
            right.plot(nodes, [r["peak_mem_bytes"] / GIB for r in rows], style, label=label)
            model = [r["predicted_peak_bytes"] / GIB for r in rows]
            right.plot(
                nodes,
                model,
                "x",
                color="black",
                label="model" if (mode, degree) == ("vanilla", 16) else None,
            )
    for ax, label in ((left, "epoch time (s)"), (right, "peak memory per rank (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("synthetic graphs on 4 ranks (METIS)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
