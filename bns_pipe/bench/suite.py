"""``bns-pipe bench``: every training method on a set of graphs and world sizes, side by side.

Each (graph, method, world size, repeat) is its own launch: PyG single-process baselines via
:mod:`bns_pipe.bench.pyg_run`, ours via ``bns-pipe train`` (cached partitions). Warm-up
epochs are excluded; each run's median epoch is kept (as the slowest rank spent it), and the
summary gives the median repeat with the min/max over repeats. Results go to
``OUT/results.json`` (machine, versions, commit, the full configuration of every run),
``OUT/results.md`` and PNG plots (:mod:`bns_pipe.bench.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bns_pipe import __version__
from bns_pipe.errors import ConfigError
from bns_pipe.train.config import METRICS
from bns_pipe.train.metrics import TIMES, git_commit

# The final scores a run reports (ours and the PyG baseline alike): accuracy, and the
# ``--metric``'s value chosen on validation.
SCORES = ("best_val_acc", "test_acc", "metric", "best_val_metric", "test_metric")


@dataclass(frozen=True)
class Method:
    """A training method: PyG (``form``) or ours (``flags`` to ``bns-pipe train``)."""

    name: str
    distributed: bool
    flags: tuple[str, ...] = ()
    form: str | None = None


METHODS = {
    m.name: m
    for m in (
        Method("pyg-edge_index", False, form="edge_index"),
        Method("pyg-csr", False, form="csr"),
        Method("ours", False),
        Method("vanilla", True),
        Method("bns-0.1", True, ("--sampling-rate", "0.1")),
        Method("bns-0.01", True, ("--sampling-rate", "0.01")),
        Method("pipeline", True, ("--pipeline",)),
        Method("pipeline+bns-0.1", True, ("--pipeline", "--sampling-rate", "0.1")),
        # halo quantization (--hook quant): not in the default list
        *(Method(f"quant-{b}", True, ("--hook", f"quant:bits={b}")) for b in (8, 4, 2)),
        Method("quant-adaptive-4", True, ("--hook", "quant:bits=adaptive,budget=4")),
        Method("bns-0.1+quant-4", True, ("--sampling-rate", "0.1", "--hook", "quant:bits=4")),
        Method("pipeline+quant-4", True, ("--pipeline", "--hook", "quant:bits=4")),
    )
}
DEFAULT_METHODS = [name for name in METHODS if "quant" not in name]

_SYNTHETIC = ["--dataset", "synthetic", "--num-nodes"]
# name → dataset flags, shared by `bns-pipe train` and the PyG runner
GRAPHS: dict[str, list[str]] = {
    "tiny": [*_SYNTHETIC, "2000", "--num-features", "16"],
    "small": [*_SYNTHETIC, "20000", "--num-features", "64"],
    "medium": [*_SYNTHETIC, "100000", "--num-features", "128"],
    "large": [*_SYNTHETIC, "1000000", "--num-features", "128"],
    **{name: ["--dataset", name] for name in ("cora", "citeseer", "coauthor-cs")},
    **{name: ["--dataset", name] for name in ("coauthor-physics", "amazon-computers")},
}


@dataclass
class Settings:
    graphs: list[str] = field(default_factory=lambda: ["small", "medium"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    worlds: list[int] = field(default_factory=lambda: [1, 2, 4])
    epochs: int = 10
    warmup: int = 3
    repeats: int = 3
    layers: int = 3
    hidden: int = 128
    dropout: float = 0.5
    partition: str = "metis"
    metric: str = "auto"

    def validate(self) -> Settings:
        unknown = sorted(set(self.graphs) - set(GRAPHS)) + sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown graph(s) or method(s): {unknown}")
        if self.epochs < 1 or self.warmup < 0 or self.repeats < 1:
            raise ConfigError("--epochs and --repeats must be at least 1, --warmup at least 0")
        if any(w < 1 for w in self.worlds):
            raise ConfigError("--worlds must be positive")
        return self


QUICK = Settings(graphs=["small"], worlds=[1, 2, 4], epochs=3, warmup=1, repeats=1)


def runs(settings: Settings) -> list[tuple[str, Method, int]]:
    """The (graph, method, world size) cells: single-process methods run on one process."""
    cells = []
    for graph in settings.graphs:
        for name in settings.methods:
            method = METHODS[name]
            if method.distributed:
                cells += [(graph, method, w) for w in settings.worlds if w > 1]
            elif 1 in settings.worlds:
                cells.append((graph, method, 1))
    return cells


def launch(graph: str, method: Method, world: int, settings: Settings, seed: int) -> dict:
    """One run in its own process(es); returns its per-epoch record and summary."""
    data_flags = GRAPHS[graph]
    model = ["--layers", str(settings.layers), "--hidden", str(settings.hidden)]
    model += ["--dropout", str(settings.dropout), "--seed", str(seed)]
    epochs = settings.epochs + settings.warmup
    eval_every = max(1, epochs // 5)
    common = [*data_flags, *model, "--epochs", str(epochs), "--eval-every", str(eval_every)]
    common += ["--metric", settings.metric]
    if method.form is not None:
        command = [sys.executable, "-m", "bns_pipe.bench.pyg_run", *common, "--form", method.form]
        record = json.loads(run_checked(command).strip().splitlines()[-1])
        times = record.pop("epoch_times_s")
        record.update(epoch_time_s=times, compute_s=times)
        return summarise(record, settings.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        command = [sys.executable, "-m", "bns_pipe", "train", *common, *method.flags]
        command += ["--parts", str(world), "--method", settings.partition, "--no-progress"]
        command += ["--metrics-jsonl", str(metrics)]
        run_checked(command)
        return summarise(read_run(metrics), settings.warmup)


def read_run(metrics: Path) -> dict:
    """A ``bns-pipe train`` metrics file as per-epoch lists (times, bytes), the validation
    curve against cumulative training time, and the final values."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs_rows, final = [r for r in rows if "epoch" in r], rows[-1]
    keys = (*TIMES, "comm_bytes", *_hook_times(epochs_rows))
    record = {k: [r[k] for r in epochs_rows] for k in keys}
    elapsed, curve = 0.0, []
    for r in epochs_rows:
        elapsed += r["epoch_time_s"]
        if "val_acc" in r:
            point = {"epoch": r["epoch"], "train_s": elapsed, "val_acc": r["val_acc"]}
            curve.append({**point, "val_metric": r.get("val_metric", r["val_acc"])})
    record.update(
        curve=curve,
        **{key: final[key] for key in SCORES if key in final},
        peak_mem_bytes_per_rank=epochs_rows[-1]["peak_mem_bytes_per_rank"],
        startup_mem_bytes_per_rank=final["startup_mem_bytes_per_rank"],
        hooks=final.get("hooks", {}),
    )
    return record


