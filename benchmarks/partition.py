"""Time, peak memory and quality of ``bns_pipe.partition.partition``: METIS against random.

Synthetic graphs in ogbn-products' shape (``avg_degree=25``, ``num_features=100``,
``num_classes=47``) of 100k, 1M and 2.4M nodes are cut into 4 and 8 parts, each (graph, K,
method) in a fresh subprocess so that its peak RSS is its own. Per run: the time to generate
the graph, to build the CSR and assign nodes (METIS), to build and write the parts; peak RSS
(``ru_maxrss``) and the RSS growth over the RSS once the graph is loaded; edge cut, halo total,
replication factor (N + halo) / N and max / mean part sizes. Then the shared real datasets
(``$BNS_PIPE_DATA``) into 2, 4 and 8 parts: edge cut, halo and time of METIS and random.

    python benchmarks/partition.py            # everything, about 30 minutes on 2 cores
    python benchmarks/partition.py --quick    # 100k nodes and the real datasets
    python benchmarks/partition.py --render benchmarks/results/partition.json  # Markdown only

A run that passes ``--timeout`` or ``--max-rss-gib`` is stopped and recorded as failed.
Writes ``--out`` (default ``benchmarks/results/partition.json``; with ``--quick``, a file in
the temp dir) and a Markdown table beside it; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from machine import describe, finish
from partition_report import markdown

SIZES = (100_000, 1_000_000, 2_400_000)
PARTS = (4, 8)
METHODS = ("metis", "random")
SHAPE = {"avg_degree": 25.0, "num_features": 100, "num_classes": 47}
DATASETS = ("cora", "citeseer", "coauthor-cs", "coauthor-physics", "amazon-computers")
REAL_PARTS = (2, 4, 8)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_S = 0.05


# --------------------------------------------------------------------------- child side


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` now, from ``/proc/<pid>/statm``."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    """This process's peak RSS so far (``VmHWM``; it also rises inside C calls holding the GIL)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples this process's RSS every 50 ms in a thread, keeping the maximum of each phase.

    A thread cannot sample while a C call holds the GIL (pymetis does), so its maxima are lower
    bounds; :func:`hwm_bytes` read at phase ends gives the exact peak of a phase that raised it.
    """

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def enter(self, phase: str) -> None:
        """Close the current phase with one last sample and start ``phase``."""
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        rss = rss_bytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()


def emit(event: dict) -> None:
    """One JSON line to the parent (stdout)."""
    print(json.dumps(event), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def phase_clock(on_phase: Callable[[str], None]) -> Iterator[dict]:
    """Time the phases inside ``partition()``: wraps the CSR build and the assignment it calls.

    Yields a dict that gets the ``perf_counter`` marks ``csr_start``, ``csr_end`` and
    ``assign_end``; ``on_phase`` is told when "assign" and "build_write" begin.
    """
    import bns_pipe.partition as api

    marks: dict[str, float] = {}
    csr, assign = api.global_in_csr, api.assign_parts

    def timed_csr(*args, **kwargs):
        on_phase("assign")
        marks["csr_start"] = time.perf_counter()
        result = csr(*args, **kwargs)
        marks["csr_end"] = time.perf_counter()
        return result

    def timed_assign(*args, **kwargs):
        result = assign(*args, **kwargs)
        marks["assign_end"] = time.perf_counter()
        marks["hwm_assign"] = hwm_bytes()
        on_phase("build_write")
        return result

    api.global_in_csr, api.assign_parts = timed_csr, timed_assign
    try:
        yield marks
    finally:
        api.global_in_csr, api.assign_parts = csr, assign


def timed_partition(
    data, num_parts: int, method: str, out: Path, on_phase: Callable[[str], None]
) -> dict:
    """Partition ``data`` into ``out``; the manifest's numbers, phase times and derived stats."""
    from bns_pipe.partition import partition

    start = time.perf_counter()
    with phase_clock(on_phase) as marks:
        manifest = partition(data, num_parts, out, method=method, verbose=False)
    end = time.perf_counter()
    if {"csr_start", "csr_end", "assign_end"} - set(marks):
        raise RuntimeError("partition() no longer calls global_in_csr / assign_parts; update me")
    disk = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    n, parts = manifest["num_nodes"], manifest["parts"]

    def imbalance(key: str) -> float:
        values = [p[key] for p in parts]
        return round(max(values) * len(values) / max(sum(values), 1), 3)

    return {
        "num_nodes": n,
        "num_edges": manifest["num_edges"],
        "num_parts": num_parts,
        "method": method,
        "balance": manifest["balance"],
        "times_s": {
            "csr": round(marks["csr_end"] - marks["csr_start"], 3),
            "assign": round(marks["assign_end"] - marks["csr_end"], 3),
            "build_write": round(end - marks["assign_end"], 3),
            "partition": round(end - start, 3),
        },
        "edge_cut": manifest["edge_cut"],
        "edge_cut_pct": round(100 * manifest["edge_cut"] / max(manifest["num_edges"], 1), 2),
        "halo_total": manifest["halo_total"],
        "replication": round((n + manifest["halo_total"]) / n, 3),
        "imbalance": {key: imbalance(key) for key in ("inner", "train", "edges")},
        "parts": parts,
        "partition_dir_bytes": disk,
        "hwm_after_assign": marks["hwm_assign"],
    }


