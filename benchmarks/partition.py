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
import itertools
import json
import math
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

from machine import describe, finish, summary

SIZES = (100_000, 1_000_000, 2_400_000)
PARTS = (4, 8)
METHODS = ("metis", "random")
SHAPE = {"avg_degree": 25.0, "num_features": 100, "num_classes": 47}
DATASETS = ("cora", "citeseer", "coauthor-cs", "coauthor-physics", "amazon-computers")
REAL_PARTS = (2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results"
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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


# ---------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    """The results as Markdown tables plus a short reading."""
    lines = [
        "# Partition benchmark",
        "",
        f"`python benchmarks/partition.py` on {summary(report['machine'])}",
        "",
        f"Synthetic graphs: `load_dataset('synthetic', num_nodes=N, **{SHAPE})` (DC-SBM,",
        "homophily 0.5, power-law degrees); METIS balances nodes, training nodes and edges.",
        "Each row is one fresh process. Times in seconds: *generate* makes the graph, *CSR*",
        "builds the in-edge CSR, *assign* runs METIS (or a random permutation), *build+write*",
        "cuts, saves and hashes the part files. Memory in GiB: *peak* is `ru_maxrss` of the",
        "whole run, *growth* the partition's peak RSS above the RSS once the graph is loaded.",
        "*edges* are undirected; *repl.* is (N + halo) / N; *imb.* is max / mean per part of",
        "inner nodes and of (in-)edges. *load avg*: the machine's 1-minute load average at the",
        "start and end of the run (2 cores, shared: compare times only at similar load).",
        "",
        "| nodes | edges | K | method | load avg | generate | CSR | assign | build+write "
        "| partition | total | RSS loaded | peak | growth | edge cut | cut % | halo | repl. "
        "| imb. nodes / train / edges |",
        "|---:|---:|---:|---|---:|" + "---:|" * 14,
    ]
    synthetic = [e for e in report["runs"] if e["spec"]["kind"] == "synthetic"]
    for entry in synthetic:
        spec = entry["spec"]
        head = f"| {spec['num_nodes']:,} |"
        if entry["status"] != "ok":
            lines.append(
                f"{head} — | {spec['num_parts']} | {spec['method']} | {_load(entry)} | **failed**: "
                f"{entry['reason']} (in phase {entry['phase_at_failure']}, after "
                f"{entry['wall_s']}s; child RSS reached {entry['watched_max_rss_gib']} GiB) |"
                + " — |"
                * 13
            )
            continue
        r = entry["runs"][0]
        t, m = r["times_s"], r["memory_gib"]
        lines.append(
            f"{head} {r['num_edges']:,} | {r['num_parts']} | {r['method']} | {_load(entry)} | "
            f"{t['load']:.1f} | "
            f"{t['csr']:.1f} | {t['assign']:.1f} | {t['build_write']:.1f} | "
            f"{t['partition']:.1f} | "
            f"{t['total']:.1f} | {m['rss_after_load']:.2f} | {m['peak_rss']:.2f} | "
            f"{m['partition_growth']:.2f} | {r['edge_cut']:,} | {r['edge_cut_pct']} | "
            f"{r['halo_total']:,} | {r['replication']} | {_imbalance(r)} |"
        )
    real = [r for e in report["runs"] if e["spec"]["kind"] == "real" for r in e.get("runs", [])]
    failed_real = [e for e in report["runs"] if e["spec"]["kind"] == "real" and e["status"] != "ok"]
    if real or failed_real:
        lines += [
            "",
            "Shared real datasets (one process per dataset; times in seconds, partition only):",
            "",
            "| dataset | nodes | edges | K | METIS cut | random cut | METIS / random "
            "| METIS halo | random halo | METIS repl. | METIS imb. nodes / train / edges "
            "| METIS s | random s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by_key = {(r["graph"], r["num_parts"], r["method"]): r for r in real}
        for graph, k, method in by_key:
            if method != "metis" or (graph, k, "random") not in by_key:
                continue
            me, ra = by_key[graph, k, "metis"], by_key[graph, k, "random"]
            lines.append(
                f"| {graph} | {me['num_nodes']:,} | {me['num_edges']:,} | {k} | "
                f"{me['edge_cut']:,} ({me['edge_cut_pct']}%) | "
                f"{ra['edge_cut']:,} ({ra['edge_cut_pct']}%) | "
                f"{me['edge_cut'] / max(ra['edge_cut'], 1):.3f} | {me['halo_total']:,} | "
                f"{ra['halo_total']:,} | {me['replication']} | {_imbalance(me)} | "
                f"{me['times_s']['partition']:.2f} | {ra['times_s']['partition']:.2f} |"
            )
        for entry in failed_real:
            lines.append(f"| {entry['spec']['dataset']} | **failed**: {entry['reason']} |")
    lines += ["", "## Reading", "", *reading(report)]
    return "\n".join(lines) + "\n"


def reading(report: dict) -> list[str]:
    """Bullet points computed from the results (so they stay true when it is rerun)."""
    ok = [
        {**e["runs"][0], "load_avg": _load(e)}
        for e in report["runs"]
        if e["spec"]["kind"] == "synthetic" and e.get("runs")
    ]
    real = [r for e in report["runs"] if e["spec"]["kind"] == "real" for r in e.get("runs", [])]
    failed = [e for e in report["runs"] if e["status"] != "ok"]
    out = []
    metis = {(r["num_nodes"], r["num_parts"]): r for r in ok if r["method"] == "metis"}
    sizes = sorted({n for n, _ in metis})
    for k in sorted({k for _, k in metis}):
        steps = []
        for a, b in itertools.pairwise(sizes):
            if (a, k) in metis and (b, k) in metis:
                ta, tb = (metis[n, k]["times_s"]["assign"] for n in (a, b))
                exponent = math.log(tb / ta) / math.log(b / a)
                steps.append(
                    f"{ta:.1f}s at {a:,} → {tb:.1f}s at {b:,} nodes (×{tb / ta:.1f} for "
                    f"×{b / a:.1f} nodes, ≈ N^{exponent:.2f}; load avg "
                    f"{metis[a, k]['load_avg']} and {metis[b, k]['load_avg']})"
                )
        if steps:
            out.append(f"- METIS time (assign column), K={k}: " + "; ".join(steps) + ".")
    if metis:
        n, k = max(metis)
        r = metis[n, k]
        t, m = r["times_s"], r["memory_gib"]
        sampled = ""
        if r["memory_exact"]["assign"] and m["sampled_max_assign"] < m["peak_rss_assign"]:
            sampled = (
                f" (the 50 ms sampler thread saw at most {m['sampled_max_assign']:.2f} GiB "
                "then: pymetis holds the GIL, so that peak is read from VmHWM)"
            )
        out.append(
            f"- Largest METIS run ({n:,} nodes, K={k}): of {t['total']:.0f}s in all, "
            f"{t['load']:.0f}s generate the graph, {t['csr']:.0f}s build the CSR, "
            f"{t['assign']:.0f}s run METIS ({100 * t['assign'] / t['total']:.0f}%), "
            f"{t['build_write']:.0f}s build and write the parts. Memory: "
            f"{m['rss_after_imports']:.2f} GiB after imports, {m['rss_after_load']:.2f} GiB "
            f"with the graph loaded (peak {m['peak_rss_load']:.2f} while generating); CSR + "
            f"METIS peak at {m['peak_rss_assign']:.2f} GiB{sampled}, build+write at "
            f"{m['peak_rss_build_write']:.2f} GiB. So METIS itself is where memory goes: "
            f"partitioning adds {m['partition_growth']:.2f} GiB "
            f"({m['partition_growth'] / max(m['rss_after_load'], 1e-9):.1f}× the loaded graph, "
            f"≈ {m['partition_growth'] * GIB / (2 * r['num_edges']):.0f} bytes per directed "
            f"edge) and the run peaks at {m['peak_rss']:.2f} GiB ({_peak_phase(m)})."
        )
    randoms = {(r["num_nodes"], r["num_parts"]): r for r in ok if r["method"] == "random"}
    if randoms:
        n, k = max(randoms)
        r, twin = randoms[n, k], metis.get((n, k))
        line = (
            f"- Random assignment costs nothing beyond the CSR (the permutation takes "
            f"{r['times_s']['assign']:.1f}s at {n:,} nodes, K={k}); that run adds "
            f"{r['memory_gib']['partition_growth']:.2f} GiB over the loaded graph, all in "
            f"build+write, and writes {r['partition_dir_bytes'] / GIB:.2f} GiB of part files"
        )
        if twin:
            line += (
                f" (METIS: {twin['memory_gib']['partition_growth']:.2f} GiB, "
                f"{twin['partition_dir_bytes'] / GIB:.2f} GiB; the difference on disk is "
                "the larger halo)"
            )
        out.append(line + ".")
    ratios = []
    by_run = {(r["num_nodes"], r["num_parts"], r["method"]): r for r in ok}
    for (n, k, method), r in by_run.items():
        twin = by_run.get((n, k, "random"))
        if method == "metis" and twin:
            aligned = 100 * (1 - r["edge_homophily"]) * (1 - 1 / k)
            ratios.append(
                (r["edge_cut"] / twin["edge_cut"], r["halo_total"] / twin["halo_total"], r, aligned)
            )
    if ratios:
        cuts, halos = [c for c, *_ in ratios], [h for _, h, *_ in ratios]
        detail = ", ".join(
            f"{r['num_nodes']:,}/K={r['num_parts']}: {r['edge_cut_pct']}% vs {aligned:.1f}%"
            for *_, r, aligned in ratios
        )
        out.append(
            f"- Synthetic graphs: METIS cuts {min(cuts):.2f}–{max(cuts):.2f}× the edges random "
            f"does, but its halo is still {min(halos):.2f}–{max(halos):.2f}× random's. In these "
            "DC-SBM graphs the only structure is the class (edge homophily "
            f"{ratios[0][2]['edge_homophily']:.2f}; otherwise partners are random), so the "
            "natural target is to keep classes whole, which cuts about "
            "(1 − homophily)(1 − 1/K) of the edges. METIS's cut against that estimate: "
            f"{detail}. And with ~24 neighbours per node, almost every node keeps some "
            "neighbour in another part, so the halo barely shrinks. The real graphs are far "
            "more partitionable: synthetic cut and halo are a pessimistic bound."
        )
    if real:
        by = {(r["graph"], r["num_parts"], r["method"]): r for r in real}
        pairs = [
            (by[g, k, "metis"]["edge_cut"] / max(by[g, k, "random"]["edge_cut"], 1), g, k)
            for g, k, m in by
            if m == "metis" and (g, k, "random") in by
        ]
        if pairs:
            lo, hi = min(pairs), max(pairs)
            halos = [
                by[g, k, "metis"]["halo_total"] / max(by[g, k, "random"]["halo_total"], 1)
                for _, g, k in pairs
            ]
            out.append(
                f"- Real datasets: METIS cuts {lo[0]:.2f}× ({lo[1]}, K={lo[2]}) to "
                f"{hi[0]:.2f}× ({hi[1]}, K={hi[2]}) the edges random does, and its halo is "
                f"{min(halos):.2f}–{max(halos):.2f}× random's; every partition of these small "
                f"graphs took at most {max(r['times_s']['partition'] for r in real):.1f}s "
                "(mostly building and writing the parts, for METIS and random alike)."
            )
    metis_runs = [r for r in ok + real if r["method"] == "metis"]
    if metis_runs:
        worst = []
        for key, name in (
            ("inner", "inner nodes"),
            ("train", "training nodes"),
            ("edges", "edges"),
        ):
            r = max(metis_runs, key=lambda r: r["imbalance"][key])
            where = f"{r['num_nodes']:,} nodes" if r["graph"] == "synthetic" else r["graph"]
            worst.append(f"{r['imbalance'][key]} for {name} ({where}, K={r['num_parts']})")
        synthetic_worst = max(
            (v for r in ok if r["method"] == "metis" for v in r["imbalance"].values()), default=0
        )
        random_train = max(
            (r["imbalance"]["train"] for r in real if r["method"] == "random"), default=0
        )
        out.append(
            "- Balance: METIS is asked to balance nodes, training nodes and edges, and its "
            f"worst max / mean was {', '.join(worst)}. On the synthetic graphs every "
            f"constraint stays within {synthetic_worst}; on the small real graphs the "
            "training-node and edge constraints are met only loosely (there are few training "
            f"nodes per part: random reaches {random_train} on training nodes too), so per-rank "
            "work can differ that much there. "
            "Random parts differ in size by at most one node."
        )
    m = report["machine"]
    out.append(
        f"- The whole benchmark took {report.get('wall_s', 0) / 60:.0f} minutes. "
        f"The machine was shared: 1-minute load average {m['load_average_at_start'][0]} at "
        f"start and {m.get('load_average_at_end', ['?'])[0]} at the end on "
        f"{m['cpu_cores']} cores (per-run values are in the JSON), so the times are upper "
        "bounds, inflated by up to roughly the load / cores ratio."
    )
    for e in failed:
        name = e["spec"].get("dataset") or (
            f"{e['spec']['num_nodes']:,} nodes, K={e['spec']['num_parts']}, {e['spec']['method']}"
        )
        out.append(f"- **Failed** ({name}): {e['reason']}, in phase {e['phase_at_failure']}.")
    if not failed:
        out.append("- Every run finished within the time and memory limits.")
    return out


def _imbalance(run: dict) -> str:
    return " / ".join(str(run["imbalance"][key]) for key in ("inner", "train", "edges"))


def _load(entry: dict) -> str:
    """The 1-minute load average at the start and end of one run."""
    return f"{entry['load_average_1m_at_start']}→{entry['load_average_1m_at_end']}"


def _peak_phase(memory: dict) -> str:
    phases = {
        "generating the graph": memory["peak_rss_load"],
        "assignment": memory["peak_rss_assign"],
        "build+write": memory["peak_rss_build_write"],
    }
    return "reached during " + max(phases, key=phases.get)


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