def _hook_times(epochs: list[dict]) -> list[str]:
    """The per-epoch seconds the run's hooks report (e.g. ``quantize_s``) in its epoch rows."""
    keys = [k for k in epochs[0] if k.endswith("_s") and k not in (*TIMES, "eval_time_s")]
    return [k for k in keys if all(k in r for r in epochs)]


def summarise(record: dict, warmup: int) -> dict:
    """A run's median epoch after ``warmup``, whole (its time parts add up to its epoch
    time), with the min/max epoch time."""
    steady = record["epoch_time_s"][warmup:]
    median = warmup + _median_index(steady)
    per_epoch = [k for k in record if k.endswith("_s") or k == "comm_bytes"]  # times, bytes
    summary = {k: record[k][median] for k in per_epoch}
    peak, startup = record["peak_mem_bytes_per_rank"], record["startup_mem_bytes_per_rank"]
    summary.update(
        min_epoch_s=min(steady),
        max_epoch_s=max(steady),
        peak_mem_bytes=max(peak),
        peak_mem_bytes_per_rank=peak,
        startup_mem_bytes_per_rank=startup,
        mem_growth_bytes=max(p - s for p, s in zip(peak, startup, strict=True)),
        **{key: record[key] for key in SCORES if key in record},
        curve=record["curve"],
        hooks=record.get("hooks", {}),  # PyG runs have none
    )
    return summary


def run_checked(command: list[str]) -> str:
    """Run ``command`` with this package importable; its stdout, or an error with its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _child_env() -> dict:
    """The child environment: this package importable even when run from a checkout."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def aggregate(repeats: list[dict]) -> dict:
    """The median repeat by epoch time, whole, with the min/max epoch time over repeats."""
    median = repeats[_median_index([r["epoch_time_s"] for r in repeats])]
    out = {k: v for k, v in median.items() if isinstance(v, int | float | str)}
    out["epoch_time_min_s"] = min(r["epoch_time_s"] for r in repeats)
    out["epoch_time_max_s"] = max(r["epoch_time_s"] for r in repeats)
    out["curve"] = median["curve"]
    return out


def _median_index(values: list[float]) -> int:
    """The index of the median of ``values`` (the upper one of an even count)."""
    return sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bns_pipe": __version__,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
    }


def bench(settings: Settings, out: Path, progress: bool = True) -> dict:
    """Run the matrix and write results.json, results.md and the plots into ``out``."""
    from tqdm import tqdm

    from bns_pipe.bench.report import write_report

    settings.validate()
    cells = runs(settings)
    results = {"machine": machine(), "settings": asdict(settings), "runs": []}
    bar = tqdm(total=len(cells) * settings.repeats, disable=not progress, unit="run")
    for graph, method, world in cells:
        repeats = []
        for seed in range(settings.repeats):
            bar.set_description(f"{graph} {method.name} K={world}")
            repeats.append(launch(graph, method, world, settings, seed))
            bar.update(1)
        results["runs"].append(
            {
                "graph": graph,
                "method": method.name,
                "world": world,
                "config": {"dataset": GRAPHS[graph], **asdict(method)},
                **aggregate(repeats),
                "repeats": repeats,
            }
        )
    bar.close()
    results["machine"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_report(results, out)
    return results


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--graphs", nargs="+", default=d.graphs, help=f"of {sorted(GRAPHS)}")
    parser.add_argument("--methods", nargs="+", default=d.methods, help=f"of {list(METHODS)}")
    parser.add_argument("--worlds", nargs="+", type=int, default=d.worlds)
    for name in ("epochs", "warmup", "repeats", "layers", "hidden"):
        parser.add_argument(f"--{name}", type=int, default=getattr(d, name))
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--partition", choices=("metis", "random"), default=d.partition)
    parser.add_argument("--metric", choices=METRICS, default=d.metric, help="score of each run")
    parser.add_argument("--quick", action="store_true", help="a few minutes: small graph, 3 epochs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(**{**asdict(QUICK), "methods": args.methods, "metric": args.metric})
    names = [f for f in asdict(Settings())]
    return Settings(**{n: getattr(args, n) for n in names}).validate()