def child_synthetic(spec: dict, workdir: Path) -> dict:
    """One synthetic (graph, K, method) run in this fresh process."""
    import torch

    from bns_pipe import _ext
    from bns_pipe.data import load_dataset

    label = f"[{spec['num_nodes']:,} nodes, K={spec['num_parts']}, {spec['method']}]"
    rss_imports = rss_bytes()
    with RssSampler() as sampler:

        def on_phase(phase: str) -> None:
            sampler.enter(phase)
            emit({"event": "phase", "phase": phase})

        on_phase("load")
        start = time.perf_counter()
        data = load_dataset("synthetic", num_nodes=spec["num_nodes"], **SHAPE)
        load_s = time.perf_counter() - start
        rss_load, hwm_load = rss_bytes(), hwm_bytes()
        log(f"{label} graph generated in {load_s:.1f}s, RSS {rss_load / GIB:.2f} GiB")
        run = timed_partition(data, spec["num_parts"], spec["method"], workdir / "out", on_phase)
        on_phase("done")
    run["edge_homophily"] = round(edge_homophily(data), 4)
    hwm_assign, hwm_end = run.pop("hwm_after_assign"), hwm_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # A phase raised VmHWM: its exact peak is the new VmHWM; otherwise only sampled.
    phase_peak = {
        "assign": hwm_assign if hwm_assign > hwm_load else sampler.peaks.get("assign", 0),
        "build_write": hwm_end if hwm_end > hwm_assign else sampler.peaks.get("build_write", 0),
    }
    partition_peak = max(phase_peak.values())
    run["times_s"] = {"load": round(load_s, 3), **run["times_s"]}
    run["times_s"]["total"] = round(load_s + run["times_s"]["partition"], 3)
    run["memory_gib"] = {
        key: round(value / GIB, 3)
        for key, value in {
            "rss_after_imports": rss_imports,
            "rss_after_load": rss_load,
            "peak_rss": peak,
            "peak_rss_load": hwm_load,
            "peak_rss_assign": phase_peak["assign"],
            "peak_rss_build_write": phase_peak["build_write"],
            "sampled_max_assign": sampler.peaks.get("assign", 0),
            "sampled_max_build_write": sampler.peaks.get("build_write", 0),
            "partition_growth": partition_peak - rss_load,
        }.items()
    }
    run["memory_exact"] = {
        "assign": hwm_assign > hwm_load,
        "build_write": hwm_end > hwm_assign,
    }
    run["graph"] = "synthetic"
    run["graph_options"] = SHAPE
    run["graph_ops"] = _ext.describe()
    run["torch_threads"] = torch.get_num_threads()
    t = run["times_s"]
    log(
        f"{label} assign {t['csr'] + t['assign']:.1f}s, build+write {t['build_write']:.1f}s, "
        f"peak RSS {peak / GIB:.2f} GiB, cut {run['edge_cut_pct']}%, "
        f"replication {run['replication']}"
    )
    return run


def edge_homophily(data, chunk: int = 1 << 22) -> float:
    """Fraction of edges whose ends share a class, in chunks so it adds little memory."""
    src, dst = data.edge_index
    same = sum(
        int((data.y[src[i : i + chunk]] == data.y[dst[i : i + chunk]]).sum())
        for i in range(0, src.numel(), chunk)
    )
    return same / max(src.numel(), 1)


def child_real(spec: dict, workdir: Path) -> list[dict]:
    """METIS and random for every K on one real dataset, in this process."""
    from bns_pipe.data import load_dataset

    start = time.perf_counter()
    data = load_dataset(spec["dataset"])
    load_s = time.perf_counter() - start
    runs = []
    for num_parts in spec["parts"]:
        for method in spec["methods"]:
            run = timed_partition(data, num_parts, method, workdir / "out", lambda _: None)
            run.pop("hwm_after_assign")
            run["graph"] = spec["dataset"]
            run["times_s"]["load"] = round(load_s, 3)
            runs.append(run)
            log(
                f"[{spec['dataset']}, K={num_parts}, {method}] cut {run['edge_cut']:,} "
                f"({run['edge_cut_pct']}%), halo {run['halo_total']:,}, "
                f"{run['times_s']['partition']:.2f}s"
            )
    return runs


