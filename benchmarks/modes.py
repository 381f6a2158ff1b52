"""The training modes side by side: vanilla, BNS at several rates, the pipeline, both.

Each configuration is one ``bns-pipe train`` launch on a cached partition; warm-up epochs
are excluded and medians taken over the rest. Reported per run: epoch time and its breakdown
(compute, exposed communication ``comm_s``, hidden communication ``comm_hidden_s``, gradient
all-reduce, sampling), halo bytes per epoch, peak memory per rank during training and its
growth over the memory in use after start-up, and the test accuracy at the end.

Suites:

- ``bns`` (issue 4): 2 and 4 ranks x METIS and random partitions x the synthetic 100k and 1M
  graphs and Coauthor Physics x p in {1, 0.1, 0.01, 0};
- ``pipeline`` (issue 5): vanilla, pipeline (without and with smoothing 0.95), BNS p = 0.1,
  pipeline + BNS p = 0.1 on 2 ranks x 1 thread and on 4 ranks, for the BNS suite's 100k
  configurations plus a communication-heavy one (random partition, hidden 256); more
  epochs, so the accuracy means something;
- ``convergence`` (issue 5): does the pipeline's staleness cost accuracy once training has
  converged? The pipeline suite's modes (plus pipeline + BNS with smoothing) for 150 epochs on
  the 100k graph's 4-rank partitions (where the 30-epoch gap was largest), validation accuracy
  every 5 epochs, plotted against the epoch in ``convergence.png``.

    python benchmarks/modes.py --suite bns [--graphs synthetic-100k ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe, finish  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from bns_pipe.bench.suite import read_run, run_checked, summarise  # noqa: E402
from bns_pipe.paths import cache_dir, data_root  # noqa: E402

SYNTHETIC = ["--num-features", "128", "--num-classes", "8"]
# name → (dataset flags, extra training flags, epochs timed, warm-up epochs)
GRAPHS = {
    "synthetic-100k": (["--dataset", "synthetic", "--num-nodes", "100000", *SYNTHETIC], [], 4, 2),
    "synthetic-1m": (["--dataset", "synthetic", "--num-nodes", "1000000", *SYNTHETIC], [], 2, 1),
    "coauthor-physics": (["--dataset", "coauthor-physics"], ["--use-pp"], 4, 2),
}
BNS_RATES = ("1", "0.1", "0.01", "0")
PIPELINE_MODES = {
    "vanilla": [],
    "pipeline": ["--pipeline"],
    "pipeline smooth-0.95": ["--pipeline", "--feat-smooth", "0.95", "--grad-smooth", "0.95"],
    "bns-0.1": ["--sampling-rate", "0.1"],
    "pipeline+bns-0.1": ["--pipeline", "--sampling-rate", "0.1"],
}
CONVERGENCE_MODES = {
    **PIPELINE_MODES,
    "pipeline+bns-0.1 smooth-0.95": [
        *PIPELINE_MODES["pipeline+bns-0.1"],
        *PIPELINE_MODES["pipeline smooth-0.95"][1:],
    ],
}
# suite → (timed epochs, evaluate every): more training where the accuracy column matters
SUITE_TRAINING = {"pipeline": (30, 0), "convergence": (150, 5)}
MODEL = ["--layers", "3", "--hidden", "128", "--dropout", "0.5"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def partition_dir(graph: str, world: int, method: str) -> Path:
    """Partition ``graph`` once (cached across runs of this script)."""
    out = cache_dir("bench-partitions") / f"{graph}-{world}-{method}"
    if not (out / "manifest.json").exists():
        log(f"partitioning {graph} into {world} ({method}) ...")
        command = [sys.executable, "-m", "bns_pipe", "partition", *GRAPHS[graph][0]]
        command += ["--parts", str(world), "--method", method, "--out", str(out), "--overwrite"]
        command += ["--root", str(data_root())]
        run_checked(command)
    return out


def run(
    part_dir: Path, flags: list[str], epochs: int, warmup: int, tmp: Path, eval_every: int = 0
) -> dict:
    """One training launch; medians over the epochs after ``warmup``."""
    metrics = tmp / f"metrics-{os.getpid()}.jsonl"  # one per script, so two can run at once
    metrics.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bns_pipe", "train", "--partition-dir", str(part_dir)]
    command += [*MODEL, *flags, "--epochs", str(epochs + warmup)]
    command += ["--eval-every", str(eval_every)]
    command += ["--no-progress", "--metrics-jsonl", str(metrics)]
    start = time.perf_counter()
    run_checked(command)
    return {**summarise(read_run(metrics), warmup), "wall_s": time.perf_counter() - start}


def bns_configs(graphs: list[str], partitions: list[str]) -> list[dict]:
    return [
        {"graph": g, "world": w, "partition": m, "mode": f"p={p}", "flags": ["--sampling-rate", p]}
        for g in graphs
        for w in (2, 4)
        for m in partitions
        for p in BNS_RATES
    ]


def pipeline_configs(graphs: list[str], partitions: list[str]) -> list[dict]:
    setups = [(g, w, m, []) for g in graphs for w in (2, 4) for m in partitions]
    setups += [(graphs[0], w, "random", ["--hidden", "256"]) for w in (2, 4)]  # comm-heavy
    return [
        {
            "graph": g,
            "world": w,
            "partition": m,
            "mode": name + (" hidden 256" if extra else ""),
            "flags": [*flags, *extra, "--threads-per-rank", "1"],
        }
        for g, w, m, extra in setups
        for name, flags in PIPELINE_MODES.items()
    ]


def convergence_configs(graphs: list[str], partitions: list[str]) -> list[dict]:
    return [
        {"graph": g, "world": 4, "partition": m, "mode": name, "flags": flags}
        for g in graphs
        for m in partitions
        for name, flags in CONVERGENCE_MODES.items()
    ]


CONFIGS = {"bns": bns_configs, "pipeline": pipeline_configs, "convergence": convergence_configs}


def _key(run: dict) -> tuple:
    return run["graph"], run["world"], run["partition"], run["mode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS))
    parser.add_argument("--epochs", type=int, help="timed epochs (default: per graph)")
    parser.add_argument(
        "--partitions", nargs="+", choices=("metis", "random"), default=["metis", "random"]
    )
    parser.add_argument("--quick", action="store_true", help="synthetic 100k, 2 timed epochs")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/<suite>.json")
    args = parser.parse_args()
    if args.suite == "bns":
        graphs = args.graphs or list(GRAPHS)
    else:
        graphs = args.graphs or ["synthetic-100k"]
    if args.quick:
        graphs, args.epochs = ["synthetic-100k"], 2
    out = args.out or ROOT / "benchmarks" / "results" / f"{args.suite}.json"
    configs = CONFIGS[args.suite](graphs, args.partitions)
    machine = describe()
    # Runs of other configurations from an earlier invocation stay (each records its load).
    results = []
    if out.exists():
        redone = {_key(c) for c in configs}
        results = [r for r in json.loads(out.read_text())["runs"] if _key(r) not in redone]
    tmp = cache_dir("bench-runs")
    tmp.mkdir(parents=True, exist_ok=True)
    suite_epochs, eval_every = SUITE_TRAINING.get(args.suite, (None, 0))
    for i, config in enumerate(configs):
        _, extra, epochs, warmup = GRAPHS[config["graph"]]
        epochs = args.epochs or suite_epochs or epochs
        part = partition_dir(config["graph"], config["world"], config["partition"])
        label = f"{config['graph']} K={config['world']} {config['partition']} {config['mode']}"
        log(f"[{i + 1}/{len(configs)}] {label}")
        load = os.getloadavg()[0]
        result = run(part, [*extra, *config["flags"]], epochs, warmup, tmp, eval_every)
        results.append({**config, "epochs": epochs, "warmup": warmup, "load_1min": load, **result})
        log(
            f"    {result['epoch_time_s']:.3f} s/epoch, comm {result['comm_s']:.3f} s "
            f"(hidden {result['comm_hidden_s']:.3f}), {result['comm_bytes'] / 2**20:.1f} MiB, "
            f"growth {result['mem_growth_bytes'] / 2**20:.0f} MiB"
        )
        write(out, args.suite, finish(machine), results)  # keep partial results


def write(out: Path, suite: str, machine: dict, results: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "suite": suite, "runs": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(machine, suite, results))
    if suite == "convergence":
        plot_curves(out.with_suffix(".png"), results)


def plot_curves(path: Path, results: list[dict]) -> None:
    """Validation accuracy against the epoch, one panel per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["graph"], r["world"], r["partition"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for r in results:
            if (r["graph"], r["world"], r["partition"]) == panel and r["curve"]:
                epochs = [point["epoch"] for point in r["curve"]]
                ax.plot(epochs, [point["val_acc"] for point in r["curve"]], label=r["mode"])
        ax.set_title("{} K={} {}".format(*panel))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(bottom=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(machine: dict, suite: str, results: list[dict]) -> str:
    lines = [
        f"# Training modes: {suite} suite",
        "",
        machine_summary(machine),
        "",
        "Times in seconds per epoch (median after warm-up); comm = exposed (blocked) halo "
        "time, hidden = halo transfer time overlapped with computation; bytes = halo bytes "
        "sent per epoch by all ranks; growth = peak memory during training minus memory after "
        "start-up (max over ranks).",
        "",
        "| graph | K | partition | mode | epoch s | compute | comm | hidden | reduce | sample "
        "| MiB/epoch | bytes vs p=1 | peak MiB/rank | growth MiB | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[tuple, dict] = {}
    for r in results:
        key = (r["graph"], r["world"], r["partition"])
        if r["mode"] in ("p=1", "vanilla"):
            base[key] = r
        ref = base.get(key)
        ratio = f"{r['comm_bytes'] / ref['comm_bytes']:.3f}" if ref and ref["comm_bytes"] else ""
        lines.append(
            f"| {r['graph']} | {r['world']} | {r['partition']} | {r['mode']} "
            f"| {r['epoch_time_s']:.3f} | {r['compute_s']:.3f} | {r['comm_s']:.3f} "
            f"| {r['comm_hidden_s']:.3f} | {r['reduce_s']:.3f} | {r['sample_s']:.4f} "
            f"| {r['comm_bytes'] / 2**20:.1f} | {ratio} "
            f"| {max(r['peak_mem_bytes_per_rank']) / 2**20:.0f} "
            f"| {r['mem_growth_bytes'] / 2**20:.0f} | {r['test_acc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
