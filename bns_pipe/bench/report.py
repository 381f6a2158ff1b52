"""The bench report: ``results.json``, a Markdown table and matplotlib plots.

Plots (PNG): ``throughput.png`` (epochs per second per method and world size),
``breakdown.png`` (stacked epoch time: compute, exposed communication, all-reduce, sampling),
``bytes.png`` (halo bytes per epoch), ``memory.png`` (peak memory per rank) and
``accuracy_time.png`` (the validation score, ``--metric``, against training time).
"""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = ("throughput", "breakdown", "bytes", "memory", "accuracy_time")
BREAKDOWN = (
    ("compute_s", "compute"),
    ("comm_s", "exposed comm"),
    ("reduce_s", "all-reduce"),
    ("sample_s", "sampling"),
)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)


def _label(run: dict) -> str:
    return run["method"] if run["world"] == 1 else f"{run['method']} K={run['world']}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# bns-pipe bench",
        "",
        f"{m['processor']} ({m['cpu_cores']} cores), {m['platform']}, Python {m['python']}, "
        f"torch {m['torch']}, GPU {m['cuda'] or 'none'}; bns_pipe {m['bns_pipe']} "
        f"commit {(m['commit'] or 'unknown')[:10]}; {m['started']}, load {m['load_average'][0]}.",
        "",
        "The median repeat of each run's median epoch after warm-up (epoch time min–max over "
        "repeats), as the slowest rank spent it: compute + comm + reduce + sample = epoch "
        "time; comm = exposed halo time, hidden = halo time overlapped with computation.",
        "",
        "| graph | method | K | epoch s (min–max) | epochs/s | vs PyG CSR | compute | comm "
        "| hidden | reduce | sample | MiB/epoch | peak MiB/rank "
        f"| test {_metric(results['runs'])} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pyg = {r["graph"]: r["epoch_time_s"] for r in results["runs"] if r["method"] == "pyg-csr"}
    for r in results["runs"]:
        ratio = f"{r['epoch_time_s'] / pyg[r['graph']]:.2f}x" if r["graph"] in pyg else ""

        def cell(key: str, r: dict = r) -> str:
            return f"{r[key]:.3f}" if key in r else "–"

        mib = f"{r['comm_bytes'] / 2**20:.1f}" if "comm_bytes" in r else "–"
        lines.append(
            f"| {r['graph']} | {r['method']} | {r['world']} | {r['epoch_time_s']:.3f} "
            f"({r['epoch_time_min_s']:.3f}–{r['epoch_time_max_s']:.3f}) "
            f"| {1 / r['epoch_time_s']:.2f} | {ratio} | {cell('compute_s')} | {cell('comm_s')} "
            f"| {cell('comm_hidden_s')} | {cell('reduce_s')} | {cell('sample_s')} | {mib} "
            f"| {r['peak_mem_bytes'] / 2**20:.0f} | {r.get('test_metric', r['test_acc']):.3f} |"
        )
    return "\n".join(lines) + "\n"


def _metric(runs: list[dict]) -> str:
    """The runs' score name (``--metric``; results written before it existed: accuracy)."""
    names = {r.get("metric", "accuracy") for r in runs}
    return names.pop() if len(names) == 1 else "score"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = list(dict.fromkeys(r["graph"] for r in results["runs"]))
    for name in PLOTS:
        fig, axes = plt.subplots(1, len(graphs), figsize=(6 * len(graphs), 4.5), squeeze=False)
        for ax, graph in zip(axes[0], graphs, strict=True):
            runs = [r for r in results["runs"] if r["graph"] == graph]
            _DRAW[name](ax, runs)
            ax.set_title(graph)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)


def _bars(ax, runs: list[dict], values: list[float], ylabel: str) -> None:
    labels = [_label(r) for r in runs]
    ax.bar(range(len(runs)), values, color="tab:blue")
    ax.set_xticks(range(len(runs)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)


def _throughput(ax, runs: list[dict]) -> None:
    _bars(ax, runs, [1 / r["epoch_time_s"] for r in runs], "epochs / s")


def _breakdown(ax, runs: list[dict]) -> None:
    bottom = [0.0] * len(runs)
    for key, label in BREAKDOWN:
        values = [r.get(key, 0.0) for r in runs]
        ax.bar(range(len(runs)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(runs)), [_label(r) for r in runs], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("seconds / epoch")
    ax.legend(fontsize=8)


def _bytes(ax, runs: list[dict]) -> None:
    _bars(ax, runs, [r.get("comm_bytes", 0) / 2**20 for r in runs], "halo MiB / epoch")


def _memory(ax, runs: list[dict]) -> None:
    _bars(ax, runs, [r["peak_mem_bytes"] / 2**20 for r in runs], "peak MiB per rank")


def _accuracy_time(ax, runs: list[dict]) -> None:
    for r in runs:
        curve = r["curve"]
        scores = [c.get("val_metric", c["val_acc"]) for c in curve]
        ax.plot([c["train_s"] for c in curve], scores, ".-", label=_label(r))
    ax.set_xlabel("training seconds")
    ax.set_ylabel(f"validation {_metric(runs)}")
    ax.legend(fontsize=7)


_DRAW = {
    "throughput": _throughput,
    "breakdown": _breakdown,
    "bytes": _bytes,
    "memory": _memory,
    "accuracy_time": _accuracy_time,
}