def child_main(spec: dict, workdir: Path) -> None:
    if spec["kind"] == "synthetic":
        emit({"event": "result", "runs": [child_synthetic(spec, workdir)]})
    else:
        emit({"event": "result", "runs": child_real(spec, workdir)})


# -------------------------------------------------------------------------- parent side


def run_child(spec: dict, timeout_s: float, max_rss_gib: float) -> dict:
    """Run ``spec`` in a fresh interpreter, watching its time and RSS; its runs or its failure."""
    workdir = Path(tempfile.mkdtemp(prefix="bns_pipe_partition_"))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}  # a checkout runs too
    command = [sys.executable, __file__, "--child", json.dumps(spec), "--workdir", str(workdir)]
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    events: list[dict] = []
    stderr_tail: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            events.append(json.loads(line))

    def read_stderr() -> None:
        for line in proc.stderr:
            sys.stderr.write("  " + line)
            stderr_tail[:] = [*stderr_tail[-19:], line.rstrip()]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    watched_max, failure = 0, None
    while proc.poll() is None:
        with suppress(OSError, IndexError):  # the child may exit between poll and read
            watched_max = max(watched_max, rss_bytes(proc.pid))
        if time.monotonic() - start > timeout_s:
            failure = f"timeout: stopped after {timeout_s:.0f}s"
        elif watched_max > max_rss_gib * GIB:
            failure = f"memory: stopped at RSS {watched_max / GIB:.1f} GiB > {max_rss_gib} GiB"
        elif _available_bytes() < GIB:
            failure = (
                "memory: stopped when the machine had < 1 GiB available "
                f"(child RSS {watched_max / GIB:.1f} GiB)"
            )
        if failure:
            proc.kill()
            proc.wait()
            break
        time.sleep(SAMPLE_S)
    for reader in readers:
        reader.join()
    shutil.rmtree(workdir, ignore_errors=True)
    result = next((e for e in events if e["event"] == "result"), None)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    outcome = {
        "wall_s": round(time.monotonic() - start, 1),
        "watched_max_rss_gib": round(watched_max / GIB, 3),
    }
    if result is not None and failure is None and proc.returncode == 0:
        return {"status": "ok", "runs": result["runs"], **outcome}
    if failure is None:
        code = proc.returncode
        failure = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if code == -9:
            failure += " (the kernel's OOM killer?)"
    return {
        "status": "failed",
        "reason": failure,
        "phase_at_failure": phases[-1] if phases else "startup",
        "stderr_tail": stderr_tail,
        **outcome,
    }


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return GIB * 1024


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 100k-node synthetic graphs")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"synthetic sizes (default {SIZES})")
    parser.add_argument("--parts", type=int, nargs="+", default=list(PARTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--real-parts", type=int, nargs="+", default=list(REAL_PARTS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--max-rss-gib", type=float, default=16.0, help="RSS limit per run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown of this JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child), args.workdir)
        return
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return
    sizes = args.sizes or ([SIZES[0]] if args.quick else list(SIZES))
    default_out = (
        Path(tempfile.gettempdir()) / "bns_pipe-partition-quick.json"
        if args.quick
        else RESULTS / "partition.json"
    )
    out = args.out or default_out
    specs = [
        {"kind": "synthetic", "num_nodes": n, "num_parts": k, "method": method}
        for n in sizes
        for k in args.parts
        for method in args.methods
    ] + [
        {"kind": "real", "dataset": name, "parts": args.real_parts, "methods": args.methods}
        for name in args.datasets
    ]
    report = {
        "machine": describe(),
        "settings": {
            "synthetic_options": SHAPE,
            "timeout_s": args.timeout,
            "max_rss_gib": args.max_rss_gib,
            "data_root": os.environ.get("BNS_PIPE_DATA"),
        },
        "runs": [],
    }
    started = time.monotonic()
    for i, spec in enumerate(specs, 1):
        log(f"({i}/{len(specs)}) {json.dumps(spec)}; load average {os.getloadavg()[0]:.2f}")
        entry = {"spec": spec, "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
        entry.update(run_child(spec, args.timeout, args.max_rss_gib))
        entry["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        if entry["status"] != "ok":
            log(f"  FAILED: {entry['reason']} (phase {entry['phase_at_failure']})")
        report["runs"].append(entry)
        report["machine"] = finish(report["machine"])
        report["wall_s"] = round(time.monotonic() - started, 1)
        write(report, out)  # after every run, so an interrupted benchmark keeps its results
    log(f"wrote {out} and {out.with_suffix('.md')} in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
