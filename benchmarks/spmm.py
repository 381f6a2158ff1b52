"""SpMM on the CPU: bns_pipe's kernel against torch's and PyG's, and against the memory floor.

For random graphs (every node has ``degree`` uniformly random in-neighbours) and feature widths
F, times ``Y = A·X`` (forward) and ``Aᵀ·G`` (the backward of a GCN aggregation) with 1 and 2
threads. Methods:

* ``ours``: ``torch.ops.bns_pipe.spmm`` (forward on A, backward on the cached CSR ``Aᵀ``);
* ``torch_mkl``: ``torch.sparse_csr_tensor @ X`` (MKL), on A and on a prebuilt CSR ``Aᵀ``;
* ``torch_reduce``: ``torch.sparse.mm(A, X, "sum")``, torch's own kernel (our fallback);
* ``pyg_spmm``: ``torch_geometric.utils.spmm(A, X)``, PyG's path without torch_sparse;
* ``torch_autograd``: ``A.t() @ G`` (a CSC view), what torch's backward runs on every call.

The floor: an SpMM must move ``nnz·(8 + 4)`` bytes of indices and values, ``nnz·F·4`` of
gathered rows of X and ``n_rows·F·4`` of output; achieved GB/s is that over the time, compared
to the bandwidth of a large ``copy_`` (2 bytes moved per byte copied) and ``add`` (3).

Run ``python benchmarks/spmm.py`` after ``make install`` (about 15 minutes on 2 cores); it
writes ``benchmarks/results/spmm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch_geometric
from torch_geometric.utils import spmm as pyg_spmm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine_floor import timed  # noqa: E402
from bns_pipe import _ext  # noqa: E402
from bns_pipe.sparse import CSR  # noqa: E402

warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
RESULTS = Path(__file__).parent / "results" / "spmm.json"
# A method whose timed runs add up to more than this many seconds is not run again.
METHOD_BUDGET_S = 12.0


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "python": platform.python_version(),
        "extension": _ext.describe(),
        "load_average_at_start": os.getloadavg(),
    }


def best_and_median(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Seconds: min and median of ``reps`` timed calls after one warm-up call."""
    times = timed(fn, reps, 1)
    return min(times), statistics.median(times)


def bandwidth(threads: int, reps: int) -> dict:
    """Effective memory bandwidth in GB/s from a 512 MiB ``copy_`` and ``add``."""
    torch.set_num_threads(threads)
    a = torch.rand(1 << 27)
    b, c = torch.rand_like(a), torch.empty_like(a)
    size = a.numel() * a.element_size()
    copy, _ = best_and_median(lambda: c.copy_(a), reps)
    add, _ = best_and_median(lambda: torch.add(a, b, out=c), reps)
    return {"copy_GBps": 2 * size / copy / 1e9, "add_GBps": 3 * size / add / 1e9}


def random_graph(n: int, degree: int, seed: int = 0) -> CSR:
    """``(n, n)`` with ``degree`` uniform random columns per row and values in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    indptr = torch.arange(0, n * degree + 1, degree)
    indices = torch.randint(0, n, (n * degree,), generator=gen)
    return CSR(indptr, indices, torch.rand(n * degree, generator=gen), n)


def torch_csr(A: CSR) -> torch.Tensor:
    return torch.sparse_csr_tensor(A.indptr, A.indices, A.values, A.shape)


def methods(A: CSR, At: CSR, X: torch.Tensor, direction: str) -> dict[str, Callable]:
    """The callables computing ``A·X`` (forward) or ``Aᵀ·X`` (transpose)."""
    op = _ext.ops().spmm
    M, Mt = torch_csr(A), torch_csr(At)
    if direction == "forward":
        return {
            "ours": lambda: op(A.indptr, A.indices, A.values, X),
            "torch_mkl": lambda: M @ X,
            "torch_reduce": lambda: torch.sparse.mm(M, X, "sum"),
            "pyg_spmm": lambda: pyg_spmm(M, X),
        }
    return {
        "ours": lambda: op(At.indptr, At.indices, At.values, X),
        "torch_mkl": lambda: Mt @ X,
        "torch_reduce": lambda: torch.sparse.mm(Mt, X, "sum"),
        "torch_autograd": lambda: M.t() @ X,
    }


def run_case(A: CSR, At: CSR, F: int, direction: str, threads: int, reps: int) -> list[dict]:
    """Time every method on one case, interleaved rep by rep; rows for the JSON."""
    torch.set_num_threads(threads)
    X = torch.randn(A.n_cols if direction == "forward" else A.n_rows, F)
    fns = methods(A, At, X, direction)
    reference = fns["ours"]()
    for name, fn in fns.items():
        torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=1e-4, msg=name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if sum(times[name]) > METHOD_BUDGET_S:
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    B = At if direction == "transpose" else A
    moved = B.nnz * (8 + 4) + B.nnz * F * 4 + B.n_rows * F * 4
    return [
        {
            "n_nodes": A.n_rows,
            "nnz": A.nnz,
            "direction": direction,
            "F": F,
            "threads": threads,
            "method": name,
            "reps": len(ts),
            "min_ms": 1e3 * min(ts),
            "median_ms": 1e3 * statistics.median(ts),
            "bytes": moved,
            "GBps": moved / min(ts) / 1e9,
        }
        for name, ts in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--degree", type=int, default=16)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not _ext.available():
        raise SystemExit(f"the C++ extension is needed: {_ext.describe()}")

    report = {"machine": machine(), "degree": args.degree, "bandwidth": {}, "graphs": {}}
    for threads in args.threads:
        report["bandwidth"][threads] = bw = bandwidth(threads, args.reps)
        print(f"threads={threads}: copy {bw['copy_GBps']:.1f} GB/s, add {bw['add_GBps']:.1f} GB/s")
    rows = []
    for n in args.nodes:
        A = random_graph(n, args.degree)
        start = time.perf_counter()
        At = A.transpose()
        report["graphs"][n] = {
            "nnz": A.nnz,
            "transpose_build_ms": 1e3 * (time.perf_counter() - start),
        }
        for F in args.features:
            for direction in ("forward", "transpose"):
                for threads in args.threads:
                    case = run_case(A, At, F, direction, threads, args.reps)
                    copy_bw = report["bandwidth"][threads]["copy_GBps"]
                    ours = next(r for r in case if r["method"] == "ours")
                    for r in case:
                        r["fraction_of_copy_bw"] = r["GBps"] / copy_bw
                        r["time_vs_ours"] = r["min_ms"] / ours["min_ms"]
                    rows += case
                    print(
                        f"n={n} F={F} {direction} threads={threads}: "
                        + ", ".join(f"{r['method']} {r['min_ms']:.1f} ms" for r in case),
                        flush=True,
                    )
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["results"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
